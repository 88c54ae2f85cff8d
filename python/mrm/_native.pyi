"""Type stubs of the native module (see mrm.ops for the documented API)."""

from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt

__version__: str
MAX_STEPS: int
MAX_THREADS: int
TRAJECTORY_BUDGET_BYTES: int

def forward_f32(
    w0: npt.NDArray[np.float32], support: npt.NDArray[np.float32], support_offsets: npt.NDArray[np.int64],
    query: Optional[npt.NDArray[np.float32]], query_offsets: Optional[npt.NDArray[np.int64]], steps: int,
    lr: float, optimizer: str, beta1: float, beta2: float, eps: float, with_support_loss: bool, num_threads: int,
) -> Tuple[npt.NDArray[np.float32], Optional[npt.NDArray[np.float32]], Optional[npt.NDArray[np.float32]], Optional[npt.NDArray[np.float32]]]: ...
def forward_f64(
    w0: npt.NDArray[np.float64], support: npt.NDArray[np.float64], support_offsets: npt.NDArray[np.int64],
    query: Optional[npt.NDArray[np.float64]], query_offsets: Optional[npt.NDArray[np.int64]], steps: int,
    lr: float, optimizer: str, beta1: float, beta2: float, eps: float, with_support_loss: bool, num_threads: int,
) -> Tuple[npt.NDArray[np.float64], Optional[npt.NDArray[np.float64]], Optional[npt.NDArray[np.float64]], Optional[npt.NDArray[np.float64]]]: ...
def backward_f32(
    w0: npt.NDArray[np.float32], support: npt.NDArray[np.float32], support_offsets: npt.NDArray[np.int64],
    query: npt.NDArray[np.float32], query_offsets: npt.NDArray[np.int64], grad_losses: npt.NDArray[np.float32],
    steps: int, lr: float, optimizer: str, beta1: float, beta2: float, eps: float, first_order: bool, num_threads: int,
    out: Optional[Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]] = None,
    with_values: bool = False,
) -> Tuple[
    Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]],
    Optional[Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]],
]: ...
def backward_f64(
    w0: npt.NDArray[np.float64], support: npt.NDArray[np.float64], support_offsets: npt.NDArray[np.int64],
    query: npt.NDArray[np.float64], query_offsets: npt.NDArray[np.int64], grad_losses: npt.NDArray[np.float64],
    steps: int, lr: float, optimizer: str, beta1: float, beta2: float, eps: float, first_order: bool, num_threads: int,
    out: Optional[Tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]] = None,
    with_values: bool = False,
) -> Tuple[
    Tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]],
    Optional[Tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]],
]: ...
def rpo_f32(losses: npt.NDArray[np.float32], tail: float, gamma: float) -> Tuple[float, npt.NDArray[np.float32]]: ...
def rpo_f64(losses: npt.NDArray[np.float64], tail: float, gamma: float) -> Tuple[float, npt.NDArray[np.float64]]: ...
def score_f32(
    features: npt.NDArray[np.float32], feature_offsets: npt.NDArray[np.int64], weights: npt.NDArray[np.float32], num_threads: int
) -> npt.NDArray[np.float32]: ...
def score_f64(
    features: npt.NDArray[np.float64], feature_offsets: npt.NDArray[np.int64], weights: npt.NDArray[np.float64], num_threads: int
) -> npt.NDArray[np.float64]: ...
def pair_differences_f32(
    features: npt.NDArray[np.float32], chosen: npt.NDArray[np.int64], rejected: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]: ...
def pair_differences_backward_f32(
    grad: npt.NDArray[np.float32], chosen: npt.NDArray[np.int64], rejected: npt.NDArray[np.int64], n_rows: int
) -> npt.NDArray[np.float32]: ...
def pair_differences_f64(
    features: npt.NDArray[np.float64], chosen: npt.NDArray[np.int64], rejected: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]: ...
def pair_differences_backward_f64(
    grad: npt.NDArray[np.float64], chosen: npt.NDArray[np.int64], rejected: npt.NDArray[np.int64], n_rows: int
) -> npt.NDArray[np.float64]: ...
def set_output_cache_limit(limit_bytes: int) -> int: ...
def output_cache_limit() -> int: ...

# MAP adaptation (SPEC §7); `mrm.ops.map_adapt`, `meta_backward(inner=InnerLoop("map"))`, `predict`.
def check_inner_loop(optimizer: str, steps: int, lr: float, beta1: float, beta2: float, eps: float, max_iter: int,
                     tol: float, weight_map: str) -> None: ...
def map_forward_f32(w0: np.ndarray, eta: np.ndarray, support: np.ndarray, support_offsets: np.ndarray,
                    query: Optional[np.ndarray], query_offsets: Optional[np.ndarray], init: Optional[np.ndarray],
                    max_iter: int, tol: float, weight_map: str, with_covariance: bool, num_threads: int) -> tuple: ...
def map_forward_f64(w0: np.ndarray, eta: np.ndarray, support: np.ndarray, support_offsets: np.ndarray,
                    query: Optional[np.ndarray], query_offsets: Optional[np.ndarray], init: Optional[np.ndarray],
                    max_iter: int, tol: float, weight_map: str, with_covariance: bool, num_threads: int) -> tuple: ...
def map_backward_f32(w0: np.ndarray, eta: np.ndarray, support: np.ndarray, support_offsets: np.ndarray,
                     query: np.ndarray, query_offsets: np.ndarray, grad_losses: np.ndarray, max_iter: int, tol: float,
                     weight_map: str, num_threads: int, with_values: bool = False) -> tuple: ...
def map_backward_f64(w0: np.ndarray, eta: np.ndarray, support: np.ndarray, support_offsets: np.ndarray,
                     query: np.ndarray, query_offsets: np.ndarray, grad_losses: np.ndarray, max_iter: int, tol: float,
                     weight_map: str, num_threads: int, with_values: bool = False) -> tuple: ...
def predictive_f32(rows: np.ndarray, offsets: np.ndarray, weights: np.ndarray, covariance: Optional[np.ndarray],
                   weight_map: str, num_threads: int) -> Tuple[np.ndarray, Optional[np.ndarray]]: ...
def predictive_f64(rows: np.ndarray, offsets: np.ndarray, weights: np.ndarray, covariance: Optional[np.ndarray],
                   weight_map: str, num_threads: int) -> Tuple[np.ndarray, Optional[np.ndarray]]: ...
