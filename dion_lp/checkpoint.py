"""State-dict checks and versions, the 0.1.0 converter, and the DCP helpers.

A Dion state dict is ``torch.optim.Optimizer``'s (``state`` + ``param_groups``)
plus a ``"dion_lp"`` section: format version and the wire-byte counters.
Everything is a tensor or a plain value, so ``torch.load(..., weights_only=True)``
reads it.

Loading refuses, before it changes anything, a state that this optimizer would
not have produced: another optimizer's, another version's, another number of
parameters or other shapes, or a group whose stored layout differs (algorithm,
momentum format, block size, rank). Converting between formats is not done
silently: load into an optimizer built like the saved one instead.

Versions: 1 is dion_lp 0.1.0 (flat quantization blocks for plain tensors, row
blocks for DTensors, generator states saved). 2 keeps every buffer in row
blocks (:mod:`dion_lp.quant.buffer`) and has no generator state (the rounding
bits are a function of the write's position, :mod:`dion_lp.quant.rng`).
:func:`upgrade_state_dict` converts a version-1 state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .algorithms.dion import init_dion_state
from .algorithms.elementwise import init_elementwise_state, state_format
from .layouts.placement import placement
from .options import dion_rank
from .quant import codecs
from .quant.buffer import BUFFER_VERSION, QuantizedBuffer, row_blocks, storage_format
from .quant.formats import format_info

__all__ = [
    "LAYOUT_KEYS",
    "STATE_DICT_VERSION",
    "check_loadable",
    "check_loaded_state",
    "dcp_state_dict",
    "init_state",
    "load_dcp_state_dict",
    "upgrade_state_dict",
]

STATE_DICT_VERSION = 2

# Group keys that decide the layout of the stored state: they must match.
LAYOUT_KEYS = (
    "algorithm",
    "momentum_dtype",
    "block_size",
    "rank_fraction",
    "rank_multiple_of",
    "momentum_residual",
)


def check_loadable(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` fits an optimizer with ``param_groups``.

    Args:
        state_dict: what :meth:`dion_lp.Dion.state_dict` returned.
        param_groups: the loading optimizer's groups (their current settings).
    """
    meta = state_dict.get("dion_lp")
    if not isinstance(meta, dict) or "version" not in meta:
        raise ValueError(
            "state_dict was not saved by dion_lp.Dion (no 'dion_lp' section); "
            "refusing to load another optimizer's state"
        )
    if meta["version"] == 1:
        raise ValueError(
            "state_dict version 1 was saved by dion_lp 0.1.0; convert it with "
            "dion_lp.checkpoint.upgrade_state_dict(state_dict) and load the result"
        )
    if meta["version"] != STATE_DICT_VERSION:
        raise ValueError(
            f"state_dict version {meta['version']!r} is not supported "
            f"(this dion_lp reads version {STATE_DICT_VERSION})"
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"state_dict holds {len(saved_groups)} param groups, this optimizer {len(param_groups)}"
        )
    for index, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {index}: state_dict holds {len(saved['params'])} parameters, "
                f"this optimizer {len(group['params'])}"
            )
        for key in LAYOUT_KEYS:
            if key in saved and saved[key] != group[key]:
                raise ValueError(
                    f"param group {index}: state_dict was saved with {key}={saved[key]!r}, "
                    f"this optimizer uses {key}={group[key]!r}; build the optimizer with "
                    f"{key}={saved[key]!r} to load it"
                )
        for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
            st = state_dict["state"].get(saved_id)
            if st:
                _check_shapes(st, p, group, f"parameter #{i} of param group {index}")


def _check_shapes(st: dict[str, Any], p: Tensor, group: dict[str, Any], what: str) -> None:
    """Every buffer and Q of a saved state must fit parameter ``p`` (checked before loading)."""
    shape = tuple(p.shape)
    place = placement(p)
    rows, row_numel = place.rows, place.row_numel
    for key, value in st.items():
        if key.endswith("_format") and isinstance(value, dict):
            buf = QuantizedBuffer(st, key[: -len("_format")])
            buf.check_shape(rows, row_numel, f"{what} of shape {shape}")
    if "Q" in st and group["algorithm"] == "dion" and len(shape) == 2:
        r = dion_rank(*shape, group["rank_fraction"], group["rank_multiple_of"])
        if tuple(st["Q"].shape) != (min(shape), r):
            raise ValueError(
                f"Invalid state for {what} of shape {shape}: Q of shape "
                f"{tuple(st['Q'].shape)}, the parameter needs {(min(shape), r)}"
            )


def check_loaded_state(st: dict[str, Any], group: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless every buffer in ``st`` has the layout ``group`` asks for."""
    for key, value in st.items():
        if not key.endswith("_format") or not isinstance(value, dict):
            continue
        name = key[: -len("_format")]
        want = state_format(group["momentum_dtype"], unsigned=name == "exp_avg_sq")
        QuantizedBuffer(st, name).check(want, group["block_size"])


def copy_value(value: Any, device: Any) -> Any:
    """A loaded state entry, owned by the optimizer: tensors copied as they are (dtype kept)."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    return dict(value) if isinstance(value, dict) else value


# ------------------------------------------------------------- version 1 -> 2
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
    buf.write(values, stochastic=False, generator=None)
    return new


# ----------------------------------------------------------------------- DCP
def init_state(opt: Any) -> None:
    """Create every missing parameter state of the :class:`dion_lp.Dion` ``opt`` without stepping.

    Zero momenta, the seeded Q, step 0: what the first step would create. Needed
    before loading a checkpoint in place (DCP loads into existing tensors).
    """
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if st:
                continue
            place = placement(p)
            if group["algorithm"] == "dion":
                init_dion_state(p, group, st, seed=opt.seed, index=opt.param_index(p), place=place)
            else:
                init_elementwise_state(p, group, st, place)


def dcp_state_dict(opt: Any) -> dict[str, Any]:
    """``opt.state_dict()`` in the form ``torch.distributed.checkpoint`` saves and loads in place.

    Creates any missing state first (:func:`init_state`) and keys the per-parameter
    states by ``str(index)`` (DCP restores non-tensor values under string keys
    only). Sharded states are DTensors, so a checkpoint saved on one mesh loads on
    a mesh of another size (resharded by DCP); the parameters must be sharded
    along the same dim (Shard(0) vs Shard(1)) as when saved. Plain tensors (the
    unsharded params' states) are saved once, from one rank.

    Usage::

        dcp.save({"model": model.state_dict(), "optim": dcp_state_dict(opt)}, checkpoint_id=d)
        sd = {"model": model.state_dict(), "optim": dcp_state_dict(opt)}   # any mesh size
        dcp.load(sd, checkpoint_id=d)
        model.load_state_dict(sd["model"]); load_dcp_state_dict(opt, sd["optim"])
    """
    init_state(opt)
    sd = opt.state_dict()
    sd["state"] = {str(k): v for k, v in sd["state"].items()}
    return sd


def load_dcp_state_dict(opt: Any, state_dict: dict[str, Any]) -> None:
    """Load a state dict of :func:`dcp_state_dict` form into ``opt`` (checked as on load)."""
    sd = dict(state_dict)
    sd["state"] = {int(k): v for k, v in state_dict["state"].items()}
    opt.load_state_dict(sd)
