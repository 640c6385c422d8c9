"""dion_lp.param_groups splits real model shapes the way Dion needs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dion_lp


class TinyGPT(nn.Module):
    def __init__(self, vocab=50, d=16, tied=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(8, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln": nn.LayerNorm(d),
                    "attn": nn.Linear(d, 3 * d),
                    "proj": nn.Linear(d, d, bias=False),
                    "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
                }
            )
            for _ in range(2)
        )
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight
        self.gate = nn.Parameter(torch.zeros(1, d))  # a 1 x d matrix: too thin for Dion


@pytest.mark.parametrize("tied", [True, False])
def test_every_param_exactly_once_and_in_the_right_group(tied):
    model = TinyGPT(tied=tied)
    groups = dion_lp.param_groups(model, scalar_algorithm="lion", scalar_lr=1e-4)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    by_algo = {}
    for g in groups:
        for name in g["param_names"]:
            by_algo[name] = (g["algorithm"], g.get("weight_decay"))
    assert by_algo["wte.weight"][0] == "lion"
    assert by_algo["wpe.weight"][0] == "lion"
    if not tied:
        assert by_algo["lm_head.weight"][0] == "lion"
    for i in range(2):
        assert by_algo[f"blocks.{i}.attn.weight"][0] == "dion"
        assert by_algo[f"blocks.{i}.proj.weight"][0] == "dion"
        assert by_algo[f"blocks.{i}.mlp.0.weight"][0] == "dion"
        assert by_algo[f"blocks.{i}.attn.bias"] == ("lion", 0.0)
        assert by_algo[f"blocks.{i}.ln.weight"] == ("lion", 0.0)
    assert by_algo["gate"] == ("lion", 0.0)
    for g in groups:
        if g["algorithm"] == "lion":
            assert g["lr"] == 1e-4
    # the groups build an optimizer that steps
    opt = dion_lp.Dion(groups, lr=0.01)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def test_exclude_and_overrides():
    model = TinyGPT()
    groups = dion_lp.param_groups(
        model, scalar_algorithm="adamw", exclude=("blocks.0.attn",), rank_fraction=0.5
    )
    dion_group = next(g for g in groups if g["algorithm"] == "dion")
    assert dion_group["rank_fraction"] == 0.5
    assert "blocks.0.attn.weight" not in dion_group["param_names"]
    assert "blocks.1.attn.weight" in dion_group["param_names"]
    with pytest.raises(ValueError, match="Invalid scalar_algorithm: 'sgd'"):
        dion_lp.param_groups(model, scalar_algorithm="sgd")


def test_frozen_params_left_out():
    model = TinyGPT()
    model.wpe.weight.requires_grad_(False)
    names = [n for g in dion_lp.param_groups(model) for n in g["param_names"]]
    assert "wpe.weight" not in names
