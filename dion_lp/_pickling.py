"""Copies and pickles of :class:`dion_lp.Dion`: every attribute survives, process groups rebind.

``torch.optim.Optimizer`` pickles ``defaults``, ``state`` and ``param_groups`` only.
A Dion also holds its seed, each parameter's index (which seeds its Q and its
rounding), ``grad_sync``, the byte counters and the process group it averages
over. A process group is a handle on communicators and cannot be pickled:

- ``copy.deepcopy`` keeps the very same group objects (as a deep-copied DTensor
  keeps its mesh): the copy is replicated over the same ranks and steps like the
  original. Run its collectives on every rank, like the original's.
- ``pickle`` / ``torch.save`` record a group only when it is the default group
  (or spans every rank of it). The restored optimizer binds the default group
  of the process that restores it, as ``Dion(process_group=...)`` would there;
  with torch.distributed not initialised there it is single-process, and a
  warning says so whenever the world size differs from the pickling run's (each
  rank's momentum is its own: see :meth:`dion_lp.Dion.synchronize_for_checkpoint`).
  Any other group is refused with ``ValueError`` when pickling: build a Dion
  with that group in the new process and load ``opt.state_dict()`` into it.
- Hooks are not copied, as with torch's optimizers.

torch cannot ``pickle`` float8 tensors (``torch.save`` and ``copy.deepcopy`` can):
a pickled Dion carries its fp8 codes as their bytes and views them back.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dist.dtensor import is_sharded

__all__ = ["PICKLE_VERSION", "deepcopy_optimizer", "get_state", "set_state"]

PICKLE_VERSION = 1


def get_state(opt: Any, *, keep_groups: bool = False) -> dict[str, Any]:
    """What pickling ``opt`` keeps: torch's three entries plus a ``"dion_lp"`` record.

    Args:
        opt: the :class:`dion_lp.Dion`.
        keep_groups: keep the process-group objects themselves (deepcopy only).

    Raises:
        ValueError: ``opt`` averages over a group other than the default one and
            ``keep_groups`` is False.
    """
    state = torch.optim.Optimizer.__getstate__(opt)
    if not keep_groups:
        state["state"] = defaultdict(
            dict, {p: {k: _Bytes.wrap(v) for k, v in st.items()} for p, st in opt.state.items()}
        )
    params = [p for g in opt.param_groups for p in g["params"]]
    state["dion_lp"] = {
        "version": PICKLE_VERSION,
        "seed": opt._seed,
        "param_indices": [opt._param_index[id(p)] for p in params],
        "next_index": opt._next_index,
        "grad_sync": opt._grad_sync,
        "stats": opt._stats,
        "process_group": _group_record(opt, keep_groups),
    }
    return state


def set_state(opt: Any, state: dict[str, Any]) -> None:
    """Restore ``opt`` (made by ``cls.__new__``) from :func:`get_state`'s record."""
    state = dict(state)
    meta = state.pop("dion_lp", None)
    version = meta.get("version") if isinstance(meta, dict) else None
    if meta is None and "_param_index" in vars(opt):  # torch's load_state_dict updating opt
        _torch_setstate(opt, state)
        return
    if version != PICKLE_VERSION:
        raise ValueError(
            f"Invalid pickled dion_lp.Dion: pickle version {version!r}, this dion_lp reads "
            f"version {PICKLE_VERSION} (dion_lp 0.1.0 could not pickle a Dion); load the "
            "optimizer's state_dict() into a new Dion instead"
        )
    opt.defaults = state["defaults"]
    for st in state["state"].values():
        st.update({k: v.unwrap() for k, v in st.items() if isinstance(v, _Bytes)})
    _torch_setstate(opt, state)
    opt._warned_capturable_if_run_uncaptured = True  # as torch's __init__ sets it
    params = [p for g in opt.param_groups for p in g["params"]]
    opt._seed = meta["seed"]
    opt._param_index = {id(p): i for p, i in zip(params, meta["param_indices"], strict=True)}
    opt._next_index = meta["next_index"]
    opt._grad_sync = meta["grad_sync"]
    opt._stats = meta["stats"]
    opt._group, opt._world_size, opt._replicas = _restore_group(meta["process_group"])


class _Bytes:
    """A plain float8 tensor, pickled as its bytes (torch's pickling of float8 storages fails)."""

    def __init__(self, data: Tensor, dtype: torch.dtype) -> None:
        self.data, self.dtype = data, dtype

    @classmethod
    def wrap(cls, value: Any) -> Any:
        fp8 = isinstance(value, Tensor) and value.is_floating_point() and value.element_size() == 1
        return cls(value.view(torch.uint8), value.dtype) if fp8 and not is_sharded(value) else value

    def unwrap(self) -> Tensor:
        return self.data.view(self.dtype)


def _torch_setstate(opt: Any, state: dict[str, Any]) -> None:
    """torch's ``__setstate__``, without the ``differentiable`` default it adds for old pickles."""
    had_differentiable = "differentiable" in opt.defaults
    torch.optim.Optimizer.__setstate__(opt, state)
    if not had_differentiable:  # Dion's defaults stay as built
        opt.defaults.pop("differentiable", None)


def deepcopy_optimizer(opt: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(opt)``: everything copied except the process groups, which are shared."""
    new = type(opt).__new__(type(opt))
    memo[id(opt)] = new
    for group in (opt._group, opt._replicas):
        if group is not None:
            memo[id(group)] = group  # deepcopy returns memoized objects as they are
    set_state(new, copy.deepcopy(get_state(opt, keep_groups=True), memo))
    return new


def _group_record(opt: Any, keep_groups: bool) -> dict[str, Any]:
    group, world_size, replicas = opt._group, opt._world_size, opt._replicas is not None
    if group is None:
        return {"kind": None, "world_size": 1, "replicas": False}
    if keep_groups:
        return {"kind": "live", "group": group, "world_size": world_size, "replicas": replicas}
    if not _is_default_group(group):
        raise ValueError(
            f"Invalid process_group: {group!r}; a dion_lp.Dion averaging over a process group "
            "other than the default one cannot be pickled (process groups cannot be). "
            "copy.deepcopy keeps the group; to move the optimizer to another process, save "
            "opt.state_dict() and load it into a Dion built with the group there"
        )
    return {"kind": "default", "world_size": world_size, "replicas": replicas}


def _is_default_group(group: Any) -> bool:
    """The default group, or a group of every one of its ranks."""
    if group is dist.group.WORLD:
        return True
    ranks = dist.get_process_group_ranks(group)
    return ranks == list(range(dist.get_world_size()))


def _restore_group(record: dict[str, Any]) -> tuple[Any, int, Any]:
    """(group, world size, HSDP replicas) of a restored optimizer (see the module docstring)."""
    kind, saved = record["kind"], record["world_size"]
    if kind is None:
        return None, 1, None
    if kind == "live":
        group = record["group"]
        return group, saved, group if record["replicas"] else None
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else 1
    if world != saved:
        warnings.warn(
            f"dion_lp.Dion was pickled averaging over the default process group of {saved} "
            f"ranks and is restored where it has {world} rank(s)"
            f"{'' if initialised else ' (torch.distributed is not initialised)'}: it averages "
            "over those; its momentum is the pickling rank's own",
            stacklevel=4,
        )
    if not initialised or (world == 1 and not record["replicas"]):
        return None, 1, None
    group = dist.group.WORLD
    return group, world, group if record["replicas"] else None
