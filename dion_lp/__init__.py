"""dion_lp: the Dion optimizer with 8-bit state and FP8/BF16 factor exchange."""

from . import quant
from .dion import Dion, NonFiniteGradientError
from .groups import param_groups

__all__ = ["Dion", "NonFiniteGradientError", "param_groups", "quant"]
__version__ = "0.1.0"
