"""mrm-fast: personalized reward models with Meta Reward Modeling.

`mrm.ops` is the numpy API over the native kernels (no torch needed).
"""

from mrm import ops
from mrm._native import __version__

__all__ = ["ops", "__version__"]
