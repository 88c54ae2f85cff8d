//! Errors returned by the kernels. Kernels never panic on user input.
//!
//! An [`Error`] says what kind of problem it is ([`Kind`]), which argument it is about when one
//! is to blame ([`Error::argument`]), and a message that names that argument (and the user, row
//! or column where there is one). The bindings choose the Python exception by the kind alone.

use std::borrow::Cow;
use std::fmt;

/// What kind of problem an [`Error`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// Lengths, widths or offsets that do not fit together or do not fit the other arguments.
    Shape,
    /// A setting or value out of its range (steps, lr, an index, gamma, ...), or arguments that
    /// do not go together.
    Value,
    /// A NaN or an infinity: in an input, or in a result that finite inputs drove out of the
    /// dtype's range.
    NonFinite,
    /// The caller's `keep_going` callback asked to stop (e.g. Ctrl-C).
    Interrupted,
    /// Memory the call needs could not be allocated.
    Resource,
}

/// An error of one of the kernels: a [`Kind`], the argument it is about (if one is to blame)
/// and the message. Two errors are equal when their kinds and messages are: the message names
/// the argument.
#[derive(Clone, Debug)]
pub struct Error {
    kind: Kind,
    argument: Option<Cow<'static, str>>,
    message: Cow<'static, str>,
}

impl Error {
    /// An error about `argument`.
    pub fn new(kind: Kind, argument: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            argument: Some(argument.into()),
            message: message.into(),
        }
    }

    /// An error that no single argument is to blame for (e.g. an output that overflows).
    pub fn without_argument(kind: Kind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            argument: None,
            message: message.into(),
        }
    }

    /// The caller's `keep_going` callback asked to stop. (Named as the variant of the enum this
    /// type replaced, so that `Err(Error::Interrupted)` still reads and compares as before.)
    #[allow(non_upper_case_globals)]
    pub const Interrupted: Error = Error {
        kind: Kind::Interrupted,
        argument: None,
        message: Cow::Borrowed("interrupted"),
    };

    /// An invalid argument, of kind [`Kind::Value`], with `message` naming it: the constructor
    /// of the variant `Error::Invalid(String)` of the enum this type replaced. New code names the
    /// kind and the argument with [`Error::new`].
    #[allow(non_snake_case)]
    pub fn Invalid(message: String) -> Self {
        Error::without_argument(Kind::Value, message)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The argument the error is about, when one is to blame.
    pub fn argument(&self) -> Option<&str> {
        self.argument.as_deref()
    }

    /// The message (also what [`fmt::Display`] writes).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err` of a [`Kind::Shape`] error about `argument` unless `holds`; the message is built only
/// for the error.
pub(crate) fn shape_unless(
    holds: bool,
    argument: impl Into<Cow<'static, str>>,
    message: impl FnOnce() -> String,
) -> Result<()> {
    if holds {
        Ok(())
    } else {
        shape(argument, message())
    }
}

/// `Err` of a [`Kind::Shape`] error about `argument`.
pub(crate) fn shape<T>(argument: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Result<T> {
    Err(Error::new(Kind::Shape, argument, message))
}

/// `Err` of a [`Kind::Value`] error about `argument`.
pub(crate) fn value<T>(argument: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Result<T> {
    Err(Error::new(Kind::Value, argument, message))
}

/// `Err` of a [`Kind::NonFinite`] error about the input `argument`.
pub(crate) fn non_finite<T>(
    argument: impl Into<Cow<'static, str>>,
    message: impl Into<Cow<'static, str>>,
) -> Result<T> {
    Err(Error::new(Kind::NonFinite, argument, message))
}

/// `Err` of a [`Kind::NonFinite`] error about a result (no argument to blame alone).
pub(crate) fn non_finite_result<T>(message: impl Into<Cow<'static, str>>) -> Result<T> {
    Err(Error::without_argument(Kind::NonFinite, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_arguments_and_messages() {
        let e = Error::new(Kind::Shape, "w0", "w0 must have shape (3,)");
        assert_eq!(
            (e.kind(), e.argument(), e.to_string()),
            (Kind::Shape, Some("w0"), "w0 must have shape (3,)".to_string())
        );
        assert_eq!(Error::Interrupted.kind(), Kind::Interrupted);
        assert_eq!(Error::Interrupted.to_string(), "interrupted");
        assert_eq!(Error::Interrupted.argument(), None);
        // Equal when kind and message are; the compatibility constructor is a value error.
        assert_eq!(
            Error::new(Kind::Value, "steps", "steps must be <= 3"),
            Error::Invalid("steps must be <= 3".into())
        );
        assert_ne!(
            Error::new(Kind::Shape, "steps", "steps must be <= 3"),
            Error::Invalid("steps must be <= 3".into())
        );
    }
}
