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
- ``lowrank_rank=r`` (both states): large averaged matrices (an embedding, an
  untied head) travel as rank-r PowerSGD factors with error feedback
  (:mod:`dion_lp.lowrank`) instead of whole.

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

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from .comm import DEFAULT_BLOCK_SIZE
from .dion import Dion
from .hook_state import (
    HOOK_STATE_VERSION,
    _check_choice,
    _check_int,
    _HookState,
    _world_size,
)

__all__ = [
    "HOOK_STATE_VERSION",
    "CompressState",
    "DionHookState",
    "compress_hook",
    "compress_wrapper",
    "dion_hook",
    "register_ddp",
]

# A wrapped hook sums in the buffer's dtype; dion_lp never sums in 8 bits.
_WRAPPER_FORMATS = ("fp32", "bf16")

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


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
        lowrank_rank: 0 (default) sends every gradient whole. r > 0: a gradient of
            2+ dims, viewed n x m, with ``(n + m) r * 2 <= n m`` travels as rank-r
            PowerSGD factors in ``comm_dtype`` (:mod:`dion_lp.lowrank`); needs
            ``error_feedback``. Not with :func:`compress_wrapper`.
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
        lowrank_rank: 0 (default) sends the other gradients whole. r > 0: each of
            them with 2+ dims, viewed n x m, with ``(n + m) r * 2 <= n m`` (an
            embedding, an untied head) travels as rank-r PowerSGD factors in
            ``comm_dtype`` with error feedback (:mod:`dion_lp.lowrank`).

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
        if state.lowrank_rank:
            raise ValueError(
                f"Invalid lowrank_rank (for compress_wrapper): {state.lowrank_rank!r}; "
                "the wrapped hook decides how the bucket travels: use 0"
            )
        inner = state.inner_state if state.inner_state is not None else state.process_group
        if state.in_warmup() or state.comm_dtype == "fp32":
            state._end_bucket(bucket)
            return hook(inner, bucket)
        buffer = bucket.buffer()
        low, updates = _cast_with_feedback(state, bucket)
        state._end_bucket(bucket)
        bucket.set_buffer(low)
        fut = hook(inner, bucket)

        def decompress(fut: torch.futures.Future[Any]) -> Tensor:
            value = fut.value()
            value = value[0] if isinstance(value, list) else value
            for residual, new, start in updates:  # a non-finite mean leaves the residual as it was
                if torch.isfinite(value[start : start + new.numel()]).all():
                    residual.copy_(new)
            buffer.copy_(value)
            return buffer

        return fut.then(decompress)

    compress_wrapper_hook.__doc__ = f"compress_wrapper({getattr(hook, '__name__', hook)!s})"
    return compress_wrapper_hook


@torch.no_grad()
def _cast_with_feedback(
    state: CompressState, bucket: dist.GradBucket
) -> tuple[Tensor, list[tuple[Tensor, Tensor, int]]]:
    """The bucket (numel,) cast to bf16 with residuals added, and the residual updates.

    Returns:
        ``(low, [(residual, new residual, offset in the bucket), ...])``; the new
        residuals are committed once the wrapped hook's mean is known to be finite.
    """
    buffer = bucket.buffer()
    if not state.error_feedback:
        return buffer.to(torch.bfloat16), []
    low = torch.empty(buffer.shape, dtype=torch.bfloat16, device=buffer.device)
    updates = []
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        r = state._residual(p, g)
        x = g.float() + r
        cast = x.to(torch.bfloat16)
        start = g.storage_offset() - buffer.storage_offset()  # g is a view into the buffer
        updates.append((r, x - cast.float(), start))
        low[start : start + g.numel()].copy_(cast.reshape(-1))
    return low, updates


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
    lowrank_rank: int = 0,
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
        lowrank_rank: r > 0 sends the hook's large matrices as rank-r factors
            (see :class:`DionHookState`); 0 sends them whole.

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
            optimizer,
            group,
            comm_dtype,
            error_feedback,
            block_size=block_size,
            lowrank_rank=lowrank_rank,
        )
        ddp_model.register_comm_hook(state, dion_hook)
        return state
    state = CompressState(
        group,
        comm_dtype,
        error_feedback,
        warmup_steps,
        block_size=block_size,
        lowrank_rank=lowrank_rank,
    )
    state.bind(ddp_model.module)
    ddp_model.register_comm_hook(state, compress_hook)
    return state
