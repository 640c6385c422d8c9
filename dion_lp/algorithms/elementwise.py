"""Element-wise update rules for the parameters Dion does not own.

Biases, norm weights, embeddings and output heads use AdamW or Lion inside the
same :class:`dion_lp.Dion` optimizer, chosen per param group with the key
``"algorithm"``. The functions here are the maths only, on fp32 tensors; the
optimizer reads low-precision state out to fp32, calls them, and writes back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..dist.dtensor import local
from ..layouts.placement import Placement
from ..quant.buffer import QuantizedBuffer
from ..quant.formats import unsigned_variant
from ..quant.rng import stream_key

__all__ = [
    "ELEMENTWISE_STATE",
    "adamw_update_",
    "apply_rule_",
    "elementwise_step_",
    "init_elementwise_state",
    "lion_update_",
    "state_format",
]

# The state buffers each rule keeps, by name, and whether the buffer is
# non-negative (stored in an unsigned format when the state is quantized).
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
) -> None:
    """AdamW (decoupled weight decay, bias-corrected), in place.

    Args:
        X: parameter of any shape; updated in its own dtype.
        G, exp_avg, exp_avg_sq: fp32 tensors with X's shape.
        step: number of updates including this one (>= 1).
    """
    # m = b1 m + (1 - b1) g ; v = b2 v + (1 - b2) g^2
    exp_avg.lerp_(G, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(G, G, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    # X = X (1 - lr wd) - lr (m / b1c) / (sqrt(v / b2c) + eps)
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    update = (exp_avg / bias1).div_(denom)
    _apply_(X, update, lr=lr, weight_decay=weight_decay)


def lion_update_(
    X: Tensor,  # parameter, modified in place
    G: Tensor,  # gradient, fp32, same shape
    exp_avg: Tensor,  # momentum, fp32, modified in place
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Lion (Chen et al. 2023), in place.

    Args:
        X: parameter of any shape; updated in its own dtype.
        G, exp_avg: fp32 tensors with X's shape.
    """
    # c = b1 m + (1 - b1) g ; X = X (1 - lr wd) - lr sign(c)
    update = torch.lerp(exp_avg, G, 1 - beta1).sign_()
    _apply_(X, update, lr=lr, weight_decay=weight_decay)
    # m = b2 m + (1 - b2) g
    exp_avg.lerp_(G, 1 - beta2)


def _apply_(X: Tensor, update: Tensor, *, lr: float, weight_decay: float) -> None:
    """X = X (1 - lr wd) - lr update, computed in fp32 and written in X's dtype."""
    if X.dtype == torch.float32:
        X.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
    else:
        X.copy_(X.float().mul_(1 - lr * weight_decay).add_(update, alpha=-lr))


def state_format(momentum_dtype: str, *, unsigned: bool) -> str:
    """State format of an element-wise buffer: non-negative ones use the unsigned variant."""
    return unsigned_variant(momentum_dtype) if unsigned else momentum_dtype


def apply_rule_(
    X: Tensor, grad: Tensor, bufs: dict[str, Tensor], group: dict[str, Any], step: int
) -> None:
    """The group's element-wise rule on fp32 buffers ``bufs`` (named as in ELEMENTWISE_STATE).

    Args:
        X: parameter (or its local shard), updated in place in its own dtype.
        grad: fp32 gradient, X's shape.
        bufs: fp32 state buffers with X's shape, updated in place.
        group: the param group (algorithm, lr, betas, eps, weight_decay).
        step: 1-based step count including this one.
    """
    beta1, beta2 = group["betas"]
    common = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
    if group["algorithm"] == "adamw":
        adamw_update_(
            X, grad, bufs["exp_avg"], bufs["exp_avg_sq"], step=step, eps=group["eps"], **common
        )
    else:
        lion_update_(X, grad, bufs["exp_avg"], **common)


def init_elementwise_state(
    p: Tensor, group: dict[str, Any], st: dict[str, Any], place: Placement
) -> None:
    """Create the zero state buffers of the group's rule for ``p``, in rows like ``place``."""
    for name, unsigned in ELEMENTWISE_STATE[group["algorithm"]].items():
        QuantizedBuffer.create(
            st,
            name,
            rows=place.rows,
            row_numel=place.row_numel,
            local_rows=place.length,
            fmt=state_format(group["momentum_dtype"], unsigned=unsigned),
            block_size=group["block_size"],
            device=local(p).device,
            wrap=place.wrap,
        )
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

    The state is read out to fp32, updated, and written back once in the group's
    ``momentum_dtype`` (stochastically rounded when the group asks for it, with the
    random bits of :mod:`dion_lp.quant.rng`).

    Args:
        p: parameter; this rank's part is updated in its own dtype.
        grad: fp32 gradient of this rank's part, shaped like it.
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
    # fp32 buffers are the state tensors themselves (views): updated in place
    bufs = {name: place.from_rows(buf.read(), X.shape) for name, buf in buffers.items()}
    apply_rule_(X, grad, bufs, group, st["step"])
    for name, buf in buffers.items():
        if buf.fmt == "fp32":
            continue
        key = stream_key(seed, index, step, name)
        rows = place.to_rows(bufs[name])
        buf.write(rows, stochastic=group["stochastic_rounding"], key=key, row0=place.start)
