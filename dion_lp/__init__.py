"""dion_lp: the Dion optimizer with 8-bit state and FP8/BF16 factor exchange.

The whole public API is declared here; every other module is internal.
"""

from . import hooks, quant
from .backward import StepInBackward, step_in_backward
from .checkpoint import dcp_state_dict, load_dcp_state_dict, upgrade_state_dict
from .dist.collectives import CollectiveError
from .gradients import NonFiniteGradientError
from .groups import param_groups
from .hooks import register_ddp
from .optimizer import Dion

__all__ = [
    "CollectiveError",
    "Dion",
    "NonFiniteGradientError",
    "StepInBackward",
    "dcp_state_dict",
    "hooks",
    "load_dcp_state_dict",
    "param_groups",
    "quant",
    "register_ddp",
    "step_in_backward",
    "upgrade_state_dict",
]
__version__ = "0.2.0.dev0"
