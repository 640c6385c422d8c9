"""Parameters, gradients and the optimizer run shared by the replicated test modules."""

from __future__ import annotations

import torch
from torch import nn

import dion_lp

# Two factor-exchanging matrices (tall and wide, rank 1/4, large enough for 8-bit
# momentum: >= MIN_QUANT_NUMEL elements), one square full-rank matrix whose
# (m + n) r >= m n makes the replicas average B itself, one vector.
SHAPES = [(96, 64), (48, 160), (16, 16), (16,)]
STEPS = 5
MU = 0.9


def params_():
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]


def groups_(params, **kw):
    return [
        {"params": params[:2], "rank_fraction": 0.25, **kw},
        {"params": params[2:3], "rank_fraction": 1.0, **kw},
        {"params": params[3:], "algorithm": "adamw", "lr": 1e-3, **kw},
    ]


def grads_(rank, step, zero_rank=None, scale=1.0):
    if rank == zero_rank:  # e.g. a rank whose batch touched none of these weights
        return [torch.zeros(s) for s in SHAPES]
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(s, generator=gen) * (1 + rank) * scale for s in SHAPES]


def run_(world_size, rank, steps=STEPS, zero_rank=None, scale=1.0, **kw):
    params = params_()
    group_kw = {k: kw.pop(k) for k in ("comm_dtype", "momentum_dtype") if k in kw}
    opt = dion_lp.Dion(
        groups_(params, **group_kw), lr=0.02, mu=MU, weight_decay=0.1, grad_sync=True, **kw
    )
    for step in range(steps):
        for p, g in zip(params, grads_(rank, step, zero_rank, scale), strict=True):
            p.grad = g
        opt.step()
    return params, opt


def assert_identical_across_ranks(per_rank):
    for other in per_rank[1:]:
        for a, b in zip(per_rank[0], other, strict=True):
            assert torch.equal(a, b)
