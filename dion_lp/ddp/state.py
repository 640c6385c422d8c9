"""The DDP hooks' states: plain data, as torch's ``PowerSGDState`` (no collective here).

Settings, the per-parameter keys that survive DDP's bucket rebuild, residuals,
low-rank warm starts, byte counts, the state-dict and pickling forms. The
algorithm is in :mod:`dion_lp.ddp.hooks`.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..dist.accounting import DEFAULT_BLOCK_SIZE, CommStats
from ..dist.collectives import check_member
from ..optimizer import Dion
from ..options import owns_exchange
from ..quant.formats import WIRE_FORMATS

__all__ = ["HOOK_STATE_VERSION", "CompressState", "DionHookState", "HookState", "check_grad_sync"]

HOOK_STATE_VERSION = 1

# (future of the bucket's means, [(param, gradient view into the bucket), ...])
Pending = tuple[torch.futures.Future[list[Tensor]], list[tuple[Tensor, Tensor]]]


# ----------------------------------------------------------------------------- validation
def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {minimum}")


def _check_process_group(group: Any) -> None:
    if group is None:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"Invalid process_group: {group!r}; torch.distributed is not initialised")
    if group is not dist.GroupMember.NON_GROUP_MEMBER and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"Invalid process_group: {group!r}; expected a ProcessGroup")
    check_member(group, "process_group")


def check_grad_sync(optimizer: Any) -> None:
    """Reject a :class:`dion_lp.Dion` that averages the gradients the hook averages too."""
    if isinstance(optimizer, Dion) and optimizer.grad_sync:
        raise ValueError(
            "Invalid optimizer: Dion(grad_sync=True) averages the element-wise gradients "
            "that the hook already averages; build it with grad_sync=False under DDP"
        )


def _check_dion_optimizer(optimizer: Any, hook_world_size: int) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__}; expected a torch.optim.Optimizer"
        )
    if not isinstance(optimizer, Dion):
        return
    check_grad_sync(optimizer)
    has_dion = any(owns_exchange(g) for g in optimizer.param_groups)
    if has_dion and hook_world_size > 1 and optimizer.world_size != hook_world_size:
        raise ValueError(
            f"Invalid optimizer: Dion is replicated over {optimizer.world_size} rank(s), the "
            f"hook over {hook_world_size}; the hook leaves Dion's gradients local, so Dion "
            "must exchange its factors over the same replicas (pass process_group=...)"
        )


# ----------------------------------------------------------------------------- states
class HookState:
    """What both hook states hold: settings, keys, residuals, warm starts, byte counts.

    Attributes:
        residuals: parameter key -> fp32 error-feedback residual, shaped like its gradient.
        lowrank_q: parameter key -> (m, r) fp32 warm start of its low-rank right factor.
        stats: the :class:`CommStats` the hook adds its bytes to.
        hook_steps: steps whose last bucket went through the hook.
        pending: this step's buckets waiting for the last one (not saved, not pickled).
    """

    def __init__(
        self,
        process_group: Any,
        comm_dtype: str,
        error_feedback: bool,
        block_size: int,
        lowrank_rank: int = 0,
    ) -> None:
        _check_process_group(process_group)
        if not isinstance(comm_dtype, str) or comm_dtype not in WIRE_FORMATS:
            choices = ", ".join(WIRE_FORMATS)
            raise ValueError(f"Invalid comm_dtype: {comm_dtype!r}; expected one of {choices}")
        if not isinstance(error_feedback, bool):
            raise ValueError(f"Invalid error_feedback: {error_feedback!r}; expected a bool")
        _check_int("block_size", block_size, 1)
        _check_int("lowrank_rank", lowrank_rank, 0)
        if lowrank_rank and not error_feedback:
            raise ValueError(
                f"Invalid lowrank_rank: {lowrank_rank!r} needs error_feedback=True (a rank-r "
                "mean without error feedback drops the rest of every gradient for good)"
            )
        self.process_group = process_group
        self.comm_dtype = comm_dtype
        self.error_feedback = error_feedback
        self.block_size = block_size
        self.lowrank_rank = lowrank_rank
        self.hook_steps = 0
        self.stats = CommStats()
        self.residuals: dict[str, Tensor] = {}
        self.lowrank_q: dict[str, Tensor] = {}
        self.pending: list[Pending] = []
        self._init_keys()

    def _init_keys(self) -> None:
        self._keys: dict[int, str] = {}  # id(param) -> key
        self._keyed: list[Tensor] = []  # keeps the keyed params alive: ids stay unique
        self._auto_keys = 0
        self._names_bound = False

    @property
    def world_size(self) -> int:
        """Ranks of ``process_group`` (None: the default group); 1 when not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    # ------------------------------------------------------------------ keys
    def bind(self, module: nn.Module) -> None:
        """Key residuals by ``module``'s parameter names (stable across runs and bucket layouts).

        Args:
            module: the trained model, or the DDP wrapping it.
        """
        if isinstance(module, DistributedDataParallel):
            module = module.module
        if not isinstance(module, nn.Module):
            raise ValueError(f"Invalid module: {type(module).__name__}; expected an nn.Module")
        self._init_keys()
        for name, p in module.named_parameters():
            self._set_key(p, name)
        self._names_bound = True

    def key(self, p: Tensor) -> str:
        """``p``'s key in :attr:`residuals` and :attr:`lowrank_q` (unbound: ``"auto.<i>"``,
        numbered in the order DDP first shows the params)."""
        key = self._keys.get(id(p))
        return key if key is not None else self._missing_key(p)

    def _set_key(self, p: Tensor, key: str) -> None:
        if id(p) not in self._keys:
            self._keyed.append(p)
        self._keys[id(p)] = key

    def _missing_key(self, p: Tensor) -> str:
        if self._names_bound:
            raise ValueError(
                f"Invalid parameter of shape {tuple(p.shape)}: not in the bound module; "
                "call state.bind(module) with the DDP-wrapped model (again after unpickling)"
            )
        return self._auto_key(p)

    def _auto_key(self, p: Tensor) -> str:
        key = f"auto.{self._auto_keys}"
        self._auto_keys += 1
        self._set_key(p, key)
        return key

    def _check_keys(self, keys: Iterable[str]) -> None:
        """Reject residual keys of parameters this state cannot have (bound states only)."""
        if not self._names_bound:
            return
        known = set(self._keys.values())
        unknown = sorted(k for k in keys if k not in known and not k.startswith("auto."))
        if unknown:
            raise ValueError(f"Invalid state_dict: residuals for unknown parameters {unknown[:5]}")

    # ------------------------------------------------------------ reporting
    def comm_stats(self) -> dict[str, Any]:
        """Wire bytes the hook sent on this rank (same form as ``Dion.comm_stats()``).

        Returns:
            ``{"bytes_sent": int, "steps": int, "last_step": int, "by_kind": {kind: int}}``.
        """
        return self.stats.as_dict()

    def residual_norm(self) -> float:
        """L2 norm of every error-feedback residual on this rank (0.0 when none)."""
        total = sum(float(r.double().pow(2).sum()) for r in self.residuals.values())
        return total**0.5

    # ---------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors only: loads with ``torch.load(..., weights_only=True)``.

        Returns:
            ``{"kind", "version", "comm_dtype", "error_feedback", "block_size",
            "lowrank_rank", "hook_steps", "residuals": {key: fp32 tensor},
            "lowrank_q": {key: (m, r) fp32 tensor}, "comm_stats": {...}}``.
        """
        return {
            "kind": type(self).__name__,
            "version": HOOK_STATE_VERSION,
            "comm_dtype": self.comm_dtype,
            "error_feedback": self.error_feedback,
            "block_size": self.block_size,
            "lowrank_rank": self.lowrank_rank,
            "hook_steps": self.hook_steps,
            "residuals": {k: r.detach().clone() for k, r in self.residuals.items()},
            "lowrank_q": {k: q.detach().clone() for k, q in self.lowrank_q.items()},
            "comm_stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; nothing changes if it does not fit.

        Raises:
            ValueError: another kind of state, version, wire format or block size,
                or residuals for parameters this state does not know.
        """
        self._check_state_dict(state_dict)
        residuals, factors = state_dict["residuals"], state_dict.get("lowrank_q", {})
        for what, tensors in (("residual", residuals), ("low-rank factor", factors)):
            for key, t in tensors.items():
                if not (isinstance(key, str) and isinstance(t, Tensor)) or t.dtype != torch.float32:
                    raise ValueError(f"Invalid state_dict: {what} {key!r} is not a float32 tensor")
            self._check_keys(tensors)
        self.residuals = {k: r.detach().clone() for k, r in residuals.items()}
        self.lowrank_q = {k: q.detach().clone() for k, q in factors.items()}
        self.hook_steps = int(state_dict["hook_steps"])
        if "comm_stats" in state_dict:
            self.stats.load_state_dict(state_dict["comm_stats"])

    def _check_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"Invalid state_dict: {type(state_dict).__name__}; expected a dict")
        required = {"kind", "version", "comm_dtype", "block_size", "hook_steps", "residuals"}
        missing = required - set(state_dict)
        if missing:
            raise ValueError(f"Invalid state_dict: missing {sorted(missing)}")
        saved = {"lowrank_rank": 0, **state_dict}  # saved before low-rank existed: 0
        for name, mine in (
            ("kind", type(self).__name__),
            ("version", HOOK_STATE_VERSION),
            ("comm_dtype", self.comm_dtype),
            ("block_size", self.block_size),
            ("lowrank_rank", self.lowrank_rank),
        ):
            if saved[name] != mine:
                raise ValueError(
                    f"Invalid state_dict: {name}={saved[name]!r}, this state has {mine!r}"
                )

    _UNPICKLED: tuple[str, ...] = ("process_group", "_keys", "_keyed", "_auto_keys", "pending")

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group and the (process-local) parameter identities."""
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled state on the default process group (``process_group=None``).

        A :class:`CompressState` bound with :meth:`bind` must be bound again, a
        :class:`DionHookState` needs ``state.optimizer = opt``; residuals are kept.
        """
        names_bound = state.get("_names_bound", False)
        self.__dict__.update(state)
        self.process_group = None
        self.pending = []
        self._init_keys()
        self._names_bound = names_bound


class CompressState(HookState):
    """State of :func:`~dion_lp.hooks.compress_hook` (and of ``compress_wrapper``'s hooks).

    Args:
        process_group: ranks to average over; None: the default group.
        comm_dtype: a wire format of ``dion_lp.quant.formats.WIRE_FORMATS``
            (fp8: per-block fp32 scales of ``block_size`` elements).
        error_feedback: keep per-parameter residuals of what rounding lost and
            send them the next step (unused with "fp32", which loses nothing).
        warmup_steps: the first k steps use a plain fp32 all-reduce of the bucket
            (torch's ``allreduce_hook``), then ``comm_dtype``.
        block_size: elements per scale of the fp8 formats.
        lowrank_rank: 0 (default) sends every gradient whole. r > 0: a gradient of
            2+ dims, viewed n x m, with ``(n + m) r * 2 <= n m`` travels as rank-r
            PowerSGD factors in ``comm_dtype`` (:mod:`dion_lp.ddp.lowrank`); needs
            ``error_feedback``. Not with ``compress_wrapper``.
        inner_state: what ``compress_wrapper`` passes to the hook it wraps
            (None: ``process_group``, what torch's default hooks take).

    Residuals are keyed by parameter name after ``state.bind(model)`` (``register_ddp``
    does it); unbound, by the order DDP first shows the parameters.
    """

    def __init__(
        self,
        process_group: Any = None,
        comm_dtype: str = "fp8_e4m3",
        error_feedback: bool = True,
        warmup_steps: int = 0,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        lowrank_rank: int = 0,
        inner_state: Any = None,
    ) -> None:
        super().__init__(process_group, comm_dtype, error_feedback, block_size, lowrank_rank)
        _check_int("warmup_steps", warmup_steps, 0)
        self.warmup_steps = warmup_steps
        self.inner_state = inner_state

    def in_warmup(self) -> bool:
        """True while the plain fp32 all-reduce is used (the first ``warmup_steps`` steps)."""
        return self.hook_steps < self.warmup_steps

    def __getstate__(self) -> dict[str, Any]:
        """As the base class; an ``inner_state`` that is a process group is dropped too."""
        state = super().__getstate__()
        if isinstance(state.get("inner_state"), dist.ProcessGroup):
            state["inner_state"] = None
        return state


class DionHookState(HookState):
    """State of :func:`~dion_lp.hooks.dion_hook`: which params Dion owns, the others' residuals.

    Args:
        optimizer: the optimizer; params of its groups with ``"algorithm": "dion"``
            are Dion-owned. A :class:`dion_lp.Dion` must be replicated over a
            group of the hook's size (built with ``process_group=...``, or with
            torch.distributed initialised) and have ``grad_sync=False``.
        process_group: ranks to average the other gradients over; None: default group.
        comm_dtype: wire format of the other gradients (``WIRE_FORMATS``).
        error_feedback: per-parameter residuals of the rounding (not with "fp32").
        block_size: elements per scale of the fp8 formats.
        lowrank_rank: 0 (default) sends the other gradients whole. r > 0: each of
            them with 2+ dims, viewed n x m, with ``(n + m) r * 2 <= n m`` (an
            embedding, an untied head) travels as rank-r PowerSGD factors in
            ``comm_dtype`` with error feedback (:mod:`dion_lp.ddp.lowrank`).

    Residuals are keyed by the parameter's position in the optimizer's param groups.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        process_group: Any = None,
        comm_dtype: str = "bf16",
        error_feedback: bool = True,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        lowrank_rank: int = 0,
    ) -> None:
        super().__init__(process_group, comm_dtype, error_feedback, block_size, lowrank_rank)
        self._optimizer: torch.optim.Optimizer | None = None
        self._owner_signature: tuple[Any, ...] | None = None
        self._owned: frozenset[int] = frozenset()
        self.optimizer = optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose Dion groups decide what stays local (settable)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        _check_dion_optimizer(optimizer, self.world_size)
        self._optimizer = optimizer
        self._owner_signature = None
        self._init_keys()
        self._bind_optimizer()

    def _bind_optimizer(self) -> None:
        """Key every param by its position in the optimizer (as optimizer state dicts do)."""
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            self._set_key(p, str(i))
        self._names_bound = True

    def _missing_key(self, p: Tensor) -> str:
        if self._optimizer is not None:
            self._bind_optimizer()  # a param group was added since
            if id(p) in self._keys:
                return self._keys[id(p)]
        return self._auto_key(p)  # a DDP param that the optimizer does not step

    _UNPICKLED = (*HookState._UNPICKLED, "_optimizer", "_owner_signature", "_owned")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As :meth:`HookState.__setstate__`; set ``state.optimizer`` before use."""
        super().__setstate__(state)
        self._optimizer = None
        self._owner_signature = None
        self._owned = frozenset()

    def owned(self) -> frozenset[int]:
        """``id`` of every param whose exchange the optimizer owns (:func:`owns_exchange`:
        "dion" groups, and Dion2 groups with ``dion2_exchange="selected_rows"``)."""
        if self._optimizer is None:
            raise ValueError(
                "Invalid DionHookState: no optimizer (unpickled?); set state.optimizer = opt"
            )
        groups = self._optimizer.param_groups
        signature = tuple(
            (id(g), len(g["params"]), g.get("algorithm"), g.get("dion2_exchange")) for g in groups
        )
        if signature != self._owner_signature:
            self._owned = frozenset(id(p) for g in groups if owns_exchange(g) for p in g["params"])
            self._owner_signature = signature
        return self._owned
