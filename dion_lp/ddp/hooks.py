"""DDP communication hooks: Dion's matrices stay local, the other gradients travel compressed.

PyTorch's conventions: ``ddp.register_comm_hook(state, hook)``; ``hook(state, bucket)``
returns a ``Future[Tensor]`` of the bucket's buffer, written by a ``fut.then(...)``
callback. The states (:mod:`dion_lp.ddp.state`) are plain data; the algorithm is here.

- :func:`dion_hook` + :class:`DionHookState`, for DDP + :class:`dion_lp.Dion`: the
  gradient slices of params Dion owns (``"dion"`` groups, and ``"dion2"`` /
  ``"nordion2"`` groups with ``dion2_exchange="selected_rows"``) stay LOCAL,
  no collective at all (replicated Dion exchanges their factors itself and needs
  each rank's own gradient); every other slice is averaged in ``comm_dtype``.
- :func:`compress_hook` + :class:`CompressState`, for any optimizer: every
  gradient averaged in ``comm_dtype``, optionally after ``warmup_steps`` steps of
  plain fp32 all-reduce. :func:`compress_wrapper` composes a bf16 cast with error
  feedback with another hook (e.g. torch's PowerSGD).
- :func:`register_ddp` picks the hook and state for an optimizer.
- ``lowrank_rank=r`` (both states): large averaged matrices (an embedding, an
  untied head) travel as rank-r PowerSGD factors with error feedback
  (:mod:`dion_lp.ddp.lowrank`) instead of whole.

Averaging is :func:`dion_lp.dist.collectives.quantized_mean_` (never a sum in 8
bits): every rank receives bitwise identical means. Error feedback: each rank
keeps a residual per parameter, sends g + r and keeps its share of what rounding
lost, so the sum of applied means equals the sum of true means up to one step's
residual. Residuals are keyed per parameter (its optimizer position, or its name
after :meth:`CompressState.bind`), never per bucket index, so DDP's bucket
rebuild after the first iteration keeps them valid.

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

``state.comm_stats()`` counts the bytes (nccl-tests bus-bandwidth convention).
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

from ..dist.accounting import DEFAULT_BLOCK_SIZE
from ..optimizer import Dion
from ..options import owns_exchange
from ..quant.formats import WIRE_FORMATS, format_info
from . import exchange
from .state import HOOK_STATE_VERSION, CompressState, DionHookState, check_grad_sync

__all__ = [
    "HOOK_STATE_VERSION",
    "CompressState",
    "DionHookState",
    "compress_hook",
    "compress_wrapper",
    "dion_hook",
    "register_ddp",
]

# A wrapped hook sums in the buffer's dtype: formats without scales only (dion_lp
# never sums in 8 bits).
_WRAPPER_FORMATS = tuple(f for f in WIRE_FORMATS if not format_info(f).scaled)

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


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
    return exchange.mean_at_last_bucket(state, bucket, pairs)


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
        nbytes = buffer.numel() * buffer.element_size()
        state.stats.record_collective("all_reduce", nbytes, state.world_size)
        exchange.end_bucket(state, bucket)
        return default_hooks.allreduce_hook(state.process_group, bucket)
    pairs = list(zip(bucket.parameters(), bucket.gradients(), strict=True))
    return exchange.mean_at_last_bucket(state, bucket, pairs)


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
        _check_wrapped_state(state)
        inner = state.inner_state if state.inner_state is not None else state.process_group
        if state.in_warmup() or state.comm_dtype == "fp32":
            exchange.end_bucket(state, bucket)
            return hook(inner, bucket)
        buffer = bucket.buffer()
        low, updates = _cast_with_feedback(state, bucket)
        exchange.end_bucket(state, bucket)
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


def _check_wrapped_state(state: CompressState) -> None:
    if state.comm_dtype not in _WRAPPER_FORMATS:
        raise ValueError(
            f"Invalid comm_dtype (for compress_wrapper): {state.comm_dtype!r}; "
            f"expected one of {', '.join(_WRAPPER_FORMATS)}"
        )
    if state.lowrank_rank:
        raise ValueError(
            f"Invalid lowrank_rank (for compress_wrapper): {state.lowrank_rank!r}; "
            "the wrapped hook decides how the bucket travels: use 0"
        )


@torch.no_grad()
def _cast_with_feedback(
    state: CompressState, bucket: dist.GradBucket
) -> tuple[Tensor, list[tuple[Tensor, Tensor, int]]]:
    """The bucket (numel,) cast to ``comm_dtype`` with residuals added, and the residual updates.

    Returns:
        ``(low, [(residual, new residual, offset in the bucket), ...])``; the new
        residuals are committed once the wrapped hook's mean is known to be finite.
    """
    buffer = bucket.buffer()
    dtype = format_info(state.comm_dtype).code_dtype
    if not state.error_feedback:
        return buffer.to(dtype), []
    low = torch.empty(buffer.shape, dtype=dtype, device=buffer.device)
    updates = []
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        r = exchange.residual(state, p, g)
        x = g.float() + r
        cast = x.to(dtype)
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
    check_grad_sync(optimizer)
    group = process_group if process_group is not None else ddp_model.process_group
    kw = {"block_size": block_size, "lowrank_rank": lowrank_rank}
    if isinstance(optimizer, Dion) and any(owns_exchange(g) for g in optimizer.param_groups):
        if warmup_steps:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r}; dion_hook has no warm-up")
        state = DionHookState(optimizer, group, comm_dtype, error_feedback, **kw)
        ddp_model.register_comm_hook(state, dion_hook)
        return state
    state = CompressState(group, comm_dtype, error_feedback, warmup_steps, **kw)
    state.bind(ddp_model.module)
    ddp_model.register_comm_hook(state, compress_hook)
    return state
