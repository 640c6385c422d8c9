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

from . import state as qstate

__all__ = [
    "adamw_update_",
    "apply_rule_",
    "lion_update_",
    "scalar_step_",
    "scalar_format",
    "SCALAR_STATE",
]

# The state buffers each rule keeps, by name, and whether the buffer is
# non-negative (stored in an unsigned format when the state is quantized).
SCALAR_STATE: dict[str, dict[str, bool]] = {
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


def scalar_format(momentum_dtype: str, *, unsigned: bool) -> str:
    """State format of an element-wise buffer: non-negative ones use the unsigned codebook.

    AdamW's second moment spans many decades of small positive values; a signed
    absmax code would waste its sign bit and flush the small ones to zero.
    """
    if unsigned and momentum_dtype in ("int8", "fp8_e4m3", "dynamic8"):
        return "udynamic8"
    return momentum_dtype


def apply_rule_(
    X: Tensor, grad: Tensor, bufs: dict[str, Tensor], group: dict[str, Any], step: int
) -> None:
    """The group's element-wise rule on fp32 buffers ``bufs`` (named as in SCALAR_STATE).

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


def scalar_step_(
    p: Tensor,
    grad: Tensor,
    group: dict[str, Any],
    st: dict[str, Any],
    generator: torch.Generator,
) -> None:
    """One AdamW or Lion step of ``p`` (any shape) with its state ``st``, in place.

    The state is read out to fp32, updated, and written back once in the
    group's ``momentum_dtype`` (stochastically rounded with ``generator`` when
    the group asks for it).

    Args:
        p: parameter; updated in its own dtype.
        grad: fp32 gradient, p's shape.
        group: the param group (algorithm, lr, betas, eps, weight_decay, formats).
        st: the parameter's state dict; initialised on first use.
        generator: stochastic-rounding generator on p's device.
    """
    algorithm = group["algorithm"]
    names = SCALAR_STATE[algorithm]
    if not st:
        for name, unsigned in names.items():
            fmt = scalar_format(group["momentum_dtype"], unsigned=unsigned)
            qstate.init_buffer(st, name, p, fmt, block_size=group["block_size"])
        st["step"] = 0
    st["step"] += 1
    bufs = {name: qstate.read_buffer(st, name) for name in names}
    apply_rule_(p, grad, bufs, group, st["step"])
    for name, buf in bufs.items():
        if st[f"{name}_format"]["fmt"] != "fp32":
            qstate.write_buffer(
                st, name, buf, stochastic=group["stochastic_rounding"], generator=generator
            )
