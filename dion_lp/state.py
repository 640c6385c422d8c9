"""Quantized buffers kept as optimizer state: codes + scales in a plain dict.

A buffer ``name`` lives in a per-parameter state dict as plain entries, so the
dict saves with ``torch.save`` and loads with ``torch.load(weights_only=True)``:

- ``state[f"{name}_codes"]``: tensor of the parameter's shape, in the code dtype
  of the format (float32, bfloat16, int8, float8 or uint8);
- ``state[f"{name}_scales"]``: (ceil(numel / block_size),) float32, only for the
  8-bit formats;
- ``state[f"{name}_format"]``: ``{"fmt": str, "block_size": int, "version": int}``.

The optimizer reads a buffer out in float32, does its maths, and writes it back
with one quantizing call (:func:`read_buffer`, :func:`write_buffer`). With
``fmt == "fp32"`` the codes *are* the buffer: :func:`read_buffer` returns them
and callers may update them in place (writing back is then unnecessary).

Small tensors stay in full precision: a buffer of fewer than
:data:`MIN_QUANT_NUMEL` elements is stored as fp32 whatever format is asked
for, and its recorded ``fmt`` is ``"fp32"`` (as torchao does for its low-bit
optimizers: for biases and norms the scales and the rounding cost more than
the bytes they save). :func:`storage_format` states the rule and
:func:`check_buffer` applies it when validating a loaded state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import quant

__all__ = [
    "MIN_QUANT_NUMEL",
    "STATE_FORMAT_VERSION",
    "buffer_nbytes",
    "check_buffer",
    "init_buffer",
    "read_buffer",
    "storage_format",
    "write_buffer",
]

MIN_QUANT_NUMEL = 4096
STATE_FORMAT_VERSION = 1


def storage_format(fmt: str, numel: int) -> str:
    """The format a buffer of ``numel`` elements asked for in ``fmt`` is stored in.

    ``fmt`` itself, or ``"fp32"`` when ``numel < MIN_QUANT_NUMEL``.
    """
    quant.check_format(fmt)
    return fmt if numel >= MIN_QUANT_NUMEL else "fp32"


def init_buffer(
    state: dict[str, Any], name: str, like: Tensor, fmt: str, *, block_size: int = 256
) -> None:
    """Create a zero buffer ``name`` of ``like``'s shape and device in ``state``.

    Args:
        state: per-parameter state dict, modified in place.
        name: buffer name; keys ``{name}_codes``, ``{name}_scales`` (8-bit
            formats only) and ``{name}_format`` are written.
        like: tensor whose shape and device the buffer takes.
        fmt: one of :data:`dion_lp.quant.FORMATS`; see :func:`storage_format`.
        block_size: elements per scale of the 8-bit formats, >= 1.
    """
    quant.check_block_size(block_size)
    stored = storage_format(fmt, like.numel())
    codes = torch.zeros(like.shape, dtype=quant.code_dtype(stored), device=like.device)
    count = quant.scale_count(like.numel(), block_size, stored)
    if stored in quant.SCALED_FORMATS:
        scales = torch.zeros(count, dtype=torch.float32, device=like.device)
        # zero is not code 0 of every codebook (dynamic8): encode it
        zeros = torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
        quant.encode_(zeros, codes.view(-1), scales, stored, block_size)
        state[f"{name}_scales"] = scales
    else:
        state.pop(f"{name}_scales", None)
    state[f"{name}_codes"] = codes
    state[f"{name}_format"] = {
        "fmt": stored,
        "block_size": block_size,
        "version": STATE_FORMAT_VERSION,
    }


def _format(state: dict[str, Any], name: str) -> tuple[str, int]:
    info = state.get(f"{name}_format")
    if not isinstance(info, dict) or f"{name}_codes" not in state:
        raise ValueError(f"Invalid state: no buffer {name!r} (call init_buffer first)")
    return info["fmt"], info["block_size"]


def read_buffer(state: dict[str, Any], name: str) -> Tensor:
    """Buffer ``name`` in float32, shape of the ``like`` it was created from.

    For fp32 buffers this is the stored tensor itself (modify it in place to
    update the state); otherwise a new decoded tensor.
    """
    fmt, block_size = _format(state, name)
    codes = state[f"{name}_codes"]
    if fmt == "fp32":
        return codes
    scales = state.get(f"{name}_scales")
    flat = quant.decode(codes.view(-1), scales, fmt, block_size, codes.numel())
    return flat.view(codes.shape)


def write_buffer(
    state: dict[str, Any],
    name: str,
    x: Tensor,
    *,
    stochastic: bool,
    generator: torch.Generator | None,
) -> None:
    """Quantize ``x`` into buffer ``name``'s existing codes and scales, in place.

    Args:
        state: per-parameter state dict holding the buffer.
        name: buffer name given to :func:`init_buffer`.
        x: float tensor of the buffer's shape (any float dtype; read as float32).
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        generator: random source of stochastic rounding, on the buffer's device.

    Raises:
        ValueError: shape mismatch, NaN/Inf in ``x``, negative ``x`` for udynamic8.
    """
    fmt, block_size = _format(state, name)
    codes = state[f"{name}_codes"]
    if x.shape != codes.shape:
        raise ValueError(
            f"Invalid x for buffer {name!r}: shape {tuple(x.shape)}, expected {tuple(codes.shape)}"
        )
    if fmt == "fp32" and x.data_ptr() == codes.data_ptr() and x.stride() == codes.stride():
        return  # the caller updated the state tensor in place
    scales = state.get(f"{name}_scales")
    quant.encode_(x.reshape(-1), codes.view(-1), scales, fmt, block_size, stochastic, generator)


def buffer_nbytes(state: dict[str, Any], name: str) -> int:
    """Exact bytes held by buffer ``name``: codes plus scales."""
    _format(state, name)
    total = 0
    for key in (f"{name}_codes", f"{name}_scales"):
        tensor = state.get(key)
        if tensor is not None:
            total += tensor.numel() * tensor.element_size()
    return total


def check_buffer(state: dict[str, Any], name: str, fmt: str, block_size: int) -> None:
    """Raise a clear ``ValueError`` unless buffer ``name`` matches the requested layout.

    Use after loading a state dict: the saved format (after the small-tensor
    rule of :func:`storage_format`), block size (8-bit formats only; fp32 and
    bf16 have no blocks) and :data:`STATE_FORMAT_VERSION` must match what this
    run would create, and the stored tensors must have the dtypes and sizes
    that format implies.

    Args:
        state: per-parameter state dict holding the buffer.
        name: buffer name.
        fmt: the format this run asks for (one of :data:`dion_lp.quant.FORMATS`).
        block_size: the block size this run asks for.
    """
    quant.check_format(fmt)
    quant.check_block_size(block_size)
    saved_fmt, saved_block = _format(state, name)
    info = state[f"{name}_format"]
    version = info.get("version")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(
            f"Invalid state buffer {name!r}: saved with format version {version!r}, "
            f"this dion_lp reads version {STATE_FORMAT_VERSION}"
        )
    codes = state[f"{name}_codes"]
    want = storage_format(fmt, codes.numel())
    if saved_fmt != want:
        raise ValueError(
            f"Invalid state buffer {name!r}: saved with fmt {saved_fmt!r}, "
            f"but this run uses fmt {want!r} (requested {fmt!r})"
        )
    if want in quant.SCALED_FORMATS and saved_block != block_size:
        raise ValueError(
            f"Invalid state buffer {name!r}: saved with block_size {saved_block!r}, "
            f"but this run uses block_size {block_size!r}"
        )
    _check_tensors(state, name, want, saved_block)


def _check_tensors(state: dict[str, Any], name: str, fmt: str, block_size: int) -> None:
    """Codes dtype and scale count consistent with ``fmt`` (catches casts on load)."""
    codes = state[f"{name}_codes"]
    if codes.dtype != quant.code_dtype(fmt):
        raise ValueError(
            f"Invalid state buffer {name!r}: codes of dtype {codes.dtype}, "
            f"fmt {fmt!r} stores {quant.code_dtype(fmt)}"
        )
    scales = state.get(f"{name}_scales")
    count = quant.scale_count(codes.numel(), block_size, fmt)
    got = None if scales is None else scales.numel()
    if fmt in quant.SCALED_FORMATS and (
        scales is None or got != count or scales.dtype != torch.float32
    ):
        raise ValueError(
            f"Invalid state buffer {name!r}: {got} scales, fmt {fmt!r} with "
            f"block_size {block_size} needs {count} float32 scales"
        )
