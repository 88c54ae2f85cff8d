"""Type stubs of the native module (see mrm.ops for the documented API)."""

from typing import Optional, Tuple, TypeVar

import numpy as np
import numpy.typing as npt

__version__: str
MAX_STEPS: int
MAX_THREADS: int
TRAJECTORY_BUDGET_BYTES: int

# Every kernel takes float32 or float64 arrays, all of one dtype (the kernels for it are picked
# at run time), and returns arrays of that dtype. _I64: CSR offsets (U + 1,) and pair indices.
_F = TypeVar("_F", npt.NDArray[np.float32], npt.NDArray[np.float64])
_I64 = npt.NDArray[np.int64]

def forward(
    w0: _F, support: _F, support_offsets: _I64, query: Optional[_F], query_offsets: Optional[_I64],
    steps: int, lr: float, optimizer: str, beta1: float, beta2: float, eps: float, with_support_loss: bool,
    num_threads: int,
) -> Tuple[_F, Optional[_F], Optional[_F], Optional[_F]]: ...
def backward(
    w0: _F, support: _F, support_offsets: _I64, query: _F, query_offsets: _I64, grad_losses: _F,
    steps: int, lr: float, optimizer: str, beta1: float, beta2: float, eps: float, first_order: bool, num_threads: int,
    out: Optional[Tuple[_F, _F, _F]] = None, with_values: bool = False,
) -> Tuple[Tuple[_F, _F, _F], Optional[Tuple[_F, _F, _F, _F]]]: ...
def rpo(losses: _F, tail: float, gamma: float) -> Tuple[float, _F]: ...
def score(features: _F, feature_offsets: _I64, weights: _F, num_threads: int) -> _F: ...
def pair_differences(features: _F, chosen: _I64, rejected: _I64) -> _F: ...
def pair_differences_backward(grad: _F, chosen: _I64, rejected: _I64, n_rows: int) -> _F: ...
def set_output_cache_limit(limit_bytes: int) -> int: ...
def output_cache_limit() -> int: ...

# MAP adaptation (SPEC §7); `mrm.ops.map_adapt`, `meta_backward(inner=InnerLoop("map"))`, `predict`.
def check_inner_loop(optimizer: str, steps: int, lr: float, beta1: float, beta2: float, eps: float, max_iter: int,
                     tol: float, weight_map: str) -> None: ...
def map_forward(w0: _F, eta: _F, support: _F, support_offsets: _I64, query: Optional[_F],
                query_offsets: Optional[_I64], init: Optional[_F], max_iter: int, tol: float, weight_map: str,
                with_covariance: bool, num_threads: int) -> tuple: ...
def map_backward(w0: _F, eta: _F, support: _F, support_offsets: _I64, query: _F, query_offsets: _I64,
                 grad_losses: _F, max_iter: int, tol: float, weight_map: str, num_threads: int,
                 with_values: bool = False) -> tuple: ...
def predictive(rows: _F, offsets: _I64, weights: _F, covariance: Optional[_F], weight_map: str,
               num_threads: int) -> Tuple[_F, Optional[_F]]: ...
