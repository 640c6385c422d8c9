"""Number formats and codecs: the registry (:mod:`.formats`), pure-function codecs
(:mod:`.codecs`), the quantized state buffer (:mod:`.buffer`) and the random bits of
stochastic rounding (:mod:`.rng`).

The public surface is the codecs' (``quantize`` / ``dequantize`` and the low-level
``encode_`` / ``decode``) and the format registry.
"""

from .codecs import (
    QuantizedTensor,
    bytes_per_element,
    check_block_size,
    check_format,
    code_dtype,
    decode,
    dequantize,
    dynamic_map,
    encode_,
    encoded_nbytes,
    quantize,
    scale_count,
)
from .formats import FORMATS, MOMENTUM_FORMATS, SCALED_FORMATS, WIRE_FORMATS

__all__ = [
    "FORMATS",
    "MOMENTUM_FORMATS",
    "SCALED_FORMATS",
    "WIRE_FORMATS",
    "QuantizedTensor",
    "bytes_per_element",
    "check_block_size",
    "check_format",
    "code_dtype",
    "decode",
    "dequantize",
    "dynamic_map",
    "encode_",
    "encoded_nbytes",
    "quantize",
    "scale_count",
]
