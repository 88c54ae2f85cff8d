//! Python bindings for mrm-core: conversion, validation of shapes, GIL release, thread pools.
//! No maths here. The public, documented API is `mrm.ops` (Python), which calls these.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod cache;

use mrm_core::{
    Control, Csr, Dtype, Error, ForwardOutputs, InnerLoop, Kind, MapGradients, MapOutputs, MapSettings, Optimizer,
    Real, Start, WeightMap, MAX_THREADS,
};
use numpy::ndarray::{Array1, Array2, Array3, Dimension, Ix1, Ix2, Ix3, IxDyn};
use numpy::{
    Element, IntoPyArray, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn,
    PyReadwriteArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Users per chunk between two checks for Ctrl-C.
const CHUNK_USERS: usize = 1 << 16;

/// How often the calling thread looks for Ctrl-C while the workers run.
const SIGNAL_POLL: Duration = Duration::from_millis(20);

/// Pools of this many different sizes are kept; building another drops one of the others.
const CACHED_POOLS: usize = 8;

/// Private rayon pools by size, remembered with the process id that built them: a forked
/// child finds another pid and builds fresh pools (the parent's threads do not exist there).
/// Pools by thread count, with the process id that built them.
type Pools = Option<(u32, HashMap<usize, Arc<rayon::ThreadPool>>)>;
static POOLS: Mutex<Pools> = Mutex::new(None);

fn pool(num_threads: usize) -> PyResult<Arc<rayon::ThreadPool>> {
    if num_threads == 0 {
        return Err(PyValueError::new_err("num_threads must be >= 1"));
    }
    if num_threads > MAX_THREADS {
        return Err(PyValueError::new_err(format!(
            "num_threads must be <= {MAX_THREADS}, got {num_threads}"
        )));
    }
    let mut guard = POOLS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if guard.as_ref().is_some_and(|(owner, _)| *owner != pid) {
        // Inherited from the parent across fork(): its worker threads are gone; never join them.
        if let Some(stale) = guard.take() {
            std::mem::forget(stale);
        }
    }
    let (_, pools) = guard.get_or_insert_with(|| (pid, HashMap::new()));
    if let Some(p) = pools.get(&num_threads) {
        return Ok(p.clone());
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads)
        .thread_name(|i| format!("mrm-worker-{i}"))
        .build()
        .map_err(|e| PyValueError::new_err(format!("could not start {num_threads} threads: {e}")))?;
    let built = Arc::new(built);
    if pools.len() >= CACHED_POOLS {
        // A caller still running on the dropped pool holds its own reference to it.
        if let Some(&other) = pools.keys().next() {
            pools.remove(&other);
        }
    }
    pools.insert(num_threads, built.clone());
    Ok(built)
}

/// Runs `f` without the GIL on `pool`. The calling thread waits for it, looking for Ctrl-C
/// every [`SIGNAL_POLL`]; one found sets a flag that the kernels read between chunks of users
/// and every so many inner steps (`Control::keep_going`), so they stop soon after.
fn run<R: Send>(
    py: Python<'_>,
    pool: &rayon::ThreadPool,
    f: impl FnOnce(&Control<'_>) -> Result<R, Error> + Send,
) -> PyResult<R> {
    let pending: Mutex<Option<PyErr>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let result = py.detach(|| {
        let keep_going = || !stop.load(Ordering::Relaxed);
        let ctl = Control {
            pool,
            chunk_users: CHUNK_USERS,
            keep_going: &keep_going,
        };
        let ctl = &ctl;
        let (done, finished) = sync_channel(1);
        pool.in_place_scope(|scope| {
            scope.spawn(move |_| {
                let _ = done.send(f(ctl));
            });
            loop {
                match finished.recv_timeout(SIGNAL_POLL) {
                    Ok(result) => return result,
                    // The work panicked: the scope passes the panic on when this returns.
                    Err(RecvTimeoutError::Disconnected) => return Err(Error::Interrupted),
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(err) = Python::attach(|py| py.check_signals()) {
                            *pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    });
    // A signal's exception (raised by its Python handler) wins even over a finished result:
    // the handler has run, so it would be lost otherwise.
    if let Some(err) = pending.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(err);
    }
    result.py()
}

/// A core error on its way to Python: the one conversion of [`mrm_core::Error`] to a Python
/// exception, chosen by its kind alone (shape, value and non-finite problems are `ValueError`,
/// an interruption `KeyboardInterrupt`, a failed allocation `MemoryError`), with the core's
/// message. (`TypeError`s are raised before the core is called: it never sees a Python type.)
struct CoreError(Error);

impl From<CoreError> for PyErr {
    fn from(CoreError(error): CoreError) -> PyErr {
        let message = error.to_string();
        match error.kind() {
            Kind::Interrupted => PyKeyboardInterrupt::new_err(message),
            Kind::Resource => PyMemoryError::new_err(message),
            _ => PyValueError::new_err(message),
        }
    }
}

/// `?` for core results in functions that return Python results, through [`CoreError`].
trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(|error| CoreError(error).into())
    }
}

fn slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    name: &str,
    array: &'a numpy::PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

/// A CSR argument with its shape and offsets checked. With `scan`, every value is also checked
/// to be finite here (on `threads`, without the GIL); without, the kernel checks each user's
/// rows as it reads them (`forward` and `backward` do) and gives the same error.
fn csr<'a, T: Real + Element>(
    py: Python<'_>,
    name: &str,
    values: &'a PyReadonlyArray2<'_, T>,
    offsets: &'a PyReadonlyArray1<'_, i64>,
    threads: &rayon::ThreadPool,
    scan: bool,
) -> PyResult<Csr<'a, T>> {
    let (v, o, k) = (
        slice(name, values)?,
        slice(&format!("{name}_offsets"), offsets)?,
        values.shape()[1],
    );
    let checked = if scan {
        py.detach(|| Csr::new_in(name, v, o, k, Some(threads)))
    } else {
        Csr::shaped(name, v, o, k)
    };
    checked.py()
}

fn inner_loop(steps: usize, lr: f64, optimizer: &str, beta1: f64, beta2: f64, eps: f64) -> PyResult<InnerLoop> {
    let optimizer = match optimizer {
        "sgd" => Optimizer::Sgd,
        "adam" => Optimizer::Adam { beta1, beta2, eps },
        other => {
            return Err(PyValueError::new_err(format!(
                "optimizer must be 'sgd' or 'adam', got {other:?}"
            )))
        }
    };
    Ok(InnerLoop { steps, lr, optimizer })
}

fn start<'a, T: Real + Element>(w0: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<Start<'a, T>> {
    let values = slice("w0", w0)?;
    match w0.ndim() {
        1 => Ok(Start::Shared(values)),
        2 => Ok(Start::PerUser(values)),
        n => Err(PyValueError::new_err(format!(
            "w0 must be 1-D (K,) or 2-D (U, K), got {n}-D"
        ))),
    }
}

/// An entry point's query rows and offsets: always given (`backward`, `map_backward`) or optional.
trait QueryArg<'a, T> {
    /// A [`Csr`], or an optional one.
    type Checked;
    /// Checked as [`csr`] checks them (the kernel scans the values).
    fn checked(self, py: Python<'_>, threads: &rayon::ThreadPool) -> PyResult<Self::Checked>;
}

impl<'a, T: Real + Element> QueryArg<'a, T> for (&'a PyReadonlyArray2<'_, T>, &'a PyReadonlyArray1<'_, i64>) {
    type Checked = Csr<'a, T>;
    fn checked(self, py: Python<'_>, threads: &rayon::ThreadPool) -> PyResult<Csr<'a, T>> {
        csr(py, "query", self.0, self.1, threads, false)
    }
}

impl<'a, T: Real + Element> QueryArg<'a, T> for Option<(&'a PyReadonlyArray2<'_, T>, &'a PyReadonlyArray1<'_, i64>)> {
    type Checked = Option<Csr<'a, T>>;
    fn checked(self, py: Python<'_>, threads: &rayon::ThreadPool) -> PyResult<Option<Csr<'a, T>>> {
        self.map(|query| query.checked(py, threads)).transpose()
    }
}

/// The arguments the adaptation entry points share, checked: the pool, the support rows, the
/// query rows (`Q`), then `w0` (in that order, so the first bad one is the one named).
struct Inputs<'a, T, Q> {
    threads: Arc<rayon::ThreadPool>,
    start: Start<'a, T>,
    /// The shape of `w0` (and of its gradient).
    w0_shape: &'a [usize],
    support: Csr<'a, T>,
    query: Q,
}

fn inputs<'a, T: Real + Element, Q: QueryArg<'a, T>>(
    py: Python<'_>,
    num_threads: usize,
    w0: &'a PyReadonlyArrayDyn<'_, T>,
    support: (&'a PyReadonlyArray2<'_, T>, &'a PyReadonlyArray1<'_, i64>),
    query: Q,
) -> PyResult<Inputs<'a, T, Q::Checked>> {
    let threads = pool(num_threads)?;
    let support = csr(py, "support", support.0, support.1, &threads, false)?;
    let query = query.checked(py, &threads)?;
    Ok(Inputs {
        start: start(w0)?,
        w0_shape: w0.shape(),
        threads,
        support,
        query,
    })
}

fn matrix<T: Element>(values: Vec<T>, rows: usize, cols: usize) -> PyResult<Array2<T>> {
    Array2::from_shape_vec((rows, cols), values).map_err(|e| PyValueError::new_err(e.to_string()))
}

type Forward<'py> = (
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);
type Backward<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>);
/// Caller-given gradient buffers: grad_w0 (the shape of w0), grad_support, grad_query.
type BackwardOut<'py, T> = (
    Bound<'py, PyArrayDyn<T>>,
    Bound<'py, PyArray2<T>>,
    Bound<'py, PyArray2<T>>,
);

fn forward_arrays<'py, T: Dtype + Element>(
    py: Python<'py>,
    inputs: Inputs<'_, T, Option<Csr<'_, T>>>,
    inner: InnerLoop,
    with_support_loss: bool,
) -> PyResult<Forward<'py>> {
    let (threads, start, support, query) = (inputs.threads, inputs.start, inputs.support, inputs.query);
    let mut buffers = ForwardBuffers::new(support.n_users(), support.k, with_support_loss, query.is_some());
    run(py, &threads, |ctl| {
        mrm_core::forward(start, support, query, &inner, buffers.outputs(), ctl)
    })?;
    buffers.into_arrays(py)
}

/// Memory for the forward outputs: adapted weights (U × K) and the optional per-user values.
struct ForwardBuffers<T> {
    n_users: usize,
    k: usize,
    weights: Vec<T>,
    support_losses: Option<Vec<T>>,
    losses: Option<Vec<T>>,
    accuracy: Option<Vec<T>>,
}

impl<T: Real + Element> ForwardBuffers<T> {
    fn new(n_users: usize, k: usize, support_losses: bool, query: bool) -> Self {
        let per_user = |present: bool| present.then(|| vec![T::ZERO; n_users]);
        ForwardBuffers {
            n_users,
            k,
            weights: vec![T::ZERO; n_users * k],
            support_losses: per_user(support_losses),
            losses: per_user(query),
            accuracy: per_user(query),
        }
    }

    fn outputs(&mut self) -> ForwardOutputs<'_, T> {
        ForwardOutputs {
            weights: &mut self.weights,
            support_losses: self.support_losses.as_deref_mut(),
            losses: self.losses.as_deref_mut(),
            accuracy: self.accuracy.as_deref_mut(),
        }
    }

    fn into_arrays(self, py: Python<'_>) -> PyResult<Forward<'_>> {
        let vector = |v: Option<Vec<T>>| v.map(|v| Array1::from_vec(v).into_pyarray(py).into_any());
        Ok((
            matrix(self.weights, self.n_users, self.k)?.into_pyarray(py).into_any(),
            vector(self.support_losses),
            vector(self.losses),
            vector(self.accuracy),
        ))
    }
}

/// `backward`, and with `with_values` also `forward`'s four outputs from the same pass
/// (`mrm_core::value_and_grad`); returns the gradients and those outputs.
fn backward_arrays<'py, T: Dtype + Element>(
    py: Python<'py>,
    inputs: Inputs<'_, T, Csr<'_, T>>,
    grad_losses: PyReadonlyArray1<'py, T>,
    inner: InnerLoop,
    first_order: bool,
    out: Option<BackwardOut<'py, T>>,
    with_values: bool,
) -> PyResult<(Backward<'py>, Option<Forward<'py>>)> {
    let (threads, start, support, query) = (inputs.threads, inputs.start, inputs.support, inputs.query);
    let k = support.k;
    let grad_losses = slice("grad_losses", &grad_losses)?;
    let (grad_w0, grad_support, grad_query) = match out {
        Some(buffers) => buffers,
        None => {
            // Every element is written by the kernel (rows of skipped users only when it fails).
            let grad_w0 = cache::output::<T>(py, inputs.w0_shape)?;
            let grad_support = cache::output::<T>(py, &[support.n_rows(), k])?.cast_into::<PyArray2<T>>()?;
            let grad_query = cache::output::<T>(py, &[query.n_rows(), query.k])?.cast_into::<PyArray2<T>>()?;
            (grad_w0, grad_support, grad_query)
        }
    };
    let values = {
        // A buffer that overlaps an input (already borrowed read-only) cannot be borrowed here.
        let overlap = |name: &str| PyValueError::new_err(format!("{name} must not share memory with an input array"));
        let mut gw = grad_w0.try_readwrite().map_err(|_| overlap("out[0]"))?;
        let mut gs = grad_support.try_readwrite().map_err(|_| overlap("out[1]"))?;
        let mut gq = grad_query.try_readwrite().map_err(|_| overlap("out[2]"))?;
        let (gw, gs, gq) = (
            slice_mut("out[0]", &mut gw)?,
            slice_mut("out[1]", &mut gs)?,
            slice_mut("out[2]", &mut gq)?,
        );
        let mut buffers = with_values.then(|| ForwardBuffers::new(support.n_users(), k, true, true));
        run(py, &threads, |ctl| {
            let outputs = buffers.as_mut().map(ForwardBuffers::outputs);
            mrm_core::value_and_grad(
                start,
                support,
                query,
                grad_losses,
                &inner,
                first_order,
                outputs,
                gw,
                gs,
                gq,
                ctl,
            )
        })?;
        buffers.map(|b| b.into_arrays(py)).transpose()?
    };
    Ok((
        (grad_w0.into_any(), grad_support.into_any(), grad_query.into_any()),
        values,
    ))
}

fn slice_mut<'a, T: Element, D: numpy::ndarray::Dimension>(
    name: &str,
    array: &'a mut PyReadwriteArray<'_, T, D>,
) -> PyResult<&'a mut [T]> {
    array
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

fn map_settings(max_iter: usize, tol: f64, weight_map: &str) -> PyResult<MapSettings> {
    let weight_map = match weight_map {
        "simplex" => WeightMap::Simplex,
        "linear" => WeightMap::Linear,
        other => {
            return Err(PyValueError::new_err(format!(
                "weight_map must be 'simplex' or 'linear', got {other:?}"
            )))
        }
    };
    let settings = MapSettings {
        max_iter,
        tol,
        weight_map,
    };
    settings.validate().py()?;
    Ok(settings)
}

/// Memory for the MAP forward outputs.
struct MapBuffers<T> {
    n_users: usize,
    k: usize,
    weights: Vec<T>,
    iterations: Vec<i64>,
    grad_norm: Vec<T>,
    converged: Vec<bool>,
    support_losses: Vec<T>,
    losses: Option<Vec<T>>,
    accuracy: Option<Vec<T>>,
    covariance: Option<Vec<T>>,
}

type MapForward<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

impl<T: Real + Element> MapBuffers<T> {
    fn new(n_users: usize, k: usize, query: bool, covariance: bool) -> PyResult<Self> {
        let cov_len = n_users
            .checked_mul(k * k)
            .ok_or_else(|| PyMemoryError::new_err("the covariance output is too large"))?;
        let per_user = |present: bool| present.then(|| vec![T::ZERO; n_users]);
        Ok(MapBuffers {
            n_users,
            k,
            weights: vec![T::ZERO; n_users * k],
            iterations: vec![0; n_users],
            grad_norm: vec![T::ZERO; n_users],
            converged: vec![false; n_users],
            support_losses: vec![T::ZERO; n_users],
            losses: per_user(query),
            accuracy: per_user(query),
            covariance: covariance.then(|| vec![T::ZERO; cov_len]),
        })
    }

    fn outputs(&mut self) -> MapOutputs<'_, T> {
        MapOutputs {
            weights: &mut self.weights,
            iterations: &mut self.iterations,
            grad_norm: &mut self.grad_norm,
            converged: &mut self.converged,
            support_losses: Some(&mut self.support_losses),
            losses: self.losses.as_deref_mut(),
            accuracy: self.accuracy.as_deref_mut(),
            covariance: self.covariance.as_deref_mut(),
        }
    }

    fn into_arrays(self, py: Python<'_>) -> PyResult<MapForward<'_>> {
        let vector = |v: Option<Vec<T>>| v.map(|v| Array1::from_vec(v).into_pyarray(py).into_any());
        let covariance = match self.covariance {
            Some(c) => Some(
                Array3::from_shape_vec((self.n_users, self.k, self.k), c)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?
                    .into_pyarray(py)
                    .into_any(),
            ),
            None => None,
        };
        Ok((
            matrix(self.weights, self.n_users, self.k)?.into_pyarray(py).into_any(),
            Array1::from_vec(self.iterations).into_pyarray(py).into_any(),
            Array1::from_vec(self.grad_norm).into_pyarray(py).into_any(),
            Array1::from_vec(self.converged).into_pyarray(py).into_any(),
            Array1::from_vec(self.support_losses).into_pyarray(py).into_any(),
            vector(self.losses),
            vector(self.accuracy),
            covariance,
        ))
    }
}

fn map_forward_arrays<'py, T: Real + Element>(
    py: Python<'py>,
    inputs: Inputs<'_, T, Option<Csr<'_, T>>>,
    eta: PyReadonlyArray1<'py, T>,
    init: Option<PyReadonlyArray2<'py, T>>,
    settings: MapSettings,
    with_covariance: bool,
) -> PyResult<MapForward<'py>> {
    let (threads, start, support, query) = (inputs.threads, inputs.start, inputs.support, inputs.query);
    let k = support.k;
    let eta = slice("eta", &eta)?;
    let init = init.as_ref().map(|i| slice("init", i)).transpose()?;
    let mut buffers = MapBuffers::new(support.n_users(), k, query.is_some(), with_covariance)?;
    run(py, &threads, |ctl| {
        mrm_core::map_forward(start, eta, support, query, init, &settings, buffers.outputs(), ctl)
    })?;
    buffers.into_arrays(py)
}

type MapBackward<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
);

fn map_backward_arrays<'py, T: Real + Element>(
    py: Python<'py>,
    inputs: Inputs<'_, T, Csr<'_, T>>,
    eta: PyReadonlyArray1<'py, T>,
    grad_losses: PyReadonlyArray1<'py, T>,
    settings: MapSettings,
    with_values: bool,
) -> PyResult<(MapBackward<'py>, Option<MapForward<'py>>)> {
    let (threads, start, support, query) = (inputs.threads, inputs.start, inputs.support, inputs.query);
    let k = support.k;
    let eta_values = slice("eta", &eta)?;
    let grad_losses = slice("grad_losses", &grad_losses)?;
    // Every element is written by the kernel when it succeeds; the large ones reuse cached memory.
    let grad_w0 = cache::output::<T>(py, inputs.w0_shape)?;
    let grad_support = cache::output::<T>(py, &[support.n_rows(), k])?;
    let grad_query = cache::output::<T>(py, &[query.n_rows(), k])?;
    let mut ge = vec![T::ZERO; eta_values.len()];
    let mut buffers = if with_values {
        Some(MapBuffers::new(support.n_users(), k, true, false)?)
    } else {
        None
    };
    {
        let (mut gw, mut gs, mut gq) = (grad_w0.readwrite(), grad_support.readwrite(), grad_query.readwrite());
        let (gw, gs, gq) = (
            slice_mut("grad_w0", &mut gw)?,
            slice_mut("grad_support", &mut gs)?,
            slice_mut("grad_query", &mut gq)?,
        );
        run(py, &threads, |ctl| {
            let grads = MapGradients {
                w0: gw,
                eta: &mut ge,
                support: gs,
                query: gq,
            };
            let values = buffers.as_mut().map(MapBuffers::outputs);
            mrm_core::map_backward(
                start,
                eta_values,
                support,
                query,
                grad_losses,
                &settings,
                grads,
                values,
                ctl,
            )
        })?;
    }
    let grads = (
        grad_w0.into_any(),
        Array1::from_vec(ge).into_pyarray(py).into_any(),
        grad_support.into_any(),
        grad_query.into_any(),
    );
    Ok((grads, buffers.map(|b| b.into_arrays(py)).transpose()?))
}

/// Validates the inner-loop settings with the core's rules (`mrm.ops.InnerLoop` calls it once).
#[pyfunction]
#[pyo3(signature = (optimizer, steps, lr, beta1, beta2, eps, max_iter, tol, weight_map))]
#[allow(clippy::too_many_arguments)]
fn check_inner_loop(
    optimizer: &str,
    steps: usize,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    max_iter: usize,
    tol: f64,
    weight_map: &str,
) -> PyResult<()> {
    if optimizer == "map" {
        map_settings(max_iter, tol, weight_map)?;
        return Ok(());
    }
    inner_loop(steps, lr, optimizer, beta1, beta2, eps)?.validate().py()
}

/// The float type of an entry point's arrays, read from one of them.
#[derive(Clone, Copy)]
enum Float {
    F32,
    F64,
}

/// The float type of `array` (named `name` in the error): float32 or float64.
fn float_of(name: &str, array: &Bound<'_, PyAny>) -> PyResult<Float> {
    if array.cast::<PyArrayDyn<f32>>().is_ok() {
        Ok(Float::F32)
    } else if array.cast::<PyArrayDyn<f64>>().is_ok() {
        Ok(Float::F64)
    } else {
        Err(PyTypeError::new_err(format!(
            "{name} must be a float32 or float64 numpy array"
        )))
    }
}

/// `$body` with the type `$t` standing for the float type of `$array` (named `$name`): the
/// entry points take either dtype and pick the kernels for it here, at run time.
macro_rules! with_float {
    ($name:literal, $array:expr, $t:ident => $body:expr) => {
        match float_of($name, $array)? {
            Float::F32 => {
                type $t = f32;
                $body
            }
            Float::F64 => {
                type $t = f64;
                $body
            }
        }
    };
}

/// `array` read-only with `T` values and `D` dimensions; else a `TypeError` naming it (its dtype
/// must be the one the entry point took from its first float array).
fn typed<'py, T: Element, D: Dimension>(
    name: &str,
    array: &Bound<'py, PyAny>,
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>> {
    array.extract().map_err(|_| {
        // Only float arrays are read this way: 4-byte values are float32.
        let dtype = if std::mem::size_of::<T>() == 4 {
            "float32"
        } else {
            "float64"
        };
        let ndim = D::NDIM.map_or("N".to_owned(), |n| n.to_string());
        PyTypeError::new_err(format!(
            "{name} must be a {ndim}-D {dtype} array like the other float arrays"
        ))
    })
}

/// `typed` for an optional argument.
fn typed_opt<'py, T: Element, D: Dimension>(
    name: &str,
    array: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<numpy::PyReadonlyArray<'py, T, D>>> {
    array.map(|a| typed(name, a)).transpose()
}

// The Python entry points: float32 or float64 arrays, picked by `with_float!`; `mrm.ops`
// validates the arguments first and documents them.

#[pyfunction]
#[pyo3(signature = (w0, eta, support, support_offsets, query, query_offsets, init, max_iter, tol, weight_map, with_covariance, num_threads))]
#[allow(clippy::too_many_arguments)]
fn map_forward<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    eta: &Bound<'py, PyAny>,
    support: &Bound<'py, PyAny>,
    support_offsets: PyReadonlyArray1<'py, i64>,
    query: Option<&Bound<'py, PyAny>>,
    query_offsets: Option<PyReadonlyArray1<'py, i64>>,
    init: Option<&Bound<'py, PyAny>>,
    max_iter: usize,
    tol: f64,
    weight_map: &str,
    with_covariance: bool,
    num_threads: usize,
) -> PyResult<MapForward<'py>> {
    let settings = map_settings(max_iter, tol, weight_map)?;
    with_float!("support", support, T => {
        let (w0, support) = (typed::<T, IxDyn>("w0", w0)?, typed::<T, Ix2>("support", support)?);
        let query = typed_opt::<T, Ix2>("query", query)?;
        let query = query.as_ref().zip(query_offsets.as_ref());
        let inputs = inputs(py, num_threads, &w0, (&support, &support_offsets), query)?;
        let (eta, init) = (typed::<T, Ix1>("eta", eta)?, typed_opt::<T, Ix2>("init", init)?);
        map_forward_arrays(py, inputs, eta, init, settings, with_covariance)
    })
}

#[pyfunction]
#[pyo3(signature = (w0, eta, support, support_offsets, query, query_offsets, grad_losses, max_iter, tol, weight_map, num_threads, with_values=false))]
#[allow(clippy::too_many_arguments)]
fn map_backward<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    eta: &Bound<'py, PyAny>,
    support: &Bound<'py, PyAny>,
    support_offsets: PyReadonlyArray1<'py, i64>,
    query: &Bound<'py, PyAny>,
    query_offsets: PyReadonlyArray1<'py, i64>,
    grad_losses: &Bound<'py, PyAny>,
    max_iter: usize,
    tol: f64,
    weight_map: &str,
    num_threads: usize,
    with_values: bool,
) -> PyResult<(MapBackward<'py>, Option<MapForward<'py>>)> {
    let settings = map_settings(max_iter, tol, weight_map)?;
    with_float!("support", support, T => {
        let (w0, support) = (typed::<T, IxDyn>("w0", w0)?, typed::<T, Ix2>("support", support)?);
        let query = typed::<T, Ix2>("query", query)?;
        let inputs = inputs(py, num_threads, &w0, (&support, &support_offsets), (&query, &query_offsets))?;
        let (eta, grad_losses) = (typed::<T, Ix1>("eta", eta)?, typed::<T, Ix1>("grad_losses", grad_losses)?);
        map_backward_arrays(py, inputs, eta, grad_losses, settings, with_values)
    })
}

#[pyfunction]
#[pyo3(signature = (rows, offsets, weights, covariance, weight_map, num_threads))]
fn predictive<'py>(
    py: Python<'py>,
    rows: &Bound<'py, PyAny>,
    offsets: PyReadonlyArray1<'py, i64>,
    weights: &Bound<'py, PyAny>,
    covariance: Option<&Bound<'py, PyAny>>,
    weight_map: &str,
    num_threads: usize,
) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyAny>>)> {
    let settings = map_settings(1, 1.0, weight_map)?;
    let threads = pool(num_threads)?;
    with_float!("rows", rows, T => {
        let rows = typed::<T, Ix2>("features", rows)?;
        let rows = csr(py, "features", &rows, &offsets, &threads, false)?;
        let weights = typed::<T, Ix2>("weights", weights)?;
        let weights = slice("weights", &weights)?;
        let covariance = typed_opt::<T, Ix3>("covariance", covariance)?;
        let covariance = covariance.as_ref().map(|c| slice("covariance", c)).transpose()?;
        let mut mean = vec![T::ZERO; rows.n_rows()];
        let mut variance = covariance.map(|_| vec![T::ZERO; rows.n_rows()]);
        run(py, &threads, |ctl| {
            mrm_core::predictive(
                rows,
                weights,
                covariance,
                settings.weight_map,
                &mut mean,
                variance.as_deref_mut(),
                ctl,
            )
        })?;
        Ok((
            Array1::from_vec(mean).into_pyarray(py).into_any(),
            variance.map(|v| Array1::from_vec(v).into_pyarray(py).into_any()),
        ))
    })
}

#[pyfunction]
#[pyo3(signature = (w0, support, support_offsets, query, query_offsets, steps, lr, optimizer, beta1, beta2, eps, with_support_loss, num_threads))]
#[allow(clippy::too_many_arguments)]
fn forward<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    support: &Bound<'py, PyAny>,
    support_offsets: PyReadonlyArray1<'py, i64>,
    query: Option<&Bound<'py, PyAny>>,
    query_offsets: Option<PyReadonlyArray1<'py, i64>>,
    steps: usize,
    lr: f64,
    optimizer: &str,
    beta1: f64,
    beta2: f64,
    eps: f64,
    with_support_loss: bool,
    num_threads: usize,
) -> PyResult<Forward<'py>> {
    let inner = inner_loop(steps, lr, optimizer, beta1, beta2, eps)?;
    with_float!("support", support, T => {
        let (w0, support) = (typed::<T, IxDyn>("w0", w0)?, typed::<T, Ix2>("support", support)?);
        let query = typed_opt::<T, Ix2>("query", query)?;
        let query = query.as_ref().zip(query_offsets.as_ref());
        let inputs = inputs(py, num_threads, &w0, (&support, &support_offsets), query)?;
        forward_arrays(py, inputs, inner, with_support_loss)
    })
}

#[pyfunction]
#[pyo3(signature = (w0, support, support_offsets, query, query_offsets, grad_losses, steps, lr, optimizer, beta1, beta2, eps, first_order, num_threads, out=None, with_values=false))]
#[allow(clippy::too_many_arguments)]
fn backward<'py>(
    py: Python<'py>,
    w0: &Bound<'py, PyAny>,
    support: &Bound<'py, PyAny>,
    support_offsets: PyReadonlyArray1<'py, i64>,
    query: &Bound<'py, PyAny>,
    query_offsets: PyReadonlyArray1<'py, i64>,
    grad_losses: &Bound<'py, PyAny>,
    steps: usize,
    lr: f64,
    optimizer: &str,
    beta1: f64,
    beta2: f64,
    eps: f64,
    first_order: bool,
    num_threads: usize,
    out: Option<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)>,
    with_values: bool,
) -> PyResult<(Backward<'py>, Option<Forward<'py>>)> {
    let inner = inner_loop(steps, lr, optimizer, beta1, beta2, eps)?;
    with_float!("support", support, T => {
        let (w0, support) = (typed::<T, IxDyn>("w0", w0)?, typed::<T, Ix2>("support", support)?);
        let query = typed::<T, Ix2>("query", query)?;
        let inputs = inputs(py, num_threads, &w0, (&support, &support_offsets), (&query, &query_offsets))?;
        let grad_losses = typed::<T, Ix1>("grad_losses", grad_losses)?;
        let out: Option<BackwardOut<'py, T>> = match out {
            Some((gw, gs, gq)) => Some((gw.cast_into()?, gs.cast_into()?, gq.cast_into()?)),
            None => None,
        };
        backward_arrays(py, inputs, grad_losses, inner, first_order, out, with_values)
    })
}

#[pyfunction]
fn rpo<'py>(py: Python<'py>, losses: &Bound<'py, PyAny>, tail: f64, gamma: f64) -> PyResult<(f64, Bound<'py, PyAny>)> {
    with_float!("losses", losses, T => {
        let losses = typed::<T, Ix1>("losses", losses)?;
        let (objective, grad) = mrm_core::rpo(slice("losses", &losses)?, tail, gamma).py()?;
        Ok((objective.to_f64(), Array1::from_vec(grad).into_pyarray(py).into_any()))
    })
}

#[pyfunction]
fn score<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    feature_offsets: PyReadonlyArray1<'py, i64>,
    weights: &Bound<'py, PyAny>,
    num_threads: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let threads = pool(num_threads)?;
    with_float!("features", features, T => {
        let features = typed::<T, Ix2>("features", features)?;
        let features = csr(py, "features", &features, &feature_offsets, &threads, true)?;
        let weights = typed::<T, Ix2>("weights", weights)?;
        let weights = slice("weights", &weights)?;
        let mut rewards = vec![T::ZERO; features.n_rows()];
        run(py, &threads, |ctl| {
            mrm_core::score(features, weights, &mut rewards, ctl)
        })?;
        Ok(Array1::from_vec(rewards).into_pyarray(py).into_any())
    })
}

#[pyfunction]
fn pair_differences<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    chosen: PyReadonlyArray1<'py, i64>,
    rejected: PyReadonlyArray1<'py, i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let (c, r) = (slice("chosen", &chosen)?, slice("rejected", &rejected)?);
    with_float!("features", features, T => {
        let features = typed::<T, Ix2>("features", features)?;
        let k = features.shape()[1];
        let f = slice("features", &features)?;
        let mut out = vec![T::ZERO; c.len() * k];
        py.detach(|| mrm_core::pair_differences(f, k, c, r, &mut out)).py()?;
        Ok(matrix(out, c.len(), k)?.into_pyarray(py).into_any())
    })
}

#[pyfunction]
fn pair_differences_backward<'py>(
    py: Python<'py>,
    grad: &Bound<'py, PyAny>,
    chosen: PyReadonlyArray1<'py, i64>,
    rejected: PyReadonlyArray1<'py, i64>,
    n_rows: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let (c, r) = (slice("chosen", &chosen)?, slice("rejected", &rejected)?);
    with_float!("grad", grad, T => {
        let grad = typed::<T, Ix2>("grad", grad)?;
        let k = grad.shape()[1];
        let g = slice("grad", &grad)?;
        // Indices first (an error must not wait for a large allocation), then the size: an
        // impossible one is an error, never an abort.
        mrm_core::check_pairs(c, r, n_rows).py()?;
        let too_large = || {
            PyValueError::new_err(format!(
                "n_rows = {n_rows} is too large: cannot allocate the ({n_rows}, {k}) gradient"
            ))
        };
        let len = n_rows.checked_mul(k).ok_or_else(too_large)?;
        let mut out = Vec::new();
        out.try_reserve_exact(len).map_err(|_| too_large())?;
        out.resize(len, T::ZERO);
        py.detach(|| mrm_core::pair_differences_backward(g, k, c, r, &mut out))
            .py()?;
        Ok(matrix(out, n_rows, k)?.into_pyarray(py).into_any())
    })
}

/// Sets the output cache's limit in bytes (see `cache`); returns the bytes it still holds.
#[pyfunction]
fn set_output_cache_limit(py: Python<'_>, limit_bytes: usize) -> usize {
    cache::set_limit(py, limit_bytes)
}

/// The output cache's limit in bytes.
#[pyfunction]
fn output_cache_limit() -> usize {
    cache::limit()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_output_cache_limit, m)?)?;
    m.add_function(wrap_pyfunction!(output_cache_limit, m)?)?;
    for f in [
        wrap_pyfunction!(forward, m)?,
        wrap_pyfunction!(backward, m)?,
        wrap_pyfunction!(rpo, m)?,
        wrap_pyfunction!(score, m)?,
        wrap_pyfunction!(pair_differences, m)?,
        wrap_pyfunction!(pair_differences_backward, m)?,
        wrap_pyfunction!(map_forward, m)?,
        wrap_pyfunction!(map_backward, m)?,
        wrap_pyfunction!(predictive, m)?,
        wrap_pyfunction!(check_inner_loop, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_STEPS", mrm_core::MAX_STEPS)?;
    m.add("MAX_THREADS", MAX_THREADS)?;
    m.add("TRAJECTORY_BUDGET_BYTES", mrm_core::TRAJECTORY_BUDGET_BYTES)?;
    Ok(())
}
