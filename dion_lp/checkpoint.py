"""State-dict checks and versions, the 0.1.0 converter, and the DCP helpers.

A Dion state dict is ``torch.optim.Optimizer``'s (``state`` + ``param_groups``)
plus a ``"dion_lp"`` section: format version, seed and the wire-byte counters.
Everything is a tensor or a plain value, so ``torch.load(..., weights_only=True)``
reads it.

Loading refuses, before it changes anything, a state that this optimizer would
not have produced: another optimizer's, another version's, another number of
parameters, a group whose stored layout differs (algorithm, momentum format,
block size, rank), or a parameter state that does not fit its parameter (every
entry checked, the parameter named). Converting between formats is not done
silently: load into an optimizer built like the saved one instead.

Versions: 1 is dion_lp 0.1.0, 2 this one; :func:`upgrade_state_dict`
(:mod:`dion_lp._upgrade`) converts a version-1 state dict.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from ._upgrade import STATE_DICT_VERSION, upgrade_state_dict
from .algorithms.dion import init_dion_state, q_dtype
from .algorithms.dion2 import init_dion2_state
from .algorithms.elementwise import ELEMENTWISE_STATE, init_elementwise_state, state_format
from .dist.accounting import CommStats
from .dist.collectives import quantized_mean_
from .dist.dtensor import is_sharded
from .layouts.placement import placement
from .options import (
    ADDED_HYPERPARAMETERS,
    HYPERPARAMETERS,
    MATRIX_ALGORITHMS,
    check_seed,
    dion_rank,
    owns_exchange,
    validate_group,
)
from .quant.buffer import QuantizedBuffer

__all__ = [
    "LAYOUT_KEYS",
    "STATE_DICT_VERSION",
    "check_loadable",
    "dcp_state_dict",
    "init_state",
    "load_dcp_state_dict",
    "synchronize_momenta",
    "upgrade_state_dict",
    "with_added_hyperparameters",
]

# Group keys that decide the layout of the stored state: they must match.
LAYOUT_KEYS = (
    "algorithm",
    "momentum_dtype",
    "block_size",
    "rank_fraction",
    "rank_multiple_of",
    "momentum_residual",
)


def with_added_hyperparameters(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (shallow copy) whose groups have every key added since their format's
    release (:data:`dion_lp.options.ADDED_HYPERPARAMETERS`), with the value they ran with."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list):
        return state_dict  # check_loadable names what is wrong
    filled = [{**ADDED_HYPERPARAMETERS, **g} if isinstance(g, dict) else g for g in groups]
    return {**state_dict, "param_groups": filled}


def check_loadable(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` fits an optimizer with ``param_groups``.

    Everything a load would use is checked, so a refused load changes nothing:
    the version, the seed and byte counters, each group's size, layout keys and
    hyperparameters, and every parameter's state (entries, step, each buffer's
    rows, format and block layout, Q's shape and dtype, the residual's), against
    the parameter it would be loaded into, naming that parameter.

    Args:
        state_dict: what :meth:`dion_lp.Dion.state_dict` returned.
        param_groups: the loading optimizer's groups (their current settings).
    """
    _check_meta(state_dict)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"state_dict holds {len(saved_groups)} param groups, this optimizer {len(param_groups)}"
        )
    known: set[Any] = set()
    for index, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        _check_group(saved, group, index)
        known.update(saved["params"])
        for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
            st = state_dict["state"].get(saved_id)
            if st:
                names = group.get("param_names")
                what = f"#{i} of param group {index}"
                what = f"parameter {names[i]!r} ({what})" if names else f"parameter {what}"
                _check_param_state(st, p, group, what)
    unknown = sorted(map(str, set(state_dict["state"]) - known))
    if unknown:
        raise ValueError(f"state_dict holds state for parameter ids {unknown} of no param group")


def _check_meta(state_dict: dict[str, Any]) -> None:
    """The ``"dion_lp"`` section, if this dion_lp reads it (version, seed, byte counters)."""
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
    if "seed" in meta:
        check_seed(meta["seed"])
    if "comm_stats" in meta:
        CommStats().load_state_dict(meta["comm_stats"])  # refuses a bad record


def _check_group(saved: dict[str, Any], group: dict[str, Any], index: int) -> None:
    """A saved group must have this group's size and layout, and valid hyperparameters."""
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
    missing = [key for key in HYPERPARAMETERS if key not in saved]
    if missing:
        raise ValueError(f"param group {index}: state_dict has no {', '.join(missing)}")
    try:  # loading sets the saved hyperparameters: they must be valid
        validate_group(saved)
    except ValueError as err:
        raise ValueError(f"param group {index} of state_dict: {err}") from None


def _buffers(group: dict[str, Any]) -> dict[str, str]:
    """Name -> format asked for, of every quantized buffer a parameter of ``group`` keeps."""
    fmt, algorithm = group["momentum_dtype"], group["algorithm"]
    if algorithm in MATRIX_ALGORITHMS:
        return {"momentum": fmt}
    return {
        name: state_format(fmt, unsigned=unsigned)
        for name, unsigned in ELEMENTWISE_STATE[algorithm].items()
    }


def _check_param_state(st: Any, p: Tensor, group: dict[str, Any], what: str) -> None:
    """A saved per-parameter state must be what ``group`` keeps for ``p``, entry by entry."""
    if not isinstance(st, dict):
        raise ValueError(f"Invalid state for {what}: {type(st).__name__}, expected a dict")
    place = placement(p)
    shape, rows, U = place.global_shape, place.rows, place.row_numel
    what = f"{what} of shape {shape}"
    buffers = _buffers(group)
    required = {"step", *(f"{b}_{s}" for b in buffers for s in ("codes", "format"))}
    if group["algorithm"] == "dion":
        required.add("Q")
        if group["momentum_residual"] and group["momentum_dtype"] != "fp32":
            required.add("momentum_residual")
    if group["algorithm"] == "nordion2":
        required.add("row_variance")
    allowed = required | {f"{b}_scales" for b in buffers}
    missing, unexpected = sorted(required - set(st)), sorted(set(st) - allowed, key=str)
    if missing or unexpected:
        raise ValueError(
            f"Invalid state for {what}: missing entries {missing}, unexpected {unexpected} "
            f"(a {group['algorithm']} parameter with momentum_dtype="
            f"{group['momentum_dtype']!r})"
        )
    step = st["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid state for {what}: step {step!r}, expected an int >= 0")
    for key, value in st.items():
        if isinstance(value, Tensor) and is_sharded(value) != place.sharded:
            kind = "a DTensor" if is_sharded(value) else "a plain tensor"
            raise ValueError(
                f"Invalid state for {what}: {key!r} is {kind} but the parameter is "
                f"{'a DTensor' if place.sharded else 'a plain tensor'}; the states of sharded "
                "parameters load through dion_lp.dcp_state_dict / load_dcp_state_dict"
            )
    for name, fmt in buffers.items():
        _check_buffer(st, name, fmt, group["block_size"], rows, U, what)
    if "Q" in required:
        m, n = shape
        want = (min(m, n), dion_rank(m, n, group["rank_fraction"], group["rank_multiple_of"]))
        _check_tensor(st["Q"], "Q", want, q_dtype(group["momentum_dtype"]), what)
    if "row_variance" in required:
        _check_tensor(st["row_variance"], "row_variance", (shape[0],), torch.float32, what)
    if "momentum_residual" in required:
        _check_tensor(st["momentum_residual"], "momentum_residual", (rows, U), torch.bfloat16, what)


def _check_buffer(
    st: dict[str, Any], name: str, fmt: str, block_size: int, rows: int, U: int, what: str
) -> None:
    """Buffer ``name`` must hold ``rows x U`` in the layout ``fmt`` / ``block_size`` create."""
    record, codes = st[f"{name}_format"], st[f"{name}_codes"]
    keys = {"fmt", "block_size", "row_block", "row_numel", "version"}
    if not isinstance(record, dict) or not keys <= set(record) or not isinstance(codes, Tensor):
        raise ValueError(
            f"Invalid state for {what}: buffer {name!r} has format record {record!r} and codes "
            f"of type {type(codes).__name__}; expected a record with {sorted(keys)} and a tensor"
        )
    buf = QuantizedBuffer(st, name)
    buf.check_shape(rows, U, what)
    try:
        buf.check(fmt, block_size)
    except ValueError as err:
        raise ValueError(f"Invalid state for {what}: {err}") from None


def _check_tensor(value: Any, key: str, shape: tuple[int, ...], dtype: Any, what: str) -> None:
    if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
        raise ValueError(
            f"Invalid state for {what}: {key} is {got}, the parameter needs {dtype} {shape}"
        )


def copy_value(value: Any, device: Any, copy: bool = True) -> Any:
    """A loaded state entry, owned by the optimizer: tensors copied as they are (dtype kept).

    ``copy=False`` adopts tensors already on ``device`` (fresh ones the caller hands over).
    """
    if isinstance(value, Tensor):
        return value.to(device=device, copy=copy)
    return dict(value) if isinstance(value, dict) else value


# ----------------------------------------------------------------------- DCP
def init_state(opt: Any) -> None:
    """Create every missing parameter state of the :class:`dion_lp.Dion` ``opt`` without stepping.

    Zero momenta, the seeded Q, step 0: what the first step would create.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = _new_state(opt, group, p)


def _new_state(opt: Any, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """The state the first step of ``opt`` would create for ``p`` (``opt`` is not changed)."""
    st: dict[str, Any] = {}
    place = placement(p)
    if group["algorithm"] == "dion":
        init_dion_state(p, group, st, seed=opt.seed, index=opt.param_index(p), place=place)
    elif group["algorithm"] in MATRIX_ALGORITHMS:
        init_dion2_state(p, group, st, place)
    else:
        init_elementwise_state(p, group, st, place)
    return st


def dcp_state_dict(opt: Any, *, copy: bool = True) -> dict[str, Any]:
    """``opt.state_dict()`` in the form ``torch.distributed.checkpoint`` saves and loads in place.

    Every parameter has a state (the one the first step would create where ``opt``
    has none yet), keyed by ``str(index)`` (DCP restores non-tensor values under
    string keys only). Sharded states are DTensors, so a checkpoint saved on one
    mesh loads on a mesh of another size (resharded by DCP); the parameters must
    be sharded along the same dim (Shard(0) vs Shard(1)) as when saved. Plain
    tensors (the unsharded params' states) are saved once, from one rank.

    By default the dict is a copy: ``dcp.load`` writes into it, not into the
    optimizer, and :func:`load_dcp_state_dict` checks it before anything in
    ``opt`` changes, so a refused checkpoint leaves ``opt`` as it was.

    Args:
        opt: the :class:`dion_lp.Dion` (not changed).
        copy: hand out copies of the state tensors (default): this costs one copy
            of this rank's optimizer state while the dict lives (a load then adopts
            it: no second copy). ``False`` hands out the optimizer's live tensors
            and record dicts, which saves that memory when *saving*; a ``dcp.load``
            into such a dict writes into the optimizer before anything is checked.

    Usage::

        dcp.save({"model": model.state_dict(), "optim": dcp_state_dict(opt)}, checkpoint_id=d)
        sd = {"model": model.state_dict(), "optim": dcp_state_dict(opt)}   # any mesh size
        dcp.load(sd, checkpoint_id=d)
        model.load_state_dict(sd["model"]); load_dcp_state_dict(opt, sd["optim"])
    """
    sd = opt.state_dict()
    sd["param_groups"] = deepcopy(sd["param_groups"])  # DCP writes into lists in place
    states: dict[str, Any] = {}
    for saved, group in zip(sd["param_groups"], opt.param_groups, strict=True):
        for index, p in zip(saved["params"], group["params"], strict=True):
            st = opt.state.get(p)
            if not st:
                states[str(index)] = _new_state(opt, group, p)
            elif copy:
                states[str(index)] = {k: _copy_entry(v) for k, v in st.items()}
            else:
                states[str(index)] = st
    sd["state"] = states
    return sd


def _copy_entry(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return deepcopy(value) if isinstance(value, dict) else value


def load_dcp_state_dict(opt: Any, state_dict: dict[str, Any]) -> None:
    """Load a state dict of :func:`dcp_state_dict` form into ``opt``.

    Checked as :meth:`dion_lp.Dion.load_state_dict` checks, before anything
    changes; then ``opt`` adopts the dict's state tensors (no copy).

    Raises:
        ValueError: as :meth:`dion_lp.Dion.load_state_dict`, e.g. a checkpoint saved
            with another ``momentum_dtype``.
    """
    sd = dict(state_dict)
    sd["state"] = {int(k): v for k, v in state_dict["state"].items()}
    opt._load_state_dict(sd, copy=False)


def synchronize_momenta(opt: Any, group: Any, replicas: Any, stats: CommStats) -> None:
    """:meth:`dion_lp.Dion.synchronize_for_checkpoint`: every rank's Dion momenta replaced by
    their fp32 mean over ``group`` (plain parameters) or ``replicas`` (sharded ones)."""
    by_group: dict[str, list[tuple[QuantizedBuffer, Tensor]]] = {"local": [], "sharded": []}
    for g in opt.param_groups:
        if not owns_exchange(g):  # the others' momenta are identical on every rank
            continue
        for p in g["params"]:
            st = opt.state.get(p)
            if st:
                buf = QuantizedBuffer(st, "momentum")
                by_group["sharded" if is_sharded(p) else "local"].append((buf, buf.read()))
    for key, over in (("local", group), ("sharded", replicas)):
        entries = by_group[key]
        if over is None or (key == "local" and opt.world_size == 1):
            continue
        momenta = [M.clone() for _, M in entries]
        quantized_mean_(momenta, "fp32", over, stats)
        for (buf, _), M in zip(entries, momenta, strict=True):
            buf.write(M, stochastic=False)
