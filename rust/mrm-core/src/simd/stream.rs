//! Copies into memory that is not read again soon, without first reading it.
//!
//! An ordinary store to a line that is not in the cache first reads the line from memory
//! ("read for ownership"), so writing a gradient as large as the input costs a read and a
//! write of it. On x86-64 the copy below uses non-temporal stores (SSE2, present on every
//! x86-64 CPU), which write whole lines without reading them and without displacing the cache.
//! The bits written are those of the source, on every CPU.

use crate::real::Real;

/// Copies `src` into `dst` (same length). On x86-64 the stores are non-temporal: call
/// [`fence`] before another thread may read `dst`.
#[inline]
pub(crate) fn copy<T: Real>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "stream::copy: lengths differ");
    write(dst, Some(src));
}

/// Zeroes `dst`; on x86-64 with non-temporal stores (call [`fence`] as for [`copy`]).
#[inline]
pub(crate) fn zero<T: Real>(dst: &mut [T]) {
    write(dst, None);
}

/// Writes `src` (zeros without one) into `dst`: on x86-64 the elements before the first
/// 16-byte boundary of `dst` plainly, then whole 16-byte chunks non-temporally, then the rest.
#[inline(always)]
fn write<T: Real>(dst: &mut [T], src: Option<&[T]>) {
    let value = |i: usize| src.map_or(T::ZERO, |s| s[i]);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_setzero_si128, _mm_stream_si128};
        let size = std::mem::size_of::<T>();
        let misalignment = dst.as_ptr().align_offset(16).min(dst.len());
        let (head, rest) = dst.split_at_mut(misalignment);
        for (i, x) in head.iter_mut().enumerate() {
            *x = value(i);
        }
        let per_chunk = 16 / size;
        let chunks = if size == 0 || 16 % size != 0 || rest.as_ptr().align_offset(16) != 0 {
            0
        } else {
            rest.len() / per_chunk
        };
        let d = rest.as_mut_ptr() as *mut __m128i;
        for i in 0..chunks {
            // SAFETY: chunk i lies within `rest` (16-byte aligned) and, with a source, within
            // `src` from `misalignment` on (unaligned load); SSE2 is part of x86-64. The zero
            // bits are `T::ZERO` for both float types.
            unsafe {
                let chunk = match src {
                    Some(s) => _mm_loadu_si128((s.as_ptr().add(misalignment) as *const __m128i).add(i)),
                    None => _mm_setzero_si128(),
                };
                _mm_stream_si128(d.add(i), chunk);
            }
        }
        let done = chunks * per_chunk;
        for (i, x) in rest.iter_mut().enumerate().skip(done) {
            *x = value(misalignment + i);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (i, x) in dst.iter_mut().enumerate() {
        *x = value(i);
    }
}

/// Orders the non-temporal stores of [`copy`] and [`zero`] before every later store of this thread (so
/// before the signal that hands `dst` to another thread).
#[inline]
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_zeroes_every_offset_and_length_bit_for_bit() {
        let src64: Vec<f64> = (0..200).map(|i| (i as f64).sin() * 1e10 + f64::from_bits(i)).collect();
        let src32: Vec<f32> = (0..200).map(|i| (i as f32).cos() * 3.5e5).collect();
        for start in 0..8 {
            for len in [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 63, 100, 150] {
                let mut dst = vec![-1.0f64; 200];
                copy(&mut dst[start..start + len], &src64[start + 3..start + 3 + len]);
                fence();
                assert!(dst[start..start + len]
                    .iter()
                    .zip(&src64[start + 3..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                assert!(
                    dst[..start].iter().chain(&dst[start + len..]).all(|&x| x == -1.0),
                    "wrote outside"
                );
                let mut dst = vec![-1.0f32; 200];
                copy(&mut dst[start..start + len], &src32[1..1 + len]);
                fence();
                assert!(dst[start..start + len]
                    .iter()
                    .zip(&src32[1..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                assert!(
                    dst[..start].iter().chain(&dst[start + len..]).all(|&x| x == -1.0),
                    "wrote outside"
                );
                let mut dst = vec![-1.0f64; 200];
                zero(&mut dst[start..start + len]);
                fence();
                assert!(dst[start..start + len].iter().all(|x| x.to_bits() == 0), "zero");
                assert!(
                    dst[..start].iter().chain(&dst[start + len..]).all(|&x| x == -1.0),
                    "zero wrote outside"
                );
            }
        }
    }
}
