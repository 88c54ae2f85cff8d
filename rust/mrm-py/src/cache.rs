//! Reuse of the memory of large gradient arrays between calls.
//!
//! Writing a fresh array of hundreds of MB first costs the kernel a page fault and a zero fill
//! per page; for `meta_backward` on 100,000 users that is a third of the call. So the gradient
//! arrays of at least [`MIN_BYTES`] are views of cached 1-D arrays: once nothing but the cache
//! refers to a cached array (every view, tensor and memoryview of it is gone: its reference
//! count is 1), a later call takes its memory, already mapped, for an output of the same dtype
//! and between half its size and its size. The cache holds at most [`limit`] bytes
//! (`MRM_OUTPUT_CACHE_MB`, default 1024; 0 turns it off), evicting the least recently used free
//! arrays first; an array that does not fit is returned uncached.
//!
//! All of it runs with the GIL held, and the lock is only tried, never waited for (so a
//! `fork()` cannot leave a child waiting on it): when it is busy, the call allocates normally.

use std::any::TypeId;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use numpy::{Element, PyArray1, PyArrayDyn, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PySlice;

/// Arrays smaller than this are allocated normally.
pub const MIN_BYTES: usize = 1 << 20;

/// Not yet read from the environment.
const UNSET: usize = usize::MAX;

static LIMIT: AtomicUsize = AtomicUsize::new(UNSET);

struct Entry {
    array: Py<PyAny>,
    dtype: TypeId,
    len: usize,
    bytes: usize,
}

/// Least recently used first.
static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The cache's limit in bytes.
pub fn limit() -> usize {
    let current = LIMIT.load(Ordering::Relaxed);
    if current != UNSET {
        return current;
    }
    let from_env = std::env::var("MRM_OUTPUT_CACHE_MB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(1024 << 20, |mb| mb.saturating_mul(1 << 20));
    LIMIT.store(from_env, Ordering::Relaxed);
    from_env
}

/// Sets the limit (bytes) and drops free arrays until the cache fits it; returns the bytes
/// the cache still holds (arrays in use stay until they are free and evicted).
pub fn set_limit(py: Python<'_>, bytes: usize) -> usize {
    LIMIT.store(bytes.min(UNSET - 1), Ordering::Relaxed);
    // Every holder of the lock also holds the GIL and never releases it meanwhile, so with the
    // GIL held here the lock is free (a forked child included: fork needs the GIL too).
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    evict(py, &mut cache, 0, bytes);
    cache.iter().map(|e| e.bytes).sum()
}

/// Whether only the cache refers to the entry's array (`_py`: the GIL is held, so no other
/// thread changes the count meanwhile).
fn is_free(_py: Python<'_>, entry: &Entry) -> bool {
    // SAFETY: the entry owns a valid object and the GIL is held.
    unsafe { pyo3::ffi::Py_REFCNT(entry.array.as_ptr()) == 1 }
}

/// Drops free entries, least recently used first, until `extra` more bytes fit under `limit`.
fn evict(py: Python<'_>, cache: &mut Vec<Entry>, extra: usize, limit: usize) {
    let mut held: usize = cache.iter().map(|e| e.bytes).sum();
    let mut i = 0;
    while i < cache.len() && held + extra > limit {
        if is_free(py, &cache[i]) {
            held -= cache[i].bytes;
            cache.remove(i);
        } else {
            i += 1;
        }
    }
}

/// A zero-initialised or reused C-contiguous array of `shape` whose every element the caller
/// overwrites (its contents are unspecified).
pub fn output<'py, T: Element + 'static>(py: Python<'py>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let len: usize = shape.iter().product();
    let bytes = len * std::mem::size_of::<T>();
    let limit = limit();
    if bytes < MIN_BYTES || bytes > limit {
        return Ok(PyArrayDyn::<T>::zeros(py, shape, false));
    }
    let Ok(mut cache) = CACHE.try_lock() else {
        return Ok(PyArrayDyn::<T>::zeros(py, shape, false));
    };
    let dtype = TypeId::of::<T>();
    let reusable = cache
        .iter()
        .enumerate()
        .filter(|(_, e)| e.dtype == dtype && e.len >= len && e.len / 2 <= len && is_free(py, e))
        .min_by_key(|(_, e)| e.len)
        .map(|(i, _)| i);
    let base = match reusable {
        Some(i) => {
            let entry = cache.remove(i);
            let base = entry.array.clone_ref(py);
            cache.push(entry);
            base
        }
        None => {
            evict(py, &mut cache, bytes, limit);
            // Numpy's allocator asks the kernel for huge pages for large arrays.
            let fresh = PyArray1::<T>::zeros(py, len, false).into_any().unbind();
            if cache.iter().map(|e| e.bytes).sum::<usize>() + bytes <= limit {
                cache.push(Entry {
                    array: fresh.clone_ref(py),
                    dtype,
                    len,
                    bytes,
                });
            }
            fresh
        }
    };
    drop(cache);
    let base = base.into_bound(py).cast_into::<PyArray1<T>>()?;
    let prefix = base
        .get_item(PySlice::new(py, 0, len as isize, 1))?
        .cast_into::<PyArray1<T>>()?;
    prefix.reshape(shape)
}
