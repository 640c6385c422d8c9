"""The optimizers of ``examples/finetune_memory_budget.py``: one :class:`Recipe` per row.

Every baseline gets the same AdamW groups (decay on encoder matrices, none on
vectors, the new head at ``head_lr_mult`` times the lr); dion_lp gets
``dion_lp.param_groups`` (Dion on the hidden matrices, Lion on the rest) with the
head in its own Lion group. Recipes on bf16 weights: torchao with its
``bf16_stochastic_round``; dion_lp with ``weight_rounding`` and the step inside
backward (``dion_lp.step_in_backward``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

import dion_lp
from benchmarks.memory import DionConfig, baseline_state_bytes, dion_state_bytes
from benchmarks.shapes import ParamSpec

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "RECIPES",
    "Recipe",
    "build_optimizer",
    "closed_form_bytes",
    "train_step",
]

WEIGHT_DECAY = 0.01
HEAD = "classifier"


@dataclass(frozen=True)
class Recipe:
    """One optimizer row: library, weights dtype, and dion_lp's options."""

    library: str  # "torch", "torchao", "bitsandbytes", "dion_lp"
    cls: str = ""  # the class name in a baseline library
    dtype: torch.dtype = torch.float32
    momentum: str = "int8"  # dion_lp
    weight_rounding: str = "nearest"  # dion_lp
    in_backward: bool = False  # dion_lp.step_in_backward
    closed_form: str | None = None  # benchmarks.memory's name for a baseline


BF16 = torch.bfloat16
RECIPES: dict[str, Recipe] = {
    "adamw": Recipe("torch", "AdamW", closed_form="adamw (torch)"),
    "adamw8bit_torchao": Recipe("torchao", "AdamW8bit", closed_form="adamw8bit (torchao)"),
    "adamw8bit_bnb": Recipe("bitsandbytes", "AdamW8bit", closed_form="adamw8bit (bitsandbytes)"),
    "dion": Recipe("dion_lp"),
    "adamw8bit_torchao_bf16": Recipe("torchao", "AdamW8bit", dtype=BF16),
    "adamw4bit_torchao": Recipe("torchao", "AdamW4bit"),
    "dion_bf16_sr": Recipe("dion_lp", dtype=BF16, weight_rounding="stochastic", in_backward=True),
    "dion_bf16_nearest": Recipe("dion_lp", dtype=BF16, in_backward=True),
    "dion_bf16_sr_int4": Recipe(
        "dion_lp", dtype=BF16, momentum="int4", weight_rounding="stochastic", in_backward=True
    ),
    "dion_bf16_sr_fp4": Recipe(
        "dion_lp", dtype=BF16, momentum="fp4_e2m1", weight_rounding="stochastic", in_backward=True
    ),
}
DEFAULT_OPTIMIZERS = ("adamw", "adamw8bit_torchao", "adamw8bit_bnb", "dion", "dion_bf16_sr")


# ----------------------------------------------------------------------------- optimizers
def _adamw_groups(model: nn.Module, lr: float, head_mult: float) -> list[dict[str, Any]]:
    """Decay on encoder matrices, none on vectors; the head at ``head_mult * lr``, no decay."""
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if name.startswith(HEAD + "."):
            head.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": head, "lr": lr * head_mult, "weight_decay": 0.0},
    ]


def _dion_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``dion_lp.param_groups`` (Lion on the rest), the head moved to its own Lion group."""
    groups = dion_lp.param_groups(
        model, scalar_algorithm="lion", scalar_lr=args.lr_lion, rank_fraction=args.rank_fraction
    )
    head: dict[str, Any] = {
        "params": [],
        "param_names": [],
        "algorithm": "lion",
        "lr": args.lr_lion * args.head_lr_mult,
        "weight_decay": 0.0,
    }
    for group in groups:
        pairs = list(zip(group["param_names"], group["params"], strict=True))
        kept = [(n, p) for n, p in pairs if not n.startswith(HEAD + ".")]
        head["param_names"] += [n for n, p in pairs if n.startswith(HEAD + ".")]
        head["params"] += [p for n, p in pairs if n.startswith(HEAD + ".")]
        group["param_names"] = [n for n, _ in kept]
        group["params"] = [p for _, p in kept]
    return [g for g in [*groups, head] if g["params"]]


def build_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> Any:
    """The optimizer ``name`` (one of :data:`RECIPES`) over ``model``; for a recipe with the
    step in backward, its :class:`dion_lp.StepInBackward` handle is ``opt.in_backward``.

    Raises:
        ImportError: the library of a baseline is not installed.
    """
    recipe = RECIPES[name]
    if recipe.library == "dion_lp":
        opt = dion_lp.Dion(
            _dion_groups(model, args),
            lr=args.lr_dion,
            mu=0.95,
            betas=(0.9, 0.99),
            weight_decay=WEIGHT_DECAY,
            momentum_dtype=recipe.momentum,
            weight_rounding=recipe.weight_rounding,
            seed=args.seed,
        )
        opt.in_backward = dion_lp.step_in_backward(opt, model) if recipe.in_backward else None
        return opt
    groups = _adamw_groups(model, args.lr_adamw, args.head_lr_mult)
    if recipe.library == "torch":
        return torch.optim.AdamW(groups, lr=args.lr_adamw)
    module = "torchao.optim" if recipe.library == "torchao" else "bitsandbytes.optim"
    cls = getattr(__import__(module, fromlist=[recipe.cls]), recipe.cls)
    extra = {"bf16_stochastic_round": True} if recipe.dtype == BF16 else {}
    return cls(groups, lr=args.lr_adamw, **extra)


def closed_form_bytes(name: str, specs: Sequence[ParamSpec], rank_fraction: float) -> int | None:
    """State bytes after a step predicted from the shapes (``benchmarks.memory``), if known."""
    recipe = RECIPES[name]
    if recipe.library == "dion_lp":
        return dion_state_bytes(specs, DionConfig(recipe.momentum, rank_fraction, scalar="lion"))
    return None if recipe.closed_form is None else baseline_state_bytes(specs, recipe.closed_form)


def train_step(model: nn.Module, opt: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Forward, backward (which steps, with the step in backward), step, zero_grad; the loss."""
    ids, mask, y = batch
    loss = F.cross_entropy(model(ids, mask).float(), y)
    loss.backward()
    if getattr(opt, "in_backward", None) is None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()
