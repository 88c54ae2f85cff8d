//! Vector building blocks below the row and lane kernels.
//!
//! - [`stream`]: copies and zeroes with non-temporal stores (any x86-64 CPU);
//! - `avx2` (x86-64): the proof that the CPU has AVX2 and FMA, and the 256-bit exponential,
//!   sigmoid and softplus and the register shuffles that the hand-vectorised kernels share.

pub(crate) mod stream;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
