"""DDP communication hooks: Dion's matrices stay local, the other gradients travel compressed.

PyTorch's conventions: ``ddp.register_comm_hook(state, hook)``; ``hook(state,
bucket)`` returns a ``torch.futures.Future[torch.Tensor]`` of the bucket's buffer.

- :func:`dion_hook` + :class:`DionHookState`, for DDP + :class:`dion_lp.Dion`: the
  gradient slices of params Dion owns (group ``"algorithm": "dion"``) stay LOCAL,
  no collective at all (replicated Dion exchanges their factors itself and needs
  each rank's own gradient); every other slice is averaged in ``comm_dtype``.
- :func:`compress_hook` + :class:`CompressState`, for any optimizer: every
  gradient averaged in ``comm_dtype``, optionally after ``warmup_steps`` steps of
  plain fp32 all-reduce. :func:`compress_wrapper` composes a bf16 cast with error
  feedback with another hook (e.g. torch's PowerSGD).
- :func:`register_ddp` picks the hook and state for an optimizer.

Averaging is :func:`dion_lp.comm.quantized_mean_` (quantized all-to-all, fp32
sums, all-gather; never a sum in 8 bits): every rank receives bitwise identical
means. Error feedback: each rank keeps a residual per parameter, sends g + r and
keeps its share of what rounding lost, so that the mean of the new residuals is
exactly what the applied mean missed: the sum of applied means equals the sum of
true means up to one step's residual. Residuals are keyed per parameter (its
optimizer position, or its name after :meth:`CompressState.bind`), never per
bucket index, so DDP's bucket rebuild after the first iteration keeps them valid.

When: a bucket's slices wait until DDP hands over the step's last bucket (it
hands them over in index order); then ONE coalesced mean covers every slice of
the step, in the order of the parameters' keys, and all the step's futures
complete. A step costs one all-to-all + one all-gather whatever the bucketing,
and the means do not depend on DDP's bucket layout, so a model re-wrapped after
a checkpoint (new buckets, rebuilt after its first iteration) resumes bit for
bit. The collective is synchronous, inside the last bucket's hook: correct with
``gradient_as_bucket_view``, ``static_graph``, ``find_unused_parameters`` and
``no_sync``, but not overlapped with the backward pass, and it holds transient
fp32 copies of the step's averaged gradients. One hook state serves one DDP model.

Bytes go into a :class:`dion_lp.comm.CommStats` (nccl-tests bus-bandwidth
convention): ``state.comm_stats()`` has the form of ``Dion.comm_stats()``.
"""

# No ``from __future__ import annotations``: DDP compares the hooks' annotations
# with ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` at run time.

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from .comm import COMM_FORMATS, DEFAULT_BLOCK_SIZE, CommStats, quantized_mean_
from .dion import Dion

__all__ = [
    "HOOK_STATE_VERSION",
    "CompressState",
    "DionHookState",
    "compress_hook",
    "compress_wrapper",
    "dion_hook",
    "register_ddp",
]

HOOK_STATE_VERSION = 1
# A wrapped hook sums in the buffer's dtype; dion_lp never sums in 8 bits.
_WRAPPER_FORMATS = ("fp32", "bf16")

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


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
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"Invalid process_group: {process_group!r}; expected a ProcessGroup")
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"Invalid process_group: {process_group!r}; this rank is not a member")


def _world_size(process_group: Any) -> int:
    """Ranks of ``process_group`` (None: the default group); 1 when not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


# ----------------------------------------------------------------------------- states
class _HookState:
    """What both hook states share: format, residuals, keys, byte counts, checkpointing."""

    def __init__(
        self, process_group: Any, comm_dtype: str, error_feedback: bool, block_size: int
    ) -> None:
        _check_process_group(process_group)
        _check_choice("comm_dtype", comm_dtype, COMM_FORMATS)
        _check_bool("error_feedback", error_feedback)
        _check_int("block_size", block_size, 1)
        self.process_group = process_group
        self.comm_dtype = comm_dtype
        self.error_feedback = error_feedback
        self.block_size = block_size
        self.hook_steps = 0  # steps whose last bucket went through the hook
        self._stats = CommStats()
        self._residuals: dict[str, Tensor] = {}  # parameter key -> fp32 residual
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
            self._average_([g for _, _, g in keyed], [p for _, p, _ in keyed], self.comm_dtype)
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
            "hook_steps", "residuals": {key: fp32 tensor}, "comm_stats": {...}}``.
        """
        return {
            "kind": type(self).__name__,
            "version": HOOK_STATE_VERSION,
            "comm_dtype": self.comm_dtype,
            "error_feedback": self.error_feedback,
            "block_size": self.block_size,
            "hook_steps": self.hook_steps,
            "residuals": {k: r.detach().clone() for k, r in self._residuals.items()},
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
        residuals = state_dict["residuals"]
        for key, r in residuals.items():
            if not isinstance(key, str) or not isinstance(r, Tensor) or r.dtype != torch.float32:
                raise ValueError(f"Invalid state_dict: residual {key!r} is not a float32 tensor")
        self._check_keys(residuals)
        self._residuals = {k: r.detach().clone() for k, r in residuals.items()}
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


class CompressState(_HookState):
    """State of :func:`compress_hook` (and of :func:`compress_wrapper`'s hooks).

    Args:
        process_group: ranks to average over; None: the default group.
        comm_dtype: "fp32", "bf16", "fp8_e4m3" or "fp8_e5m2" (fp8: per-block fp32
            scales of ``block_size`` elements).
        error_feedback: keep per-parameter residuals of what rounding lost and
            send them the next step (unused with "fp32", which loses nothing).
        warmup_steps: the first k steps use a plain fp32 all-reduce of the bucket
            (torch's ``allreduce_hook``), then ``comm_dtype``.
        block_size: elements per scale of the fp8 formats.
        inner_state: what :func:`compress_wrapper` passes to the hook it wraps
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
        inner_state: Any = None,
    ) -> None:
        super().__init__(process_group, comm_dtype, error_feedback, block_size)
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


class DionHookState(_HookState):
    """State of :func:`dion_hook`: which params Dion owns, and the other params' residuals.

    Args:
        optimizer: the optimizer; params of its groups with ``"algorithm": "dion"``
            are Dion-owned. A :class:`dion_lp.Dion` must be replicated over a
            group of the hook's size (built with ``process_group=...``, or with
            torch.distributed initialised) and have ``grad_sync=False``.
        process_group: ranks to average the other gradients over; None: default group.
        comm_dtype: wire format of the other gradients ("fp32", "bf16", "fp8_e4m3",
            "fp8_e5m2").
        error_feedback: per-parameter residuals of the rounding (not with "fp32").
        block_size: elements per scale of the fp8 formats.

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
    ) -> None:
        super().__init__(process_group, comm_dtype, error_feedback, block_size)
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
        _check_dion_optimizer(optimizer, _world_size(self.process_group))
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

    _UNPICKLED = (*_HookState._UNPICKLED, "_optimizer", "_owner_signature", "_owned")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As :meth:`_HookState.__setstate__`; set ``state.optimizer`` before use."""
        super().__setstate__(state)
        self._optimizer = None
        self._owner_signature = None
        self._owned = frozenset()

    def owned(self) -> frozenset[int]:
        """``id`` of every param Dion owns (its group's algorithm is "dion")."""
        if self._optimizer is None:
            raise ValueError(
                "Invalid DionHookState: no optimizer (unpickled?); set state.optimizer = opt"
            )
        groups = self._optimizer.param_groups
        signature = tuple((id(g), len(g["params"]), g.get("algorithm")) for g in groups)
        if signature != self._owner_signature:
            self._owned = frozenset(
                id(p) for g in groups if g.get("algorithm") == "dion" for p in g["params"]
            )
            self._owner_signature = signature
        return self._owned


def _check_dion_optimizer(optimizer: Any, hook_world_size: int) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__}; expected a torch.optim.Optimizer"
        )
    if not isinstance(optimizer, Dion):
        return
    _check_grad_sync(optimizer)
    has_dion = any(g["algorithm"] == "dion" for g in optimizer.param_groups)
    if has_dion and hook_world_size > 1 and optimizer._world_size != hook_world_size:
        raise ValueError(
            f"Invalid optimizer: Dion is replicated over {optimizer._world_size} rank(s), the "
            f"hook over {hook_world_size}; the hook leaves Dion's gradients local, so Dion "
            "must exchange its factors over the same replicas (pass process_group=...)"
        )


def _check_grad_sync(optimizer: Any) -> None:
    if isinstance(optimizer, Dion) and optimizer._grad_sync:
        raise ValueError(
            "Invalid optimizer: Dion(grad_sync=True) averages the element-wise gradients "
            "that the hook already averages; build it with grad_sync=False under DDP"
        )


# ----------------------------------------------------------------------------- hooks
def dion_hook(state: DionHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP hook for Dion: Dion-owned slices stay local, the rest is averaged in ``comm_dtype``.

    Args:
        state: the :class:`DionHookState`.
        bucket: DDP's bucket; its flat buffer (numel,) holds this rank's gradients
            of ``bucket.parameters()`` at the offsets of ``bucket.gradients()``.

    Returns:
        A future of the bucket buffer (numel,), completed when the step's last
        bucket arrives: the non-Dion slices replaced by their mean over the group
        (identical on every rank), the Dion-owned slices this rank's own
        gradient, neither averaged nor divided.
    """
    owned = state.owned()
    pairs = [
        (p, g)
        for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True)
        if id(p) not in owned
    ]
    return state._mean_at_last_bucket(bucket, pairs)


def compress_hook(
    state: CompressState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP hook for any optimizer: the whole bucket averaged in ``state.comm_dtype``.

    During the first ``state.warmup_steps`` steps the bucket is averaged by a
    plain fp32 all-reduce instead (torch's ``allreduce_hook``; residuals untouched).

    Args:
        state: the :class:`CompressState`.
        bucket: DDP's bucket; flat buffer (numel,) of this rank's gradients.

    Returns:
        A future of the bucket buffer (numel,) holding the mean over the group
        (completed when the step's last bucket arrives, except in warm-up).
    """
    if state.in_warmup():
        buffer = bucket.buffer()
        state._stats.record_collective(
            "all_reduce", buffer.numel() * buffer.element_size(), _world_size(state.process_group)
        )
        state._end_bucket(bucket)
        return default_hooks.allreduce_hook(state.process_group, bucket)
    pairs = list(zip(bucket.parameters(), bucket.gradients(), strict=True))
    return state._mean_at_last_bucket(bucket, pairs)


def compress_wrapper(hook: Hook) -> Hook:
    """Compose a bf16 cast with error feedback with another DDP hook.

    Like torch's ``bf16_compress_wrapper``: the wrapped ``hook`` (e.g. ``allreduce_hook``,
    ``powerSGD_hook``) gets the bucket cast to bf16 and communicates in bf16; its
    result is cast back into the original buffer. In addition, each rank adds its
    residual before the cast and keeps what the cast lost (what the wrapped hook
    itself loses is not fed back). ``state.comm_dtype`` must be "bf16" (or "fp32":
    no cast): the wrapped hook sums in the buffer's dtype and dion_lp never sums in
    8 bits. The wrapped hook's bytes are not counted by ``state.comm_stats()``.

    Args:
        hook: ``hook(inner_state, bucket) -> Future[Tensor]``.

    Returns:
        ``hook(state: CompressState, bucket) -> Future[Tensor]``; the wrapped hook
        gets ``state.inner_state`` (or ``state.process_group`` when that is None).
    """
    if not callable(hook):
        raise ValueError(f"Invalid hook: {hook!r}; expected a callable (state, bucket)")

    def compress_wrapper_hook(
        state: CompressState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        _check_choice("comm_dtype (for compress_wrapper)", state.comm_dtype, _WRAPPER_FORMATS)
        inner = state.inner_state if state.inner_state is not None else state.process_group
        if state.in_warmup() or state.comm_dtype == "fp32":
            state._end_bucket(bucket)
            return hook(inner, bucket)
        buffer = bucket.buffer()
        low = _cast_with_feedback(state, bucket)
        state._end_bucket(bucket)
        bucket.set_buffer(low)
        fut = hook(inner, bucket)

        def decompress(fut: torch.futures.Future[Any]) -> Tensor:
            value = fut.value()
            buffer.copy_(value[0] if isinstance(value, list) else value)
            return buffer

        return fut.then(decompress)

    compress_wrapper_hook.__doc__ = f"compress_wrapper({getattr(hook, '__name__', hook)!s})"
    return compress_wrapper_hook


@torch.no_grad()
def _cast_with_feedback(state: CompressState, bucket: dist.GradBucket) -> Tensor:
    """The bucket (numel,) cast to bf16, residuals added before and refreshed after."""
    buffer = bucket.buffer()
    if not state.error_feedback:
        return buffer.to(torch.bfloat16)
    low = torch.empty(buffer.shape, dtype=torch.bfloat16, device=buffer.device)
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        r = state._residual(p, g)
        x = g.float() + r
        cast = x.to(torch.bfloat16)
        r.copy_(x - cast.float())
        start = g.storage_offset() - buffer.storage_offset()  # g is a view into the buffer
        low[start : start + g.numel()].copy_(cast.reshape(-1))
    return low


# ----------------------------------------------------------------------------- convenience
def register_ddp(
    ddp_model: DistributedDataParallel,
    optimizer: torch.optim.Optimizer | None = None,
    comm_dtype: str = "bf16",
    *,
    error_feedback: bool = True,
    warmup_steps: int = 0,
    process_group: Any = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> DionHookState | CompressState:
    """Register the right hook on ``ddp_model`` and return its state.

    A :class:`dion_lp.Dion` with a ``"dion"`` group gets :func:`dion_hook` (its
    matrices' gradients stay local); any other optimizer (or None) gets
    :func:`compress_hook`, its residuals keyed by the model's parameter names.

    Args:
        ddp_model: the ``DistributedDataParallel`` model (no hook registered yet).
        optimizer: the optimizer stepping the model's parameters.
        comm_dtype: wire format of the averaged gradients.
        error_feedback: keep residuals of the rounding.
        warmup_steps: compress_hook only: plain fp32 all-reduce for the first k steps.
        process_group: None: the DDP model's group.
        block_size: elements per scale of the fp8 formats.

    Returns:
        The :class:`DionHookState` or :class:`CompressState`; checkpoint it with
        ``state.state_dict()`` and read its bytes with ``state.comm_stats()``.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise ValueError(
            f"Invalid ddp_model: {type(ddp_model).__name__}; expected DistributedDataParallel"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__}; expected a torch.optim.Optimizer"
        )
    _check_grad_sync(optimizer)
    group = process_group if process_group is not None else ddp_model.process_group
    if isinstance(optimizer, Dion) and any(
        g["algorithm"] == "dion" for g in optimizer.param_groups
    ):
        if warmup_steps:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r}; dion_hook has no warm-up")
        state: DionHookState | CompressState = DionHookState(
            optimizer, group, comm_dtype, error_feedback, block_size=block_size
        )
        ddp_model.register_comm_hook(state, dion_hook)
        return state
    state = CompressState(group, comm_dtype, error_feedback, warmup_steps, block_size=block_size)
    state.bind(ddp_model.module)
    ddp_model.register_comm_hook(state, compress_hook)
    return state
