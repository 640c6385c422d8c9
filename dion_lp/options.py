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
    "ADDED_HYPERPARAMETERS",
    "ALGORITHMS",
    "DION2_EXCHANGES",
    "MATRIX_ALGORITHMS",
    "COMM_DTYPES",
    "HYPERPARAMETERS",
    "MOMENTUM_DTYPES",
    "NONFINITE_MODES",
    "WEIGHT_ROUNDINGS",
    "check_seed",
    "owns_exchange",
    "dion_rank",
    "validate_group",
]

ALGORITHMS = ("dion", "dion2", "nordion2", "muon", "adamw", "lion")
MATRIX_ALGORITHMS = ("dion", "dion2", "nordion2", "muon")  # 2-D matrices only
MOMENTUM_DTYPES = MOMENTUM_FORMATS
COMM_DTYPES = WIRE_FORMATS
NONFINITE_MODES = ("raise", "skip")
WEIGHT_ROUNDINGS = ("nearest", "stochastic")
DION2_EXCHANGES = ("mean_gradient", "selected_rows")
# Every key validate_group reads: a group (or a saved one) must have them all.
HYPERPARAMETERS = (
    "lr",
    "mu",
    "weight_decay",
    "betas",
    "eps",
    "rank_fraction",
    "rank_multiple_of",
    "algorithm",
    "momentum_dtype",
    "comm_dtype",
    "nonfinite",
    "stochastic_rounding",
    "momentum_residual",
    "block_size",
    "weight_rounding",
    "dion2_exchange",
)
# Keys added after a state-dict format was released: a saved group without one
# loads with the value that reproduces how it was trained.
ADDED_HYPERPARAMETERS = {"weight_rounding": "nearest", "dion2_exchange": "mean_gradient"}


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(choices)}")


def _is_number(value: Any) -> bool:
    """A real number: int or float, and not a bool (``True`` is no learning rate)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_unit_interval(name: str, value: Any) -> None:
    """Require 0 <= value < 1 (momentum coefficients)."""
    if not _is_number(value) or not (0.0 <= value < 1.0):
        raise ValueError(f"Invalid {name}: {value!r}; expected 0 <= {name} < 1")


def validate_group(group: dict[str, Any]) -> None:
    """Check every hyperparameter of one param group; raise ``ValueError`` naming the bad one.

    Args:
        group: a param group with all defaults filled in.
    """
    lr = group["lr"]
    if not _is_number(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid lr: {lr!r}; expected a finite number >= 0")
    _check_unit_interval("mu", group["mu"])
    wd = group["weight_decay"]
    if not _is_number(wd) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"Invalid weight_decay: {wd!r}; expected a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        _check_unit_interval(f"betas[{i}]", beta)
    eps = group["eps"]
    if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r}; expected a finite number > 0")
    fraction = group["rank_fraction"]
    if not _is_number(fraction) or not (0.0 < fraction <= 1.0):
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
    _check_choice("weight_rounding", group["weight_rounding"], WEIGHT_ROUNDINGS)
    _check_choice("dion2_exchange", group["dion2_exchange"], DION2_EXCHANGES)
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


def owns_exchange(group: dict[str, Any]) -> bool:
    """Whether the optimizer itself exchanges what this group's replicas share, so its
    gradients must stay local: Dion's factors, and Dion2 / NorDion2 with
    ``dion2_exchange="selected_rows"`` (only the selected rows travel)."""
    algorithm = group.get("algorithm")
    if algorithm == "dion":
        return True
    return algorithm in ("dion2", "nordion2") and group.get("dion2_exchange") == "selected_rows"


def check_seed(seed: Any) -> int:
    """The seed, if it is an int in [0, 2**63) (it seeds torch generators); else ``ValueError``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"Invalid seed: {seed!r}; expected an int in [0, 2**63)")
    return seed


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
