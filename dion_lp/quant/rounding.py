"""The rounding of each format, as pure tensor functions that ``torch.compile`` fuses.

Every function here takes fp32 values and returns codes; random bits come from
:mod:`dion_lp.quant.rng` (a pure function of the key and each element's global
index), so the same code runs eagerly, as Inductor's vectorised C++ on a CPU and
as Triton on CUDA, with the same results. :mod:`dion_lp.quant.kernels` compiles
them; :mod:`dion_lp.quant.codecs` calls them.

Stochastic rounding is exactly unbiased for bf16 (16 random bits below its
mantissa) and for fp8 on normals (20 / 21 bits); int8 and int4 add 23 random bits
to a fixed-point value with 23 fraction bits (:func:`integer_levels`, the same
bits for both: a bias under 2^-23 of a step); fp8 subnormals are shifted into the
lowest normal binade first (a bias under 2^-20 of a grid step).

int4 (:func:`int4_codes`): levels in [-7, 7] of ``x / (absmax / 7)``, packed two
per byte by :func:`pack_int4` (element ``2 j`` in the low nibble of byte ``j``,
two's complement) and unpacked by :func:`unpack_int4`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .formats import REGISTRY
from .rng import element_bits

__all__ = [
    "FP8_GRIDS",
    "INT4_MAX",
    "Fp8Grid",
    "bf16_codes",
    "bf16_rounded_bits",
    "int4_codes",
    "int4_levels",
    "integer_levels",
    "pack_int4",
    "scaled_codes",
    "unpack_int4",
]

INT8_MAX = 127.0
INT4_MAX = 7.0  # symmetric: -8 (nibble 0b1000) is never written
_INT8_FRACTION_BITS = 23  # stochastic int8: fixed point, 127 * 2**23 < 2**31
_BF16_MAX = torch.finfo(torch.bfloat16).max
_BF16_MAX_BITS = 0x7F7F0000  # its fp32 bit pattern


@dataclass(frozen=True)
class Fp8Grid:
    """Layout of an fp8 format: ``max`` finite value, mantissa bits, min normal exponent."""

    max: float
    mantissa_bits: int
    min_exponent: int


FP8_GRIDS = {
    "fp8_e4m3": Fp8Grid(max=448.0, mantissa_bits=3, min_exponent=-6),
    "fp8_e5m2": Fp8Grid(max=57344.0, mantissa_bits=2, min_exponent=-14),
}


def bf16_codes(x: Tensor, stochastic: bool, key: Tensor | None) -> Tensor:
    """bf16 codes of finite fp32 ``x`` (R, C); saturates at the bf16 max.

    Stochastic: :func:`bf16_rounded_bits` on the bit pattern, then an exact cast.
    """
    if stochastic:
        return bf16_rounded_bits(x.view(torch.int32), key).view(torch.float32).to(torch.bfloat16)
    return x.clamp(-_BF16_MAX, _BF16_MAX).to(torch.bfloat16)


def bf16_rounded_bits(bits: Tensor, key: Tensor | None) -> Tensor:
    """Stochastic rounding to bf16 on fp32 bit patterns (int32 in, int32 out), integers only.

    Add 16 random bits below the bf16 mantissa of the magnitude and truncate them:
    the sign-magnitude layout makes this round the magnitude up with probability
    (distance to the lower bf16) / (bf16 ulp). Magnitudes above the bf16 max are
    first clamped to it (saturation). The result has its low 16 bits zero, so its
    cast to bf16 is exact. Integer-only, because Inductor does not vectorise a
    bitcast inside a kernel on a CPU (the bitcasts are free views outside it): 2x
    faster here than the same rounding with the bitcast inside.
    """
    noise = (element_bits(bits.shape, key) & 0xFFFF).to(torch.int32)
    magnitude = torch.clamp(bits & 0x7FFFFFFF, max=_BF16_MAX_BITS)
    return ((magnitude + noise) & -65536) | (bits & -(2**31))


def scaled_codes(
    x: Tensor,  # (R, C) fp32: R blocks of C elements
    absmax: Tensor,  # (R,) fp32, finite
    fmt: str,  # "int8", "fp8_e4m3" or "fp8_e5m2"
    stochastic: bool,
    key: Tensor | None,  # (3,) int64, see rng.key_tensor; base = global index of x[0, 0]
) -> tuple[Tensor, Tensor]:
    """(codes (R, C) in fmt's code dtype, scales (R,) fp32) of one block per row of ``x``.

    ``scale = absmax / max(fmt)``; codes round ``x / scale`` (nearest even, or
    stochastically); a zero block keeps scale 0 and zero codes.
    """
    top = INT8_MAX if fmt == "int8" else FP8_GRIDS[fmt].max
    scales = absmax / top
    y = x / torch.where(scales > 0, scales, 1.0)[:, None]
    y = y.clamp(-top, top)
    if fmt == "int8":
        return integer_levels(y, stochastic, key).to(torch.int8), scales
    if stochastic:
        y = _fp8_round_stochastic(y, FP8_GRIDS[fmt], key)
    return y.to(REGISTRY[fmt].code_dtype), scales  # exact after SR; nearest-even otherwise


def _fp8_round_stochastic(y: Tensor, grid: Fp8Grid, key: Tensor | None) -> Tensor:
    """Stochastic rounding of fp32 ``y`` (|y| <= grid.max) onto the fp8 grid, exactly.

    Normal range: an fp8 value is an fp32 whose low ``23 - mantissa_bits`` bits are
    zero, so adding that many random bits to the bit pattern of |y| and clearing
    them rounds the magnitude up with probability (|y| - lo) / (hi - lo), the
    carry stepping into the next binade where it must. Subnormals are spaced like
    the min normal binade: |y| below 2**min_exponent is shifted into that binade by
    adding 2**min_exponent, rounded there, and shifted back (exact).
    """
    drop = 23 - grid.mantissa_bits
    offset = 2.0**grid.min_exponent
    a = y.abs()
    shift = torch.where(a < offset, offset, 0.0)
    noise = (element_bits(y.shape, key) & ((1 << drop) - 1)).to(torch.int32)
    bits = ((a + shift).view(torch.int32) + noise) & -(1 << drop)
    return (bits.view(torch.float32) - shift).copysign(y)


def integer_levels(y: Tensor, stochastic: bool, key: Tensor | None) -> Tensor:
    """(R, C) int32 integers rounded from fp32 ``y`` (R, C), ``|y| <= 127``.

    Nearest: ties to even. Stochastic: fixed point with 23 fraction bits (|y| <= 127
    fits an int32); adding 23 random bits (:func:`dion_lp.quant.rng.element_bits`,
    element (i, j) the bits of global index ``key[2] + i C + j``) and shifting them
    out (a floor, also for negatives) rounds up with probability frac(y).
    """
    if not stochastic:
        return y.round().to(torch.int32)
    fixed = (y * 2.0**_INT8_FRACTION_BITS).to(torch.int32)
    noise = (element_bits(y.shape, key) & ((1 << _INT8_FRACTION_BITS) - 1)).to(torch.int32)
    return (fixed + noise) >> _INT8_FRACTION_BITS


def int4_levels(
    x: Tensor,  # (R, C) fp32: R blocks of C elements
    absmax: Tensor,  # (R,) fp32, finite
    stochastic: bool,
    key: Tensor | None,  # (3,) int64; base = global index of x[0, 0]
) -> tuple[Tensor, Tensor]:
    """(levels (R, C) int32 in [-7, 7], scales (R,) fp32) of one int4 block per row of ``x``.

    ``scale = absmax / 7``; levels round ``x / scale`` like int8's codes (the same
    random bits); a zero block keeps scale 0 and zero levels.
    """
    scales = absmax / INT4_MAX
    y = x / torch.where(scales > 0, scales, 1.0)[:, None]
    return integer_levels(y.clamp(-INT4_MAX, INT4_MAX), stochastic, key), scales


def pack_int4(levels: Tensor) -> Tensor:
    """(R, C // 2) uint8 of int ``levels`` (R, C), C even, in [-8, 7]: two nibbles a byte.

    Element ``2 j`` of a row goes to the low nibble of byte ``j``, ``2 j + 1`` to the
    high one, each in two's complement (so byte 0 is two zeros).
    """
    pairs = levels.reshape(levels.shape[0], -1, 2)
    return ((pairs[..., 0] & 15) | ((pairs[..., 1] & 15) << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """(R, 2 C) int32 levels in [-8, 7] of ``packed`` (R, C) uint8: :func:`pack_int4` undone."""
    v = packed.to(torch.int32)
    low, high = ((v & 15) ^ 8) - 8, ((v >> 4) ^ 8) - 8  # sign-extend each nibble
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def int4_codes(
    x: Tensor, absmax: Tensor, stochastic: bool, key: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(packed codes (R, C // 2) uint8, scales (R,) fp32) of ``x`` (R, C), C even.

    :func:`int4_levels` then :func:`pack_int4`; arguments as for :func:`int4_levels`.
    """
    levels, scales = int4_levels(x, absmax, stochastic, key)
    return pack_int4(levels), scales
