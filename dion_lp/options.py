"""Hyperparameter names, defaults and validation for :class:`dion_lp.Dion`.

Every keyword argument of the optimizer can be overridden per param group, so
validation runs on each group after the defaults are filled in, and every
error names the argument and the value it got.
"""

from __future__ import annotations

import math
from typing import Any

from .quant.formats import MOMENTUM_FORMATS, WIRE_FORMATS, check_built

__all__ = [
    "ALGORITHMS",
    "COMM_DTYPES",
    "MOMENTUM_DTYPES",
    "NONFINITE_MODES",
    "dion_rank",
    "validate_group",
]

ALGORITHMS = ("dion", "adamw", "lion")
MOMENTUM_DTYPES = MOMENTUM_FORMATS
COMM_DTYPES = WIRE_FORMATS
NONFINITE_MODES = ("raise", "skip")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(choices)}")


def _check_unit_interval(name: str, value: Any) -> None:
    """Require 0 <= value < 1 (momentum coefficients)."""
    if not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"Invalid {name}: {value!r}; expected 0 <= {name} < 1")


def validate_group(group: dict[str, Any]) -> None:
    """Check every hyperparameter of one param group; raise ``ValueError`` naming the bad one.

    Args:
        group: a param group with all defaults filled in.
    """
    lr = group["lr"]
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid lr: {lr!r}; expected a finite number >= 0")
    _check_unit_interval("mu", group["mu"])
    wd = group["weight_decay"]
    if not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"Invalid weight_decay: {wd!r}; expected a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        _check_unit_interval(f"betas[{i}]", beta)
    eps = group["eps"]
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r}; expected a finite number > 0")
    fraction = group["rank_fraction"]
    if not isinstance(fraction, (int, float)) or not (0.0 < fraction <= 1.0):
        raise ValueError(f"Invalid rank_fraction: {fraction!r}; expected 0 < rank_fraction <= 1")
    multiple = group["rank_multiple_of"]
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"Invalid rank_multiple_of: {multiple!r}; expected an integer >= 1")
    _check_choice("algorithm", group["algorithm"], ALGORITHMS)
    _check_choice("momentum_dtype", group["momentum_dtype"], MOMENTUM_DTYPES)
    _check_choice("comm_dtype", group["comm_dtype"], COMM_DTYPES)
    check_built(group["momentum_dtype"], "momentum_dtype")
    check_built(group["comm_dtype"], "comm_dtype")
    _check_choice("nonfinite", group["nonfinite"], NONFINITE_MODES)
    if not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(
            f"Invalid stochastic_rounding: {group['stochastic_rounding']!r}; expected a bool"
        )
    if not isinstance(group["momentum_residual"], bool):
        raise ValueError(
            f"Invalid momentum_residual: {group['momentum_residual']!r}; expected a bool"
        )
    block = group["block_size"]
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"Invalid block_size: {block!r}; expected an integer >= 1")


def dion_rank(m: int, n: int, rank_fraction: float, rank_multiple_of: int) -> int:
    """Rank r of the low-rank factors of an m x n matrix.

    ``r = ceil(rank_fraction * min(m, n))`` rounded up to a multiple of
    ``rank_multiple_of`` and capped at ``min(m, n)``.
    """
    small = min(m, n)
    # the tolerance keeps 0.1 * 30 = 3.0000000000000004 at r = 3
    r = math.ceil(rank_fraction * small - 1e-9)
    r = math.ceil(r / rank_multiple_of) * rank_multiple_of
    return max(1, min(r, small))
