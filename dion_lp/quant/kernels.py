"""Fused element-wise kernels: ``torch.compile`` of the codecs, with an eager fallback.

Every kernel works on *blocks*: a ``(R, C)`` tensor, one quantization block (or
one chunk of a bf16 row) per row. Inductor turns each into one vectorised C++
loop on a CPU and a Triton kernel on CUDA: decode + add (B = M + G) in one pass,
absmax in one, scale + (stochastic) rounding + store in one (int4 and fp4_e2m1: the nibbles
packed and unpacked inside those passes, ``(R, C // 2)`` bytes per ``(R, C)``
block). The eager fallback runs the same Python functions and gives the same
codes bit for bit (the rounding uses only integer and exact float operations;
tests/test_kernels.py, tests/test_int4.py).

Shapes: the block count R is dynamic from the first call (``mark_dynamic``) and
the block length C static, so a format gets one graph per block length, whatever
the tensor sizes ("compile once per shape family"; a static C keeps the inner
loop vectorised, which a fully dynamic graph does not on a CPU: 4x slower
here). A run pays a few seconds of compilation on its first step per format it
uses. Blocks with R or C below 2 (which would specialise a graph) run eagerly.

Switch: compilation is on unless the environment sets ``DION_LP_COMPILE=0`` or
:func:`set_compile` turns it off (to debug, or where no compiler is available).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .rounding import (
    bf16_codes,
    bf16_rounded_bits,
    fp4_codes,
    int4_codes,
    scaled_codes,
    unpack_fp4,
    unpack_int4,
)

__all__ = [
    "absmax_blocks",
    "block_runs",
    "compile_enabled",
    "decode_blocks",
    "decode_4bit_blocks",
    "encode_bf16_",
    "encode_4bit_",
    "encode_scaled_",
    "set_compile",
    "shift_key",
]

_enabled = os.environ.get("DION_LP_COMPILE", "1") != "0"
_compiled: dict[str, Callable[..., Any]] = {}


def set_compile(enabled: bool) -> None:
    """Turn the compiled kernels on or off for this process (off: eager, same numbers)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"Invalid enabled: {enabled!r}; expected a bool")
    _enabled = enabled


def compile_enabled() -> bool:
    """Whether the kernels run compiled."""
    return _enabled


def _own_copy(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo caches graphs per code object, so each
    (format, rounding) variant gets its own cache entry instead of recompiling a shared one."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _run(name: str, fn: Callable[..., Any], blocks: tuple[Tensor, ...], *args: Any) -> Any:
    """``fn(*args)``, compiled when enabled and the blocks are at least 2 x 2.

    ``blocks`` are the arguments whose dim 0 is the block count (marked dynamic).
    """
    R, C = blocks[0].shape[0], blocks[0].shape[-1]
    if not (_enabled and R >= 2 and C >= 2):
        return fn(*args)
    compiled = _compiled.get(name)
    if compiled is None:
        compiled = torch.compile(_own_copy(fn, name), dynamic=False, fullgraph=True)
        _compiled[name] = compiled
    for t in blocks:
        torch._dynamo.mark_dynamic(t, 0)
    return compiled(*args)


def block_runs(numel: int, block_size: int) -> list[tuple[int, int, int, int]]:
    """Split ``numel`` elements into at most two runs of whole blocks (one kernel call each).

    Returns (start, stop, first_block, rows) per run: the full blocks, then the
    short tail block if ``numel`` is not a multiple of ``block_size``.
    """
    full = numel // block_size
    runs = [(0, full * block_size, 0, full)] if full else []
    if full * block_size < numel:
        runs.append((full * block_size, numel, full, 1))
    return runs


def shift_key(key: Tensor | None, start: int) -> Tensor | None:
    """``key`` (3,) with its base index moved ``start`` elements on (None stays None)."""
    return None if key is None else key + torch.tensor([0, 0, start], device=key.device)


def _absmax(x: Tensor) -> Tensor:
    return x.abs().amax(dim=1)


def absmax_blocks(x: Tensor) -> Tensor:
    """(R,) max |x| of each row of the fp32 blocks ``x`` (R, C); NaN / Inf propagate."""
    return _run("absmax", _absmax, (x,), x)


def _encode_scaled(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    absmax: Tensor,
    fmt: str,
    stochastic: bool,
    key: Tensor | None,
) -> None:
    c, s = scaled_codes(x, absmax, fmt, stochastic, key)
    codes.copy_(c)
    scales.copy_(s)


def encode_scaled_(
    x: Tensor,  # (R, C) fp32, one block per row
    codes: Tensor,  # (R, C) int8 / fp8, written
    scales: Tensor,  # (R,) fp32, written
    absmax: Tensor,  # (R,) fp32, finite (absmax_blocks, checked by the caller)
    fmt: str,
    stochastic: bool,
    key: Tensor | None,  # (3,) int64; base = global index of x[0, 0]
) -> None:
    """Scales and codes of an int8 / fp8 block per row of ``x``, in one fused kernel.

    (A separate absmax kernel first measured faster here than one fused reduction +
    rounding kernel: 3.0 against 4.0 ms for 2.4M elements with SR.)
    """
    name = f"encode_{fmt}_{'sr' if stochastic else 'rn'}"
    blocks = (x, codes, scales, absmax)
    _run(name, _encode_scaled, blocks, x, codes, scales, absmax, fmt, stochastic, key)


_CODES_4BIT = {"int4": int4_codes, "fp4_e2m1": fp4_codes}


def _unpack_int4_values(codes: Tensor) -> Tensor:
    return unpack_int4(codes).float()


_UNPACK_4BIT = {"int4": _unpack_int4_values, "fp4_e2m1": unpack_fp4}


def _encode_4bit(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    absmax: Tensor,
    fmt: str,
    stochastic: bool,
    key: Tensor | None,
) -> None:
    c, s = _CODES_4BIT[fmt](x, absmax, stochastic, key)
    codes.copy_(c)
    scales.copy_(s)


def encode_4bit_(
    x: Tensor,  # (R, C) fp32, one block per row, C even
    codes: Tensor,  # (R, C // 2) uint8, written: two codes a byte
    scales: Tensor,  # (R,) fp32, written
    absmax: Tensor,  # (R,) fp32, finite (absmax_blocks, checked by the caller)
    fmt: str,  # "int4" or "fp4_e2m1"
    stochastic: bool,
    key: Tensor | None,  # (3,) int64; base = global index of x[0, 0]
) -> None:
    """Scales and packed codes of an int4 / fp4_e2m1 block per row of ``x``, in one
    fused kernel (:func:`dion_lp.quant.rounding.int4_codes` / ``fp4_codes``)."""
    name = f"encode_{fmt}_{'sr' if stochastic else 'rn'}"
    blocks = (x, codes, scales, absmax)
    _run(name, _encode_4bit, blocks, x, codes, scales, absmax, fmt, stochastic, key)


def _encode_bf16(x: Tensor, codes: Tensor, stochastic: bool, key: Tensor | None) -> None:
    codes.copy_(bf16_codes(x, stochastic, key))


def _bf16_bits(bits: Tensor, out: Tensor, key: Tensor | None) -> None:
    out.copy_(bf16_rounded_bits(bits, key))


def encode_bf16_(
    x: Tensor, codes: Tensor, stochastic: bool, key: Tensor | None, consume: bool = False
) -> None:
    """bf16 codes of finite fp32 ``x`` (R, C) into ``codes`` (R, C).

    Nearest: one fused kernel. Stochastic: an integer-only kernel on the bit patterns
    (free views taken outside it), then the exact cast into ``codes``. ``consume``:
    ``x`` is dead after this call, so the kernel rounds its bits in place instead of
    into a new fp32-sized temporary (whose fresh pages cost as much as the rounding
    here). (An int16 output written straight into ``codes`` is not vectorised by
    Inductor on a CPU: 2.5x slower.)
    """
    if not stochastic or not (_enabled and min(x.shape) >= 2):
        _run(
            f"encode_bf16_{'sr' if stochastic else 'rn'}",
            _encode_bf16,
            (x, codes),
            x,
            codes,
            stochastic,
            key,
        )
        return
    bits = x.contiguous().view(torch.int32)
    in_place = consume and x.is_contiguous()
    out = bits if in_place else torch.empty_like(bits)
    _run(
        f"encode_bf16_sr_bits{'_inplace' if in_place else ''}",
        _bf16_bits,
        (bits, out),
        bits,
        out,
        key,
    )
    codes.copy_(out.view(torch.float32))


def _decode(codes: Tensor, scales: Tensor | None, add: Tensor | None, out: Tensor) -> None:
    values = codes.float()
    if scales is not None:
        values = values * scales[:, None]
    out.copy_(values + add if add is not None else values)


def decode_blocks(
    codes: Tensor, scales: Tensor | None, add: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """fp32 ``codes * scale`` (+ ``add``) of (R, C) blocks, one pass, into ``out``.

    Args:
        codes: (R, C) codes (int8, fp8 or bf16 in their own dtypes).
        scales: (R,) fp32 scales, or None (bf16).
        add: optional (R, C) fp32 tensor added to the decoded values (B = M + G).
        out: optional contiguous (R, C) fp32 tensor written and returned (a scratch
            block reused across calls); None: a new tensor.
    """
    if out is None:
        out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    name = f"decode_{codes.dtype}_{scales is not None}_{add is not None}"
    blocks = tuple(t for t in (codes, scales, add, out) if t is not None)
    _run(name, _decode, blocks, codes, scales, add, out)
    return out


def _decode_4bit(codes: Tensor, scales: Tensor, fmt: str, add: Tensor | None, out: Tensor) -> None:
    values = _UNPACK_4BIT[fmt](codes) * scales[:, None]
    out.copy_(values + add if add is not None else values)


def decode_4bit_blocks(
    codes: Tensor,
    scales: Tensor,
    fmt: str,
    add: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """fp32 ``value * scale`` (+ ``add``) of packed 4-bit blocks, one pass, into ``out``.

    Args:
        codes: (R, C // 2) uint8, two codes a byte (:func:`dion_lp.quant.rounding.pack_int4`).
        scales: (R,) fp32 scales.
        fmt: "int4" (two's-complement levels) or "fp4_e2m1" (sign-magnitude e2m1).
        add: optional (R, C) fp32 tensor added to the decoded values (B = M + G).
        out: optional contiguous (R, C) fp32 tensor written and returned; None: a new one.
    """
    if out is None:
        out = torch.empty(codes.shape[0], 2 * codes.shape[1], device=codes.device)
    name = f"decode_{fmt}_{add is not None}"
    blocks = tuple(t for t in (codes, scales, add, out) if t is not None)
    _run(name, _decode_4bit, blocks, codes, scales, fmt, add, out)
    return out
