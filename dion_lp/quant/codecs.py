"""Codecs for low-precision state and communication: pure functions, one interface.

Every format turns a float tensor into ``codes`` (one per element, no padding;
int4 packs two a byte) and, for the scaled formats, one float32 ``scale`` per
block of ``block_size`` consecutive elements of the flattened tensor (the last
block may be short).

=============  ==================  ===================  ==============================
format         codes dtype         scale per block      decoded value
=============  ==================  ===================  ==============================
``fp32``       float32             none                 ``code``
``bf16``       bfloat16            none                 ``code``
``int8``       int8 in [-127,127]  ``absmax / 127``     ``code * scale``
``fp8_e4m3``   float8_e4m3fn       ``absmax / 448``     ``code * scale``
``fp8_e5m2``   float8_e5m2         ``absmax / 57344``   ``code * scale``
``dynamic8``   uint8               ``absmax``           ``dynamic_map(True)[code] * scale``
``udynamic8``  uint8               ``absmax``           ``dynamic_map(False)[code] * scale``
``int4``       2 per uint8, [-7,7] ``absmax / 7``       ``code * scale`` (:mod:`.int4`)
=============  ==================  ===================  ==============================

Rounding is to nearest (ties to even for the float formats and int8, ties to
the lower code for the dynamic codebooks, as bitsandbytes does) or stochastic:
the two representable neighbours of a value are chosen with probability
proportional to the distance to the other one, so the expected decoded value
is the input (unbiased), exactly representable values never move and zeros
stay zeros. Values beyond a format's range saturate to its largest finite
value; they never become inf or NaN. The one exception to unbiasedness is the
signed dynamic codebook, whose most negative entry is -0.99297 and not -1: a
value in [-absmax, -0.99297 absmax) always rounds to that entry (as in
bitsandbytes).

Stochastic rounding takes counter-based random bits (:mod:`dion_lp.quant.rng`):
element i rounds with ``hash32(key, base + i)``. The optimizer passes the key of
each write; :func:`quantize` draws one from ``generator`` (torch's default
generator when None), so the same generator state gives the same codes. bf16 adds
16 random bits (exactly unbiased) and fp8 adds 20 (e4m3) or 21 (e5m2) the same
way (exactly unbiased on normals, under 2^-20 of a step on subnormals); int8
and int4 add 23 random bits to a fixed-point value with 23 fraction bits (a bias
under 2^-23 of a step); the dynamic codebooks compare 31 random bits with the
fraction of the grid step (under 2^-24 of a step).

Normalisation: int8, int4 and fp8 divide by the scale (``y = x / scale``); the
dynamic codebooks multiply by ``1 / absmax`` and clamp to [-1, 1], as
bitsandbytes does. A block whose absmax is below ~1e-36 gets an fp32
subnormal scale and loses relative precision (such values are zero for any
optimizer purpose); an all-zero block stores scale 0 and decodes to zeros.

Everything is computed in float32 with whole-tensor operations; the int8, int4
(rounding and packing), fp8 and bf16 rounding runs as one fused kernel
(:mod:`dion_lp.quant.kernels`). The only Python-level branching is per call (at
most two pieces per tensor: the full blocks and a short tail block).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import int4, kernels
from .codebook import codebook_index, dynamic_map, encode_dynamic
from .formats import FORMATS, REGISTRY, SCALE_NBYTES, SCALED_FORMATS
from .rng import key_tensor

# Elements per chunk of the eager codebook codec (bounds its temporaries).
EAGER_CHUNK = 2**16

__all__ = [
    "FORMATS",
    "SCALED_FORMATS",
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


# ---------------------------------------------------------------- validation
def check_format(fmt: str, allowed: Sequence[str] = FORMATS, name: str = "fmt") -> str:
    """Return ``fmt`` if it is one of ``allowed``, else raise a ``ValueError`` naming ``name``."""
    if not isinstance(fmt, str) or fmt not in allowed:
        raise ValueError(f"Invalid {name}: {fmt!r}; expected one of {tuple(allowed)}")
    return fmt


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is an integer >= 1, else raise a ``ValueError``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"Invalid block_size: {block_size!r}; expected an integer >= 1")
    return block_size


# --------------------------------------------------------------------- sizes
def code_dtype(fmt: str) -> torch.dtype:
    """The dtype in which ``fmt`` stores its codes (e.g. ``torch.float8_e4m3fn``)."""
    return REGISTRY[check_format(fmt)].code_dtype


def bytes_per_element(fmt: str) -> int:
    """Bytes of one code of ``fmt`` (4, 2, 1, or 0.5 for int4), scales not included."""
    return REGISTRY[check_format(fmt)].bytes_per_element


def scale_count(numel: int, block_size: int, fmt: str) -> int:
    """Number of float32 scales of ``numel`` elements: ``ceil(numel / block_size)``, or 0.

    Args:
        numel: elements encoded.
        block_size: elements per scale.
        fmt: a format of :data:`FORMATS`; fp32 and bf16 have no scales.
    """
    check_block_size(block_size)
    if check_format(fmt) not in SCALED_FORMATS:
        return 0
    return -(-numel // block_size)


def encoded_nbytes(numel: int, fmt: str, block_size: int) -> int:
    """Exact bytes of ``numel`` encoded elements: codes plus float32 scales.

    Args:
        numel: elements encoded.
        fmt: a format of :data:`FORMATS`.
        block_size: elements per scale.
    """
    codes = REGISTRY[check_format(fmt)].code_nbytes(numel)
    return codes + SCALE_NBYTES * scale_count(numel, block_size, fmt)


# ------------------------------------------------------------ public surface
@dataclass
class QuantizedTensor:
    """A tensor in a low-precision format: flat codes plus per-block scales.

    Attributes:
        codes: (numel,) codes in :func:`code_dtype` of ``fmt`` (int4: ``ceil(numel / 2)``
            bytes, two codes a byte).
        scales: (ceil(numel / block_size),) float32 scales, or None for fp32 / bf16.
        fmt: one of :data:`FORMATS`.
        shape: shape of the quantized tensor.
        dtype: dtype of the quantized tensor (dequantize returns float32 regardless).
        block_size: elements per scale.
    """

    codes: Tensor
    scales: Tensor | None
    fmt: str
    shape: torch.Size
    dtype: torch.dtype
    block_size: int

    @property
    def nbytes(self) -> int:
        """Exact bytes held by ``codes`` and ``scales``."""
        total = self.codes.numel() * self.codes.element_size()
        if self.scales is not None:
            total += self.scales.numel() * self.scales.element_size()
        return total


def quantize(
    x: Tensor,
    fmt: str,
    *,
    block_size: int = 256,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Encode ``x`` in ``fmt``; new tensors, ``x`` is not modified.

    Args:
        x: float tensor of any shape (flattened in row-major order into blocks).
        fmt: one of :data:`FORMATS`.
        block_size: elements per scale (8-bit formats); must be >= 1.
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        generator: draws the stream key of stochastic rounding (on ``x.device``);
            None draws it from torch's global generator.

    Raises:
        ValueError: invalid ``fmt`` or ``block_size``, NaN/Inf in ``x``, or a
            negative value with ``udynamic8``.
    """
    check_format(fmt)
    check_block_size(block_size)
    flat = x.detach().reshape(-1)
    info = REGISTRY[fmt]
    codes = torch.empty(info.code_count(flat.numel()), dtype=info.code_dtype, device=x.device)
    count = scale_count(flat.numel(), block_size, fmt)
    scales = (
        torch.empty(count, dtype=torch.float32, device=x.device) if fmt in SCALED_FORMATS else None
    )
    encode_(flat, codes, scales, fmt, block_size, stochastic, generator)
    return QuantizedTensor(codes, scales, fmt, x.shape, x.dtype, block_size)


def dequantize(q: QuantizedTensor) -> Tensor:
    """Decode ``q`` into a new float32 tensor of shape ``q.shape`` on the device of ``q.codes``."""
    numel = math.prod(q.shape)
    out = torch.empty(numel, dtype=torch.float32, device=q.codes.device)
    decode(q.codes, q.scales, q.fmt, q.block_size, numel, out=out)
    return out.view(q.shape)


# --------------------------------------------------------------- low level
def _as_codes(codes: Tensor, fmt: str) -> Tensor:
    """``codes`` viewed in the code dtype of ``fmt`` (e.g. a uint8 wire buffer of fp8 codes)."""
    want = REGISTRY[fmt].code_dtype
    return codes if codes.dtype == want else codes.view(want)


def _checked_scales(scales: Tensor | None, count: int, name: str) -> Tensor:
    """``scales`` as a flat float32 tensor of ``count`` elements, or a ValueError naming it."""
    if scales is None or scales.numel() != count or scales.dtype != torch.float32:
        got = "None" if scales is None else f"{scales.numel()} {scales.dtype}"
        raise ValueError(f"Invalid {name}: {got}; expected {count} float32 scales")
    return scales.view(-1)


def _draw_key(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A fresh stream key drawn from ``generator`` (torch's default one when None)."""
    words = torch.randint(0, 2**62, (1,), generator=generator, device=device)
    return key_tensor(int(words.item()), 0, device)


def encode_(
    x: Tensor,
    codes_out: Tensor,
    scales_out: Tensor | None,
    fmt: str,
    block_size: int,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    *,
    key: Tensor | None = None,
) -> None:
    """Encode ``x`` into preallocated ``codes_out`` / ``scales_out`` (in place).

    Args:
        x: (numel,) float tensor (flattened if not 1-D; computed in float32).
        codes_out: (numel,) buffer in :func:`code_dtype` of ``fmt`` (int4: ``ceil(numel
            / 2)`` bytes), or any contiguous buffer of the same bytes, viewed as such.
        scales_out: (scale_count(numel, block_size, fmt),) float32 buffer; None
            (or ignored) for fp32 / bf16.
        fmt: one of :data:`FORMATS`.
        block_size: elements per scale; must be >= 1.
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        generator: draws the stream key of stochastic rounding when ``key`` is None
            (torch's default generator when both are None).
        key: (3,) int64 stream key (:func:`dion_lp.quant.rng.key_tensor`): element i
            of ``x`` rounds with the bits of global index ``key[2] + i``.

    Raises:
        ValueError: invalid arguments, buffer sizes, NaN/Inf in ``x``, or a
            negative value with ``udynamic8``.
    """
    check_format(fmt)
    check_block_size(block_size)
    x = x.detach().reshape(-1).to(torch.float32)
    n = x.numel()
    codes = _as_codes(codes_out, fmt).view(-1)
    if codes.numel() != REGISTRY[fmt].code_count(n):
        raise ValueError(f"Invalid codes_out: {codes.numel()} codes for {n} elements of {fmt}")
    if stochastic and key is None and fmt != "fp32":
        key = _draw_key(generator, x.device)
    if fmt not in SCALED_FORMATS:
        if n and not all_finite(x):
            raise ValueError(f"Invalid x: cannot encode NaN or Inf in {fmt}")
        if fmt == "fp32":
            codes.copy_(x)
        else:
            C = 256 if n % 256 == 0 else n
            kernels.encode_bf16_(x.view(-1, C), codes.view(-1, C), stochastic, key)
        return
    scales = _checked_scales(scales_out, scale_count(n, block_size, fmt), "scales_out")
    if n == 0:
        return
    encode_blocks_(x, codes, scales, fmt, block_size, stochastic, key)


def encode_blocks_(
    x: Tensor,  # (n,) fp32
    codes: Tensor,  # (n,) in fmt's code dtype (int4: ceil(n / 2) bytes)
    scales: Tensor,  # (ceil(n / block_size),) fp32
    fmt: str,
    block_size: int,
    stochastic: bool,
    key: Tensor | None,
) -> None:
    """Blocks of a scaled format: absmax checked first, then one fused kernel per run."""
    if REGISTRY[fmt].pack == 2:  # int4, fp4_e2m1
        int4.encode_(x, codes, scales, block_size, stochastic, key, fmt)
        return
    n = x.numel()
    pieces = []
    for start, stop, block0, rows in kernels.block_runs(n, block_size):
        xb, cb = x[start:stop].view(rows, -1), codes[start:stop].view(rows, -1)
        kb = kernels.shift_key(key, start)
        absmax = kernels.absmax_blocks(xb)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"Invalid x: cannot encode NaN or Inf in {fmt}")
        pieces.append((xb, cb, scales[block0 : block0 + rows], absmax, kb))
    if fmt == "udynamic8" and bool(x.amin() < 0):
        raise ValueError("Invalid x: udynamic8 encodes non-negative values only")
    for xb, cb, sb, absmax, kb in pieces:
        if fmt in ("dynamic8", "udynamic8"):
            sb.copy_(absmax)
            _encode_dynamic_chunks(xb, cb, sb, codebook_index(fmt, x.device), stochastic, kb)
        else:
            kernels.encode_scaled_(xb, cb, sb, absmax, fmt, stochastic, kb)


def _encode_dynamic_chunks(
    xb: Tensor, cb: Tensor, sb: Tensor, index: Any, stochastic: bool, key: Tensor | None
) -> None:
    """:func:`encode_dynamic` over chunks of at most :data:`EAGER_CHUNK` elements.

    The codebook codec runs eagerly with int32/int64 temporaries several times the
    size of its input: chunks bound them (same codes: rows are independent and the
    random bits follow each element's global index).
    """
    rows, C = xb.shape
    step = max(1, EAGER_CHUNK // max(C, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        kc = kernels.shift_key(key, r0 * C)
        encode_dynamic(xb[r0:r1], cb[r0:r1], sb[r0:r1], index, stochastic, kc)


def decode(
    codes: Tensor,
    scales: Tensor | None,
    fmt: str,
    block_size: int,
    numel: int,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Decode ``numel`` codes into float32.

    Args:
        codes: (numel,) codes in :func:`code_dtype` of ``fmt`` (int4: ``ceil(numel / 2)``
            bytes), or the same bytes in another dtype (e.g. uint8 from the wire).
        scales: (scale_count(numel, block_size, fmt),) float32, or None for fp32 / bf16.
        fmt: one of :data:`FORMATS`.
        block_size: elements per scale.
        numel: number of elements.
        out: optional (numel,) float32 buffer written in place and returned.

    Returns:
        (numel,) float32. Without ``out`` and with ``fmt == "fp32"`` this is
        ``codes`` itself (no copy): modifying it modifies the codes.
    """
    check_format(fmt)
    check_block_size(block_size)
    codes = _as_codes(codes, fmt)
    codes = codes if codes.dim() == 1 else codes.reshape(-1)
    if codes.numel() != REGISTRY[fmt].code_count(numel):
        raise ValueError(f"Invalid codes: {codes.numel()} codes for numel={numel} of {fmt}")
    if fmt == "fp32" and out is None:
        return codes
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    if fmt not in SCALED_FORMATS:
        return out.copy_(codes)
    scales = _checked_scales(scales, scale_count(numel, block_size, fmt), "scales")
    if REGISTRY[fmt].pack == 2:  # int4, fp4_e2m1
        return int4.decode(codes, scales, block_size, numel, out, fmt)
    if fmt in ("dynamic8", "udynamic8"):
        torch.index_select(codebook_index(fmt, codes.device).book, 0, codes.int(), out=out)
    elif fmt == "fp8_e4m3" and codes.device.type == "cpu":
        # the CPU's e4m3 -> fp32 cast is ~5x slower than a 256-entry table (same values)
        torch.index_select(_e4m3_table(), 0, codes.view(torch.uint8).int(), out=out)
    else:
        out.copy_(codes)
    for start, stop, block0, rows in kernels.block_runs(numel, block_size):
        out[start:stop].view(rows, -1).mul_(scales[block0 : block0 + rows, None])
    return out


# ------------------------------------------------------------------ codecs
@functools.cache
def _e4m3_table() -> Tensor:
    """(256,) float32 value of every float8_e4m3fn bit pattern (CPU; 0x7F / 0xFF are NaN)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


def all_finite(x: Tensor) -> bool:
    """No NaN/Inf in ``x``: a finite sum proves it (one cheap pass); else check exactly."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
