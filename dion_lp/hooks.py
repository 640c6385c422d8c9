"""The public DDP hook module, ``dion_lp.hooks`` (its code lives in :mod:`dion_lp.ddp`).

``import dion_lp.hooks`` / ``from dion_lp.hooks import dion_hook`` work as in 0.1.0.
"""

from .ddp.hooks import *  # noqa: F403  (the public names, nothing else)
from .ddp.hooks import __all__  # noqa: F401
