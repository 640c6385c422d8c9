"""State-dict versions and the converter from version 1 (dion_lp 0.1.0) to version 2.

1 is dion_lp 0.1.0 (flat quantization blocks for plain tensors, row blocks for
DTensors, generator states saved). 2 keeps every buffer in row blocks
(:mod:`dion_lp.quant.buffer`) and has no generator state (the rounding bits are a
function of the write's position, :mod:`dion_lp.quant.rng`). Public as
:func:`dion_lp.checkpoint.upgrade_state_dict` / :func:`dion_lp.upgrade_state_dict`.
"""

from __future__ import annotations

from typing import Any

import torch

from .quant import codecs
from .quant.buffer import BUFFER_VERSION, QuantizedBuffer, row_blocks, storage_format
from .quant.formats import format_info

__all__ = ["STATE_DICT_VERSION", "upgrade_state_dict"]

STATE_DICT_VERSION = 2


def upgrade_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A dion_lp 0.1.0 (version 1) state dict in version 2 form; the input is not changed.

    Exact (bit for bit) for fp32 and bf16 buffers, for Q, steps and counters, and for
    8-bit buffers whose rows (the elements after dim 0) are a multiple of the block
    size: their flat blocks are already row blocks. Other 8-bit buffers are decoded
    and re-encoded in row blocks with round-to-nearest (each value moves by at most
    half a quantization step of its new block). The saved stochastic-rounding
    generators are dropped: version 2 draws its rounding bits from the write's
    position, so a converted run rounds differently from the run that saved it
    (equal in distribution). States of DTensor parameters saved by 0.1.0 (row-block
    ``*_sharded`` records) are relabelled without touching their codes.

    Args:
        state_dict: what ``Dion.state_dict()`` of dion_lp 0.1.0 returned (loaded with
            ``torch.load(..., weights_only=True)``).

    Returns:
        A new state dict that :meth:`dion_lp.Dion.load_state_dict` accepts.
    """
    meta = state_dict.get("dion_lp")
    if not isinstance(meta, dict) or meta.get("version") != 1:
        raise ValueError(
            f"Invalid state_dict: expected a dion_lp 0.1.0 state dict (version 1), got version "
            f"{meta.get('version') if isinstance(meta, dict) else None!r}"
        )
    out = dict(state_dict)
    out["state"] = {k: _upgrade_param_state(st) for k, st in state_dict["state"].items()}
    new_meta = {k: v for k, v in meta.items() if k != "generators"}
    new_meta["version"] = STATE_DICT_VERSION
    out["dion_lp"] = new_meta
    return out


def _upgrade_param_state(st: dict[str, Any]) -> dict[str, Any]:
    new: dict[str, Any] = {}
    names = [k[: -len("_format")] for k in st if k.endswith("_format")]
    sharded = [k[: -len("_sharded")] for k in st if k.endswith("_sharded")]
    for key, value in st.items():
        base = key.rsplit("_", 1)[0]
        if base in names or base in sharded:
            continue
        if key == "momentum_residual" and value.ndim != 2:
            value = value.reshape(value.shape[0] if value.ndim else 1, -1)
        new[key] = value
    for name in names:
        new.update(_upgrade_flat_buffer(st, name))
    for name in sharded:
        info = st[f"{name}_sharded"]
        for suffix in ("codes", "scales"):
            if f"{name}_{suffix}" in st:
                new[f"{name}_{suffix}"] = st[f"{name}_{suffix}"]
        new[f"{name}_format"] = {
            "fmt": info["fmt"],
            "block_size": info["block_size"],
            "row_block": info["row_block"],
            "row_numel": info["row_numel"],
            "version": BUFFER_VERSION,
        }
    return new


def _upgrade_flat_buffer(st: dict[str, Any], name: str) -> dict[str, Any]:
    """One 0.1.0 flat-block buffer (codes shaped like the parameter) in row blocks."""
    info, codes = st[f"{name}_format"], st[f"{name}_codes"]
    fmt, block = info["fmt"], info["block_size"]
    shape = tuple(codes.shape)
    rows = shape[0] if shape else 1
    U = codes.numel() // max(rows, 1)
    stored = storage_format(fmt, rows, U)
    scales = st.get(f"{name}_scales")
    values = codecs.decode(codes.reshape(-1), scales, fmt, block, codes.numel(), out=None)
    values = values.reshape(rows, U)
    record = {"fmt": stored, "block_size": block, "version": BUFFER_VERSION, "row_numel": U}
    if not format_info(stored).scaled:
        record["row_block"] = U
        dtype = format_info(stored).code_dtype
        same = stored == fmt
        new_codes = codes.reshape(rows, U).clone() if same else values.to(dtype)
        return {f"{name}_codes": new_codes, f"{name}_format": record}
    nb, eb = row_blocks(U, block)
    record["row_block"] = eb
    if stored == fmt and eb == block and nb * eb == U:  # flat blocks are row blocks already
        return {
            f"{name}_codes": codes.reshape(rows, U).clone(),
            f"{name}_scales": scales.reshape(rows, nb).clone(),
            f"{name}_format": record,
        }
    new: dict[str, Any] = {f"{name}_format": dict(record, fmt=stored)}
    new[f"{name}_codes"] = torch.zeros(rows, nb * eb, dtype=format_info(stored).code_dtype)
    new[f"{name}_scales"] = torch.zeros(rows, nb, dtype=torch.float32)
    buf = QuantizedBuffer(new, name)
    buf.write(values, stochastic=False)
    return new
