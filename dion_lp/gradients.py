"""Which gradients a step takes: present, finite, agreed by every rank.

Every rank must step the same parameters and exchange the same matrices, so the
ranks agree first, in one small all-reduce of two uint8 flags per parameter (has
a gradient, is non-finite), then all raise or skip together. A non-finite
gradient never reaches any state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dist.accounting import CommStats
from .dist.collectives import agree_flags
from .dist.dtensor import is_sharded, local

__all__ = ["GRAD_LIMIT", "NonFiniteGradientError", "finite_gradients", "param_name"]

# Gradients larger than this are treated as non-finite: AdamW's g^2 overflows fp32
# at 1.8e19 and Dion's products B Q at ~3e38 / sqrt(n).
GRAD_LIMIT = 1e18


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; raised before it touches any state."""


def finite_gradients(
    param_groups: list[dict[str, Any]], process_group: Any, world_size: int, stats: CommStats
) -> list[tuple[dict[str, Any], Tensor, Tensor]]:
    """(param group, param, grad) of every param to step, non-finite ones handled.

    The gradient is ``p.grad`` itself (any float dtype; zeros in fp32 where a rank has
    none); the step reads it in fp32 one row block at a time.

    Replicated (``world_size`` > 1 over ``process_group``) or sharded, the ranks agree
    first, so they skip or raise together; a param with a gradient on some ranks
    only steps everywhere, with zeros where it has none.

    Raises:
        NonFiniteGradientError: a non-finite gradient in a group with ``nonfinite="raise"``.
    """
    items = [(g, i, p) for g in param_groups for i, p in enumerate(g["params"])]
    has_grad = [p.grad is not None for _, _, p in items]
    if not any(has_grad) and world_size == 1:
        return []
    for (group, i, p), has in zip(items, has_grad, strict=True):
        if has and p.grad.is_sparse:
            raise ValueError(f"Dion does not support sparse gradients ({param_name(group, i)})")
    device = local(items[0][2]).device if items else torch.device("cpu")
    flags = torch.zeros(2, len(items), dtype=torch.uint8, device=device)
    flags[0] = torch.tensor(has_grad, dtype=torch.uint8)
    with_grad = [p for (_, _, p), has in zip(items, has_grad, strict=True) if has]
    if with_grad:
        bad = torch.stack([_overflows(local(p.grad)) for p in with_grad])
        flags[1, torch.tensor(has_grad, device=device)] = bad.to(torch.uint8)
    over, world = process_group, world_size
    if any(is_sharded(p) for _, _, p in items):  # shards must agree too: every rank
        over, world = None, dist.get_world_size()
    if world > 1:
        agree_flags(flags, over, stats, "the gradient flags")
    any_grad, any_bad = flags.tolist()
    out = []
    for (group, i, p), has, bad in zip(items, any_grad, any_bad, strict=True):
        if not has:
            continue
        if bad:
            if group["nonfinite"] == "raise":
                where = " on some rank" if world_size > 1 else ""
                raise NonFiniteGradientError(
                    f"non-finite gradient (NaN, Inf, or |g| > {GRAD_LIMIT:.0e}, which "
                    f"overflows fp32 maths) in parameter {param_name(group, i)}"
                    f"{where}; nothing was updated. Pass nonfinite='skip' to skip such "
                    "parameters."
                )
            continue
        # in its own dtype: the step converts row blocks to fp32 (no whole fp32 copy)
        grad = p.grad if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        out.append((group, p, grad))
    return out


def _overflows(grad: Tensor) -> Tensor:
    """0-d bool: does ``grad`` hold NaN, Inf or an entry above GRAD_LIMIT in magnitude?

    One read of ``grad`` (its min and max), no temporary of its size.
    """
    if grad.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=grad.device)
    low, high = torch.aminmax(grad)
    return ~((high <= GRAD_LIMIT) & (low >= -GRAD_LIMIT))  # NaN compares False: caught too


def param_name(group: dict[str, Any], i: int) -> str:
    """How errors name parameter ``i`` of ``group``: its name when known, else its position."""
    names = group.get("param_names")
    return f"{names[i]!r}" if names else f"#{i} of its param group"
