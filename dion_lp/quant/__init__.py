"""Number formats and codecs: the registry (:mod:`.formats`), pure-function codecs
(:mod:`.codecs`), the rounding of each format (:mod:`.rounding`) and its compiled
kernels (:mod:`.kernels`), the quantized state buffer (:mod:`.buffer`) and the
counter-based random bits of stochastic rounding (:mod:`.rng`).

The public surface is the codecs' (``quantize`` / ``dequantize`` and the low-level
``encode_`` / ``decode``) and the format registry's names.
"""

from . import codecs
from .codecs import *  # noqa: F403  (exactly codecs.__all__)
from .formats import MOMENTUM_FORMATS, WIRE_FORMATS

__all__ = [*codecs.__all__, "MOMENTUM_FORMATS", "WIRE_FORMATS"]
