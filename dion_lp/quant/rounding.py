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

fp4_e2m1 (:func:`fp4_codes`): ``x / (absmax / 6)`` on the OCP e2m1 grid {0, 0.5,
1, 1.5, 2, 3, 4, 6} with a sign, as sign-magnitude nibbles (bit 3 the sign, bits
0-2 the grid index, which is the e2m1 bit pattern), packed like int4 and decoded
by :func:`unpack_fp4`. The grid is uniform on [0, 2], [2, 4] and [4, 6] (steps
0.5, 1, 2), so rounding is :func:`integer_levels` of the position within the
segment (the same random bits as int8), exactly unbiased when stochastic, ties to
the even index (the even mantissa) when nearest.
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
    "fp4_codes",
    "fp4_nibbles",
    "int4_codes",
    "int4_levels",
    "integer_levels",
    "pack_int4",
    "scaled_codes",
    "unpack_fp4",
    "unpack_int4",
]

INT8_MAX = 127.0
INT4_MAX = 7.0  # symmetric: -8 (nibble 0b1000) is never written
FP4_MAX = 6.0  # the largest e2m1 magnitude (index 7)
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


def fp4_nibbles(
    x: Tensor,  # (R, C) fp32: R blocks of C elements
    absmax: Tensor,  # (R,) fp32, finite
    stochastic: bool,
    key: Tensor | None,  # (3,) int64; base = global index of x[0, 0]
) -> tuple[Tensor, Tensor]:
    """(nibbles (R, C) int32 in [0, 15], scales (R,) fp32) of one fp4_e2m1 block per row.

    ``scale = absmax / 6``; ``a = |x| / scale`` lies in the segment [0, 2) (step 0.5,
    indices 0-4), [2, 4) (step 1, indices 4-6) or [4, 6] (step 2, indices 6-7); the
    index is the segment's first index plus the rounded position ``(a - start) /
    step`` (nearest even, or stochastic with int8's random bits). The sign bit is
    set only on a non-zero index, so zero is always nibble 0; a zero block keeps
    scale 0 and zero nibbles.
    """
    scales = absmax / FP4_MAX
    y = x / torch.where(scales > 0, scales, 1.0)[:, None]
    a = y.abs().clamp(max=FP4_MAX)
    start = torch.where(a < 2.0, 0.0, torch.where(a < 4.0, 2.0, 4.0))
    step = torch.where(a < 2.0, 0.5, start * 0.5)  # 0.5, 1, 2
    first = torch.where(a < 2.0, 0, torch.where(a < 4.0, 4, 6))
    index = first + integer_levels((a - start) / step, stochastic, key)
    sign = torch.where((y < 0) & (index > 0), 8, 0)
    return index | sign, scales


def fp4_codes(
    x: Tensor, absmax: Tensor, stochastic: bool, key: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(packed codes (R, C // 2) uint8, scales (R,) fp32) of ``x`` (R, C), C even:
    :func:`fp4_nibbles` packed by :func:`pack_int4`."""
    nibbles, scales = fp4_nibbles(x, absmax, stochastic, key)
    return pack_int4(nibbles), scales


def unpack_fp4(packed: Tensor) -> Tensor:
    """(R, 2 C) fp32 e2m1 values in [-6, 6] of ``packed`` (R, C) uint8 (:func:`fp4_codes`).

    Index ``e m`` (two exponent bits, one mantissa bit): ``m / 2`` when ``e == 0``,
    else ``2**(e - 1) * (1 + m / 2)``.
    """
    v = packed.to(torch.int32)
    nibbles = torch.stack((v & 15, v >> 4), dim=-1).reshape(packed.shape[0], -1)
    e, m = (nibbles >> 1) & 3, (nibbles & 1).float()
    magnitude = torch.where(e == 0, 0.5 * m, torch.exp2((e - 1).float()) * (1.0 + 0.5 * m))
    return torch.where(nibbles >= 8, -magnitude, magnitude)
