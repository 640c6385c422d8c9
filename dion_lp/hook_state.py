"""The state every DDP hook of :mod:`dion_lp.hooks` shares.

Argument checks, the per-parameter keys that survive DDP's bucket rebuild, the
error-feedback residuals, the one coalesced quantized mean per step (taken when
DDP hands over the step's last bucket), byte counting, and the state-dict and
pickling forms. :mod:`dion_lp.hooks` builds the public states and hooks on it.
"""

# No ``from __future__ import annotations``: kept like hooks.py, whose annotations
# DDP inspects at run time.

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .comm import COMM_FORMATS, CommStats, check_member, collective, quantized_mean_
from .lowrank import compressed_shape, initial_q, lowrank_mean_

HOOK_STATE_VERSION = 1


# ----------------------------------------------------------------------------- validation
def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(choices)}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected a bool")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {minimum}")


def _check_process_group(process_group: Any) -> None:
    if process_group is None:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"Invalid process_group: {process_group!r}; torch.distributed is not initialised"
        )
    if process_group is not dist.GroupMember.NON_GROUP_MEMBER and not isinstance(
        process_group, dist.ProcessGroup
    ):
        raise ValueError(f"Invalid process_group: {process_group!r}; expected a ProcessGroup")
    check_member(process_group, "process_group")


def _world_size(process_group: Any) -> int:
    """Ranks of ``process_group`` (None: the default group); 1 when not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


# ----------------------------------------------------------------------------- states
class _HookState:
    """What both hook states share: format, residuals, keys, byte counts, checkpointing."""

    def __init__(
        self,
        process_group: Any,
        comm_dtype: str,
        error_feedback: bool,
        block_size: int,
        lowrank_rank: int = 0,
    ) -> None:
        _check_process_group(process_group)
        _check_choice("comm_dtype", comm_dtype, COMM_FORMATS)
        _check_bool("error_feedback", error_feedback)
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
        self.hook_steps = 0  # steps whose last bucket went through the hook
        self._stats = CommStats()
        self._residuals: dict[str, Tensor] = {}  # parameter key -> fp32 residual
        self._lowrank_q: dict[str, Tensor] = {}  # parameter key -> (m, r) fp32 warm start
        self._pending: list[tuple[torch.futures.Future[Tensor], Tensor, list[Any]]] = []
        self._init_keys()

    def _init_keys(self) -> None:
        self._keys: dict[int, str] = {}  # id(param) -> key
        self._keyed: list[Tensor] = []  # keeps the keyed params alive: ids stay unique
        self._auto_keys = 0
        self._names_bound = False

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

    def _set_key(self, p: Tensor, key: str) -> None:
        if id(p) not in self._keys:
            self._keyed.append(p)
        self._keys[id(p)] = key

    def _key(self, p: Tensor) -> str:
        key = self._keys.get(id(p))
        return key if key is not None else self._missing_key(p)

    def _missing_key(self, p: Tensor) -> str:
        if self._names_bound:
            raise ValueError(
                f"Invalid parameter of shape {tuple(p.shape)}: not in the bound module; "
                "call state.bind(module) with the DDP-wrapped model (again after unpickling)"
            )
        return self._auto_key(p)

    def _auto_key(self, p: Tensor) -> str:
        """Next key in the order DDP first shows the params (deterministic per model)."""
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

    # --------------------------------------------------------------- averaging
    def _residual(self, p: Tensor, grad: Tensor) -> Tensor:
        key = self._key(p)
        r = self._residuals.get(key)
        if r is None:
            r = self._residuals[key] = torch.zeros_like(grad, dtype=torch.float32)
        elif r.shape != grad.shape:
            raise ValueError(
                f"Invalid residual {key!r}: shape {tuple(r.shape)}, gradient {tuple(grad.shape)}"
            )
        elif r.device != grad.device:
            r = self._residuals[key] = r.to(grad.device)
        return r

    @torch.no_grad()
    def _average_(self, grads: list[Tensor], params: list[Tensor], fmt: str) -> None:
        """Replace ``grads`` (views into a bucket) by their mean over the group, in ``fmt``."""
        if not grads:
            return
        use_ef = self.error_feedback and fmt != "fp32"  # fp32 loses nothing to feed back
        if not use_ef and all(g.dtype == torch.float32 for g in grads):
            quantized_mean_(grads, fmt, self.process_group, self._stats, block_size=self.block_size)
            return
        errors, xs = None, [g.float() for g in grads]  # copies, unless fp32
        if use_ef:
            errors = [self._residual(p, g) for p, g in zip(params, grads, strict=True)]
            xs = [x + r for x, r in zip(xs, errors, strict=True)]
        quantized_mean_(
            xs, fmt, self.process_group, self._stats, block_size=self.block_size, errors=errors
        )
        for g, x in zip(grads, xs, strict=True):
            g.copy_(x)

    def _drop_nonfinite_(
        self, keyed: list[tuple[str, Tensor, Tensor]]
    ) -> list[tuple[str, Tensor, Tensor]]:
        """The (key, param, gradient) triples whose gradient is finite on every rank.

        One all-reduce (MAX) of a uint8 flag per gradient tells every rank which
        gradients are non-finite anywhere; those are set to NaN on every rank (as
        DDP's own all-reduce would spread them, so the optimizer raises or skips
        consistently) and kept out of the mean: their residuals and low-rank
        factors stay as they were, and the codecs never see a NaN.
        """
        if not keyed:
            return keyed
        grads = [g for _, _, g in keyed]
        flags = torch.stack([~torch.isfinite(g).all() for g in grads]).to(torch.uint8)
        world = _world_size(self.process_group)
        if world > 1:
            with collective("all_reduce of the hook's gradient flags", self.process_group):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
            self._stats.record_collective("all_reduce", flags.numel(), world)
        if not flags.any():
            return keyed
        finite = []
        for t, bad in zip(keyed, flags.tolist(), strict=True):
            if bad:
                t[2].fill_(float("nan"))
            else:
                finite.append(t)
        return finite

    def _lowrank_average_(self, keyed: list[tuple[str, Tensor, Tensor]]) -> None:
        """Rank-``lowrank_rank`` means of the (key, param, gradient) matrices (PowerSGD)."""
        if not keyed:
            return
        qs = []
        for key, _, g in keyed:
            _, m, r = compressed_shape(g.shape, self.lowrank_rank)
            q = self._lowrank_q.get(key)
            if q is None:
                q = initial_q(key, m, r)
            elif q.shape != (m, r):
                raise ValueError(
                    f"Invalid low-rank factor {key!r}: shape {tuple(q.shape)}, expected {(m, r)}"
                )
            q = self._lowrank_q[key] = q.to(g.device)
            qs.append(q)
        lowrank_mean_(
            [g for _, _, g in keyed],
            [self._residual(p, g) for _, p, g in keyed],
            qs,
            self.comm_dtype,
            self.process_group,
            self._stats,
            block_size=self.block_size,
        )

    def _end_bucket(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            self._stats.end_step()
            self.hook_steps += 1

    def _mean_at_last_bucket(
        self, bucket: dist.GradBucket, pairs: list[tuple[Tensor, Tensor]]
    ) -> torch.futures.Future[torch.Tensor]:
        """Future of ``bucket``'s buffer; at the step's last bucket, average every pending pair.

        ``pairs`` are (param, gradient view into the bucket) to average. They wait
        until DDP hands over the last bucket of the step; then ONE coalesced mean
        covers the whole step in the order of the parameters' keys, so the result
        does not depend on DDP's bucket layout, and every future completes.
        """
        if bucket.index() == 0:
            self._pending.clear()  # left over from a backward pass that raised
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._pending.append((fut, bucket.buffer(), pairs))
        if not bucket.is_last():
            return fut
        pending, self._pending = self._pending, []
        try:
            keyed = sorted(
                ((self._key(p), p, g) for _, _, ps in pending for p, g in ps), key=lambda t: t[0]
            )
            keyed = self._drop_nonfinite_(keyed)
            low, dense = [], []
            for t in keyed:
                (low if compressed_shape(t[2].shape, self.lowrank_rank) else dense).append(t)
            self._average_([g for _, _, g in dense], [p for _, p, _ in dense], self.comm_dtype)
            self._lowrank_average_(low)
        except BaseException as err:
            for f, _, _ in pending:
                f.set_exception(err)
            raise
        self._end_bucket(bucket)
        for f, buffer, _ in pending:
            f.set_result(buffer)
        return fut

    # ------------------------------------------------------------ reporting
    def comm_stats(self) -> dict[str, Any]:
        """Wire bytes the hook sent on this rank (same form as ``Dion.comm_stats()``).

        Returns:
            ``{"bytes_sent": int, "steps": int, "last_step": int, "by_kind": {kind: int}}``.
        """
        return self._stats.as_dict()

    def residual_norm(self) -> float:
        """L2 norm of every error-feedback residual on this rank (0.0 when none)."""
        total = sum(float(r.double().pow(2).sum()) for r in self._residuals.values())
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
            "residuals": {k: r.detach().clone() for k, r in self._residuals.items()},
            "lowrank_q": {k: q.detach().clone() for k, q in self._lowrank_q.items()},
            "comm_stats": self._stats.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; nothing changes if it does not fit.

        Raises:
            ValueError: another kind of state, version, wire format or block size,
                or residuals for parameters this state does not know.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"Invalid state_dict: {type(state_dict).__name__}; expected a dict")
        required = {"kind", "version", "comm_dtype", "block_size", "hook_steps", "residuals"}
        missing = required - set(state_dict)
        if missing:
            raise ValueError(f"Invalid state_dict: missing {sorted(missing)}")
        for name, mine in (
            ("kind", type(self).__name__),
            ("version", HOOK_STATE_VERSION),
            ("comm_dtype", self.comm_dtype),
            ("block_size", self.block_size),
        ):
            if state_dict[name] != mine:
                raise ValueError(
                    f"Invalid state_dict: {name}={state_dict[name]!r}, this state has {mine!r}"
                )
        rank = state_dict.get("lowrank_rank", 0)  # saved before low-rank existed: 0
        if rank != self.lowrank_rank:
            raise ValueError(
                f"Invalid state_dict: lowrank_rank={rank!r}, this state has {self.lowrank_rank!r}"
            )
        residuals = state_dict["residuals"]
        factors = state_dict.get("lowrank_q", {})
        for what, tensors in (("residual", residuals), ("low-rank factor", factors)):
            for key, t in tensors.items():
                if (
                    not isinstance(key, str)
                    or not isinstance(t, Tensor)
                    or t.dtype != torch.float32
                ):
                    raise ValueError(f"Invalid state_dict: {what} {key!r} is not a float32 tensor")
            self._check_keys(tensors)
        self._residuals = {k: r.detach().clone() for k, r in residuals.items()}
        self._lowrank_q = {k: q.detach().clone() for k, q in factors.items()}
        self.hook_steps = int(state_dict["hook_steps"])
        if "comm_stats" in state_dict:
            self._stats.load_state_dict(state_dict["comm_stats"])

    _UNPICKLED = ("process_group", "_keys", "_keyed", "_auto_keys", "_pending")

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
        self._pending = []
        self._init_keys()
        self._names_bound = names_bound
