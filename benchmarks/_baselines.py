"""The ablation's baseline optimizers (AdamW, Muon, 8-bit AdamW) and their param splits.

Row registry, learning rates and how they were picked: :mod:`benchmarks._rows`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ADAMW", "MUON_LR", "OptimizerList"]

ADAMW = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
MUON_LR = 0.02


class OptimizerList:
    """Several optimizers stepped as one (Muon on matrices + AdamW on the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = list(optimizers)
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        """Step every optimizer."""
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every optimizer's gradients."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


# ----------------------------------------------------------------------------- splits
def _split_named(model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(hidden 2-D matrices, embeddings + head, vectors), each parameter once."""
    embed_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or module is getattr(model, "lm_head", None):
            embed_ids.update(id(p) for p in module.parameters(recurse=False))
    hidden, embeds, vectors = [], [], []
    for p in model.parameters():
        if id(p) in embed_ids:
            embeds.append(p)
        elif p.ndim == 2:
            hidden.append(p)
        else:
            vectors.append(p)
    return hidden, embeds, vectors


def _adamw_groups(params_by_kind: list[list[Tensor]]) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on vectors (the last list)."""
    *decayed, vectors = params_by_kind
    groups = [{"params": [p for ps in decayed for p in ps]}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- baselines
def _adamw(model: nn.Module, ctx: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_adamw_groups(list(_split_named(model))), **ADAMW)


def _muon(model: nn.Module, ctx: Any) -> OptimizerList:
    hidden, embeds, vectors = _split_named(model)
    muon = torch.optim.Muon(hidden, lr=MUON_LR, weight_decay=0.01, momentum=0.95)
    return OptimizerList(muon, torch.optim.AdamW(_adamw_groups([embeds, vectors]), **ADAMW))


def _adamw8bit_bnb(model: nn.Module, ctx: Any) -> torch.optim.Optimizer:
    bnb_optim = importlib.import_module("bitsandbytes.optim")
    return bnb_optim.AdamW8bit(_adamw_groups(list(_split_named(model))), **ADAMW)


def _adamw8bit_torchao(model: nn.Module, ctx: Any) -> torch.optim.Optimizer:
    """torchao's AdamW8bit state format and update rule, run eagerly.

    ``torchao.optim.AdamW8bit.step`` wraps its per-parameter update in
    ``torch.compile(fullgraph=True, dynamic=False)``: about 30 s of compilation
    per distinct parameter shape on this CPU, so far beyond a row's budget. The
    subclass below calls the same ``single_param_adam`` function without
    compiling it: identical numerics and state bytes, but its step time is the
    eager (slower) one and is not representative of compiled torchao.
    """
    ao_optim = importlib.import_module("torchao.optim")
    single_param_adam = importlib.import_module("torchao.optim.adam").single_param_adam

    class EagerAdamW8bit(ao_optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure: Callable[[], Any] | None = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if not st:
                        st["step"] = torch.tensor(0.0)
                        st["exp_avg"] = self._new_buffer(p, True)
                        st["exp_avg_sq"] = self._new_buffer(p, False)
                    st["step"] += 1
                    beta1, beta2 = group["betas"]
                    single_param_adam(
                        p.detach(), p.grad, st["step"], st["exp_avg"], st["exp_avg_sq"], None,
                        group["lr"], beta1, beta2, group["weight_decay"], group["eps"],
                        True, False,
                    )  # fmt: skip

    return EagerAdamW8bit(_adamw_groups(list(_split_named(model))), **ADAMW)
