"""The step's exchange behind :func:`~dion_lp.hooks.dion_hook` and ``compress_hook``.

A bucket's (param, gradient) pairs wait in ``state.pending`` until DDP hands over
the step's last bucket (it hands them over in index order). Then, in the order
of the parameters' keys: one uint8 flag agreement (non-finite anywhere?), ONE
coalesced quantized mean of the dense gradients with error feedback, one
low-rank (PowerSGD) mean of the large matrices; every future of the step
completes, and each bucket's ``fut.then`` callback writes its means into its
buffer. The state (:mod:`dion_lp.ddp.state`) holds the data; this module
reads and updates it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..dist.collectives import agree_flags, quantized_mean_
from .lowrank import compressed_shape, initial_q, lowrank_mean_
from .state import HookState

__all__ = ["end_bucket", "mean_at_last_bucket", "residual"]

Keyed = list[tuple[str, Tensor, Tensor]]  # (key, param, gradient view into a bucket)


def residual(state: HookState, p: Tensor, grad: Tensor) -> Tensor:
    """``p``'s error-feedback residual in ``state.residuals`` (created as zeros).

    Args:
        state: the hook state.
        p: the parameter (its key names the residual).
        grad: its gradient, any float dtype and shape.

    Returns:
        The fp32 residual, shaped like ``grad`` and on its device; updating it in
        place updates the state.
    """
    key = state.key(p)
    r = state.residuals.get(key)
    if r is None:
        r = state.residuals[key] = torch.zeros_like(grad, dtype=torch.float32)
    elif r.shape != grad.shape:
        raise ValueError(
            f"Invalid residual {key!r}: shape {tuple(r.shape)}, gradient {tuple(grad.shape)}"
        )
    elif r.device != grad.device:
        r = state.residuals[key] = r.to(grad.device)
    return r


def _warm_start(state: HookState, key: str, grad: Tensor) -> Tensor:
    """The (m, r) fp32 right factor of the gradient keyed ``key``, on its device."""
    _, m, r = compressed_shape(grad.shape, state.lowrank_rank)
    q = state.lowrank_q.get(key)
    if q is None:
        q = initial_q(key, m, r)
    elif q.shape != (m, r):
        raise ValueError(
            f"Invalid low-rank factor {key!r}: shape {tuple(q.shape)}, expected {(m, r)}"
        )
    q = state.lowrank_q[key] = q.to(grad.device)
    return q


def _average(state: HookState, keyed: Keyed) -> list[Tensor]:
    """fp32 means over the group of the gradients of ``keyed``, in ``state.comm_dtype``."""
    if not keyed:
        return []
    means = [g.to(torch.float32, copy=True) for _, _, g in keyed]
    errors = None
    if state.error_feedback and state.comm_dtype != "fp32":  # fp32 loses nothing to feed back
        errors = [residual(state, p, g) for _, p, g in keyed]
        for x, r in zip(means, errors, strict=True):
            x.add_(r)
    quantized_mean_(
        means,
        state.comm_dtype,
        state.process_group,
        state.stats,
        block_size=state.block_size,
        errors=errors,
    )
    return means


def _lowrank_average(state: HookState, keyed: Keyed) -> list[Tensor]:
    """fp32 rank-``lowrank_rank`` means of the gradients of ``keyed`` (PowerSGD)."""
    if not keyed:
        return []
    qs = [_warm_start(state, key, g) for key, _, g in keyed]
    means = [g.to(torch.float32, copy=True) for _, _, g in keyed]
    residuals = [residual(state, p, g) for _, p, g in keyed]
    lowrank_mean_(
        means,
        residuals,
        qs,
        state.comm_dtype,
        state.process_group,
        state.stats,
        block_size=state.block_size,
    )
    return means


def _nonfinite(state: HookState, keyed: Keyed) -> list[bool]:
    """Per gradient: non-finite on some rank (one uint8 MAX all-reduce; every rank agrees)."""
    if not keyed:
        return []
    flags = torch.stack([~torch.isfinite(g).all() for _, _, g in keyed]).to(torch.uint8)
    agree_flags(flags, state.process_group, state.stats, "the hook's gradient flags")
    return [bool(b) for b in flags.tolist()]


@torch.no_grad()
def _step_means(state: HookState, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """fp32 means over the group of the step's (param, gradient) ``pairs``, in their order.

    One coalesced mean in the order of the parameters' keys, so the result does
    not depend on DDP's bucket layout. A gradient non-finite on any rank gets a
    NaN mean on every rank (as DDP's own all-reduce would spread it, so the
    optimizer raises or skips consistently) and stays out of the mean: its
    residual and low-rank factor stay as they were, the codecs never see a NaN.
    """
    keys = [state.key(p) for p, _ in pairs]
    order = sorted(range(len(pairs)), key=keys.__getitem__)
    keyed = [(keys[i], *pairs[i]) for i in order]
    means: list[Tensor | None] = [None] * len(pairs)
    dense: list[int] = []  # positions in ``keyed``
    low: list[int] = []
    for j, ((_, _, g), bad) in enumerate(zip(keyed, _nonfinite(state, keyed), strict=True)):
        if bad:
            means[order[j]] = torch.full_like(g, float("nan"), dtype=torch.float32)
        else:
            (low if compressed_shape(g.shape, state.lowrank_rank) else dense).append(j)
    for part, average in ((dense, _average), (low, _lowrank_average)):
        for j, mean in zip(part, average(state, [keyed[j] for j in part]), strict=True):
            means[order[j]] = mean
    return means


def end_bucket(state: HookState, bucket: dist.GradBucket) -> None:
    """At the step's last ``bucket``: close the step's byte count and count the step."""
    if bucket.is_last():
        state.stats.end_step()
        state.hook_steps += 1


def mean_at_last_bucket(
    state: HookState, bucket: dist.GradBucket, pairs: list[tuple[Tensor, Tensor]]
) -> torch.futures.Future[torch.Tensor]:
    """Average ``pairs``' gradients over the group once the step's last bucket arrives.

    The pairs wait in ``state.pending`` until DDP hands over the step's last
    bucket; then :func:`_step_means` averages every pending pair at once, every
    future of the step completes, and each bucket's ``fut.then`` callback writes
    its means into its buffer.

    Args:
        state: the hook state.
        bucket: DDP's bucket; flat buffer (numel,).
        pairs: (param, gradient view into ``bucket``'s buffer) to average; the
            bucket's other slices are left as they are.

    Returns:
        A future of the bucket's buffer (numel,), ``pairs``' slices replaced by
        their means (bitwise identical on every rank).
    """
    if bucket.index() == 0:
        state.pending.clear()  # left over from a backward pass that raised
    fut: torch.futures.Future[list[Tensor]] = torch.futures.Future()
    state.pending.append((fut, pairs))
    buffer = bucket.buffer()

    def write_back(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        with torch.no_grad():
            for (_, g), mean in zip(pairs, fut.value(), strict=True):
                g.copy_(mean)
        return buffer

    result = fut.then(write_back)
    if bucket.is_last():
        _complete_step(state)
        end_bucket(state, bucket)
    return result


def _complete_step(state: HookState) -> None:
    """Average every pending pair; complete each pending future with its bucket's means."""
    pending, state.pending = state.pending, []
    try:
        means = _step_means(state, [pair for _, pairs in pending for pair in pairs])
    except BaseException as err:
        for fut, _ in pending:
            fut.set_exception(err)
        raise
    start = 0
    for fut, pairs in pending:
        fut.set_result(means[start : start + len(pairs)])
        start += len(pairs)
