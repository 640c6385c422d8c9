"""The public DDP hook module, ``dion_lp.hooks`` (its code lives in :mod:`dion_lp.ddp`).

``import dion_lp.hooks`` / ``from dion_lp.hooks import dion_hook`` work as in 0.1.0.
"""

from .ddp.hooks import (
    HOOK_STATE_VERSION,
    CompressState,
    DionHookState,
    compress_hook,
    compress_wrapper,
    dion_hook,
    register_ddp,
)

__all__ = [
    "HOOK_STATE_VERSION",
    "CompressState",
    "DionHookState",
    "compress_hook",
    "compress_wrapper",
    "dion_hook",
    "register_ddp",
]
