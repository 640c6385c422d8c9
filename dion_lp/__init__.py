"""dion_lp: the Dion optimizer with 8-bit state and FP8/BF16 factor exchange."""

from . import hooks, quant
from .comm import CollectiveError
from .dion import Dion, NonFiniteGradientError
from .groups import param_groups
from .hooks import register_ddp

__all__ = [
    "CollectiveError",
    "Dion",
    "NonFiniteGradientError",
    "hooks",
    "param_groups",
    "quant",
    "register_ddp",
]
__version__ = "0.1.0"
