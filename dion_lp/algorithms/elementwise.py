"""Element-wise update rules for the parameters Dion does not own.

Biases, norm weights, embeddings and output heads use AdamW or Lion inside the
same :class:`dion_lp.Dion` optimizer, chosen per param group with the key
``"algorithm"``. The functions here are the maths only, on fp32 tensors; the
optimizer reads low-precision state out to fp32, calls them, and writes back.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..dist.dtensor import local
from ..layouts.placement import Placement
from ..quant.buffer import QuantizedBuffer, block_ranges
from ..quant.formats import unsigned_variant
from ..quant.rng import stream_key
from ..quant.weights import write_weights_

__all__ = [
    "ELEMENTWISE_STATE",
    "adamw_update_",
    "apply_rule_",
    "create_buffer",
    "elementwise_step_",
    "init_elementwise_state",
    "lion_update_",
    "state_format",
]

# The state buffers each rule keeps, by name, and whether the buffer is
# non-negative (stored in an unsigned format when the state is quantized).
# Writes new fp32 values (2nd argument) into the parameter (1st), in its dtype.
Writer = Callable[[Tensor, Tensor], None]

ELEMENTWISE_STATE: dict[str, dict[str, bool]] = {
    "adamw": {"exp_avg": False, "exp_avg_sq": True},
    "lion": {"exp_avg": False},
}


def adamw_update_(
    X: Tensor,  # parameter, modified in place
    G: Tensor,  # gradient, fp32, same shape
    exp_avg: Tensor,  # first moment, fp32, modified in place
    exp_avg_sq: Tensor,  # second moment, fp32, modified in place
    *,
    step: int,  # 1-based step count of this parameter
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    write: Writer | None = None,
) -> None:
    """AdamW (decoupled weight decay, bias-corrected), in place.

    Args:
        X: parameter of any shape; updated in its own dtype.
        G, exp_avg, exp_avg_sq: fp32 tensors with X's shape.
        step: number of updates including this one (>= 1).
        write: stores X's new fp32 values into X (default: ``X.copy_``, nearest).
    """
    # m = b1 m + (1 - b1) g ; v = b2 v + (1 - b2) g^2
    exp_avg.lerp_(G, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(G, G, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    # X = X (1 - lr wd) - lr (m / b1c) / (sqrt(v / b2c) + eps)
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    update = (exp_avg / bias1).div_(denom)
    _apply_(X, update, lr=lr, weight_decay=weight_decay, write=write)


def lion_update_(
    X: Tensor,  # parameter, modified in place
    G: Tensor,  # gradient, fp32, same shape
    exp_avg: Tensor,  # momentum, fp32, modified in place
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    write: Writer | None = None,
) -> None:
    """Lion (Chen et al. 2023), in place.

    Args:
        X: parameter of any shape; updated in its own dtype.
        G, exp_avg: fp32 tensors with X's shape.
        write: stores X's new fp32 values into X (default: ``X.copy_``, nearest).
    """
    # c = b1 m + (1 - b1) g ; X = X (1 - lr wd) - lr sign(c)
    update = torch.lerp(exp_avg, G, 1 - beta1).sign_()
    _apply_(X, update, lr=lr, weight_decay=weight_decay, write=write)
    # m = b2 m + (1 - b2) g
    exp_avg.lerp_(G, 1 - beta2)


def _apply_(
    X: Tensor, update: Tensor, *, lr: float, weight_decay: float, write: Writer | None
) -> None:
    """X = X (1 - lr wd) - lr update, computed in fp32 and written in X's dtype by ``write``."""
    if X.dtype == torch.float32:
        X.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
        return
    new = X.float().mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
    if write is None:
        X.copy_(new)
    else:
        write(X, new)


def state_format(momentum_dtype: str, *, unsigned: bool) -> str:
    """State format of an element-wise buffer: non-negative ones use the unsigned variant."""
    return unsigned_variant(momentum_dtype) if unsigned else momentum_dtype


def apply_rule_(
    X: Tensor,
    grad: Tensor,
    bufs: dict[str, Tensor],
    group: dict[str, Any],
    step: int,
    write: Writer | None = None,
) -> None:
    """The group's element-wise rule on fp32 buffers ``bufs`` (named as in ELEMENTWISE_STATE).

    Args:
        X: parameter (or its local shard), updated in place in its own dtype.
        grad: fp32 gradient, X's shape.
        bufs: fp32 state buffers with X's shape, updated in place.
        group: the param group (algorithm, lr, betas, eps, weight_decay).
        step: 1-based step count including this one.
        write: stores X's new fp32 values into a non-fp32 X (default: nearest).
    """
    beta1, beta2 = group["betas"]
    common = dict(
        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], write=write
    )
    if group["algorithm"] == "adamw":
        adamw_update_(
            X, grad, bufs["exp_avg"], bufs["exp_avg_sq"], step=step, eps=group["eps"], **common
        )
    else:
        lion_update_(X, grad, bufs["exp_avg"], **common)


def create_buffer(
    st: dict[str, Any], name: str, fmt: str, p: Tensor, group: dict[str, Any], place: Placement
) -> None:
    """A zero state buffer ``name`` of ``p`` in ``fmt``, in rows like ``place``."""
    QuantizedBuffer.create(
        st,
        name,
        rows=place.rows,
        row_numel=place.row_numel,
        local_rows=place.length,
        fmt=fmt,
        block_size=group["block_size"],
        device=local(p).device,
        wrap=place.wrap,
    )


def init_elementwise_state(
    p: Tensor, group: dict[str, Any], st: dict[str, Any], place: Placement
) -> None:
    """Create the zero state buffers of the group's rule for ``p``, in rows like ``place``."""
    for name, unsigned in ELEMENTWISE_STATE[group["algorithm"]].items():
        fmt = state_format(group["momentum_dtype"], unsigned=unsigned)
        create_buffer(st, name, fmt, p, group, place)
    st["step"] = 0


def elementwise_step_(
    p: Tensor,
    grad: Tensor,
    group: dict[str, Any],
    st: dict[str, Any],
    *,
    place: Placement,
    seed: int,
    index: int,
) -> None:
    """One AdamW or Lion step of ``p`` (any shape, plain or DTensor) with its state, in place.

    The state is read out to fp32, updated, and written back in the group's
    ``momentum_dtype`` (stochastically rounded when the group asks for it, with the
    random bits of :mod:`dion_lp.quant.rng`), one row block of at most
    :data:`dion_lp.quant.buffer.BLOCK_NUMEL` elements at a time: the rule is
    element-wise and the bits follow each element's global index, so the result is
    the same as for the whole tensor, with temporaries of a block's size.

    Args:
        p: parameter; this rank's part is updated in its own dtype.
        grad: gradient of this rank's part, shaped like it (any float dtype: read in fp32
            one row block at a time).
        group: the param group (algorithm, lr, betas, eps, weight_decay, formats).
        st: the parameter's state dict; initialised on first use.
        place: where ``p``'s rows live.
        seed, index: the optimizer's seed and ``p``'s position (stochastic rounding).
    """
    if not st:
        init_elementwise_state(p, group, st, place)
    X = local(p)
    step = st["step"]
    st["step"] += 1
    buffers = {name: QuantizedBuffer(st, name) for name in ELEMENTWISE_STATE[group["algorithm"]]}
    keys = {name: stream_key(seed, index, step, name) for name in buffers}
    stochastic = group["weight_rounding"] == "stochastic"
    param_key = stream_key(seed, index, step, "param")
    write = partial(write_weights_, stochastic=stochastic, key=param_key)
    X_rows, G_rows = place.to_rows(X), place.to_rows(grad)
    U = X_rows.shape[1]
    if not (_is_view(X_rows, X) and _is_view(G_rows, grad)):  # rows copied: the whole tensor
        bufs = {name: place.from_rows(buf.read(), X.shape) for name, buf in buffers.items()}
        flat = partial(_write_flat, write=partial(write, first=place.start * U))
        apply_rule_(X, grad.float(), bufs, group, st["step"], flat)
        bufs = {name: place.to_rows(b) for name, b in bufs.items()}
        _write_states(buffers, bufs, None, group, keys, place.start)
        return
    for rows in block_ranges(*X_rows.shape):  # bounded temporaries, the same numbers
        r0, r1 = rows
        bufs = {name: buf.read(rows=rows) for name, buf in buffers.items()}
        at = partial(write, first=(place.start + r0) * U)
        apply_rule_(X_rows[r0:r1], G_rows[r0:r1].float(), bufs, group, st["step"], at)
        _write_states(buffers, bufs, rows, group, keys, place.start)


def _write_flat(X: Tensor, new: Tensor, *, write: Writer) -> None:
    """``write`` on X of any shape, seen as one row (element order: X's, row-major)."""
    if X.is_contiguous():
        write(X.view(1, -1), new.reshape(1, -1))
        return
    out = torch.empty_like(X, memory_format=torch.contiguous_format)
    write(out.view(1, -1), new.reshape(1, -1))
    X.copy_(out)


def _write_states(
    buffers: dict[str, QuantizedBuffer],
    bufs: dict[str, Tensor],
    rows: tuple[int, int] | None,
    group: dict[str, Any],
    keys: dict[str, int],
    row0: int,
) -> None:
    """Write the updated fp32 ``bufs`` (local rows ``rows``, or all) back in their formats."""
    for name, buf in buffers.items():
        if buf.fmt != "fp32":  # fp32 buffers were updated in place
            stochastic = group["stochastic_rounding"]
            buf.write(bufs[name], stochastic=stochastic, key=keys[name], row0=row0, rows=rows)


def _is_view(rows: Tensor, x: Tensor) -> bool:
    """Whether ``rows`` (from ``Placement.to_rows``) shares ``x``'s memory (not a copy)."""
    return rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
