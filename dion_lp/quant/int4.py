"""The 4-bit scaled state formats ``int4`` and ``fp4_e2m1``: two codes a byte, and their flat codec.

Codes. Each block of elements gets one float32 ``scale = absmax / 7`` and each
element the integer level ``round(x / scale)`` in [-7, 7] (ties to even, or
stochastic rounding with the same counter-based bits as int8:
:func:`dion_lp.quant.rounding.integer_levels`). The grid is symmetric: the
block's absmax maps to +7 or -7 exactly whatever its sign, so a value never
saturates, stochastic rounding stays unbiased over the whole range, negation
commutes with quantization and zero is exact. The 16th level (-8, nibble
0b1000) is never written: log2(15) = 3.91 of the 4 bits are used, against a
grid that would lose symmetry (and unbiasedness at one end) for that 0.09 bit.

Packing. Level ``2 j`` of a run of elements goes to the low nibble of byte ``j``,
level ``2 j + 1`` to the high nibble, each in two's complement (byte 0 is two
zeros). In a state buffer (:class:`dion_lp.quant.buffer.QuantizedBuffer`) every
row is cut into blocks of an *even* number of elements (``row_blocks(...,
pack=2)``), so every block, every row and every row shard of an FSDP2 parameter
is whole bytes, and the random bits of element i are those of its global index
in the padded row-block layout, exactly as for int8.

Size and block. A ``rows x U`` buffer with ``nb`` blocks of ``eb`` (even)
elements per row holds ``rows * nb * (eb / 2 + 4)`` bytes: 0.5 + 4 / eb bytes per
element. int4 takes the group's ``block_size`` like every scaled format (default
256: 0.515625 B/element). A 768 x 3072 Dion matrix then holds 1,216,512 bytes of
momentum plus Q, which beside a 4-bit momentum is stored in fp8 (768 x r bytes,
:func:`dion_lp.algorithms.dion.q_dtype`): 0.578125 B/param at rank 1/4 (r = 192)
and 0.53125 at rank 1/16 (r = 48), exactly (``buffer_nbytes``); with a bf16 Q it
would be 0.640625 and 0.546875. A larger block buys little (512: 0.5078, -1.2% of
the rank-1/4 state) for +6% (Gaussian) to +21% (Student-t, 3 dof) relative RMS
error (``python -m benchmarks.codecs``), so the default stays 256. bf16 scales
would save the same 2 bytes a block, at the price of the exact +-7 for a block's
absmax and of a second scale dtype in every buffer.

fp4_e2m1 shares all of this (layout, packing, sizes, blocks, random bits); only
the grid differs (:func:`dion_lp.quant.rounding.fp4_nibbles`): {0, 0.5, 1, 1.5,
2, 3, 4, 6} times ``absmax / 6``, twice as fine as int4's near zero and half as
fine near the absmax, where a block holds few values.

The flat codec here (:func:`encode_`, :func:`decode`) is what
:func:`dion_lp.quant.quantize` / :func:`~dion_lp.quant.dequantize` use for
``"int4"``: ``numel`` elements in blocks of ``block_size`` consecutive ones,
``ceil(numel / 2)`` bytes of codes (the last byte's high nibble is zero when
``numel`` is odd). An even ``block_size`` runs one fused kernel per run of whole
blocks (:func:`dion_lp.quant.kernels.encode_int4_` / ``decode_int4_blocks``); an
odd one, whose blocks straddle bytes, rounds block by block and packs after.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .rounding import fp4_nibbles, int4_levels, pack_int4, unpack_fp4, unpack_int4

__all__ = ["decode", "encode_"]


def encode_(
    x: Tensor,  # (numel,) fp32
    codes: Tensor,  # (ceil(numel / 2),) uint8, written
    scales: Tensor,  # (ceil(numel / block_size),) fp32, written
    block_size: int,
    stochastic: bool,
    key: Tensor | None,  # (3,) int64: element i rounds with the bits of index key[2] + i
    fmt: str = "int4",  # or "fp4_e2m1"
) -> None:
    """Encode ``x`` in ``fmt`` into ``codes`` / ``scales`` (arguments checked by the caller).

    Raises:
        ValueError: NaN or Inf in ``x``.
    """
    n = x.numel()
    runs = []
    for start, stop, block0, rows in kernels.block_runs(n, block_size):
        xb = x[start:stop]
        if block_size % 2 == 0 and (stop - start) % 2:  # the odd tail: one zero of padding
            xb = torch.nn.functional.pad(xb, (0, 1))
        xb = xb.view(rows, -1)
        absmax = kernels.absmax_blocks(xb)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"Invalid x: cannot encode NaN or Inf in {fmt}")
        runs.append((xb, start, block0, rows, absmax))
    if block_size % 2 == 0:  # every run starts on a byte and holds whole bytes
        for xb, start, block0, rows, absmax in runs:
            cb = codes[start // 2 : start // 2 + xb.numel() // 2].view(rows, -1)
            sb = scales[block0 : block0 + rows]
            kb = kernels.shift_key(key, start)
            kernels.encode_4bit_(xb, cb, sb, absmax, fmt, stochastic, kb)
        return
    levels = torch.zeros(n + n % 2, dtype=torch.int32, device=x.device)
    for xb, start, block0, rows, absmax in runs:
        levels_of = int4_levels if fmt == "int4" else fp4_nibbles
        lv, sc = levels_of(xb, absmax, stochastic, kernels.shift_key(key, start))
        levels[start : start + xb.numel()] = lv.view(-1)
        scales[block0 : block0 + rows] = sc
    codes.copy_(pack_int4(levels.view(1, -1)).view(-1))


def decode(
    codes: Tensor,  # (ceil(numel / 2),) uint8
    scales: Tensor,  # (ceil(numel / block_size),) fp32
    block_size: int,
    numel: int,
    out: Tensor,  # (numel,) fp32, written and returned
    fmt: str = "int4",  # or "fp4_e2m1"
) -> Tensor:
    """Decode ``numel`` elements of ``fmt`` into ``out`` (arguments checked by the caller)."""
    full = numel // block_size
    done = full * block_size if block_size % 2 == 0 else 0
    if done:  # whole blocks of whole bytes: one fused kernel
        blocks = codes[: done // 2].view(full, -1)
        kernels.decode_4bit_blocks(blocks, scales[:full], fmt, out=out[:done].view(full, -1))
    for start, stop, block0, rows in kernels.block_runs(numel, block_size):
        if stop <= done:
            continue
        # the tail, or blocks straddling bytes: unpack their bytes, drop a leading nibble
        unpack = unpack_int4 if fmt == "int4" else unpack_fp4
        levels = unpack(codes[start // 2 : (stop + 1) // 2].view(1, -1)).view(-1)
        levels = levels[start % 2 : start % 2 + stop - start].float().view(rows, -1)
        out[start:stop].view(rows, -1).copy_(levels * scales[block0 : block0 + rows, None])
    return out
