//! Vector building blocks below the row and lane kernels.
//!
//! - [`stream`]: copies and zeroes with non-temporal stores (any x86-64 CPU);
//! - [`wide`]: f64 lanes with per-lane masks (scalar, or four per AVX2 register) and the
//!   exponential and `ln(1 + y)` over them, for the MAP solver;
//! - `avx2` (x86-64): the proof that the CPU has AVX2 and FMA, and the 256-bit exponential,
//!   sigmoid and softplus and the register shuffles that the hand-vectorised kernels share.

/// Methods `fn name(self, o: Self) -> Out { expr }` for each `name => |a, b| expr`: the
/// lane-by-lane binary operations of the vector types, one line each.
macro_rules! binary_methods {
    ($out:ty; $($name:ident => |$a:ident, $b:ident| $e:expr),* $(,)?) => {
        $(
            #[inline(always)]
            fn $name(self, o: Self) -> $out {
                let ($a, $b) = (self, o);
                $e
            }
        )*
    };
}
pub(crate) use binary_methods;

pub(crate) mod stream;
pub(crate) mod wide;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
