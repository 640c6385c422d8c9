"""Data-parallel Dion2 that sends only the selected rows (``dion2_exchange="selected_rows"``).

In the default mode (``"mean_gradient"``) a Dion2 matrix's gradient is averaged
whole (by DDP, the dion_lp hook, or ``grad_sync=True``) and every rank runs the
same Dion2 step. Here, as in Dion, each rank keeps its own momentum ``M_i`` and
its gradient stays local; per step, for the matrices of a group of replicas::

    B_i = M_i + G_i
    Z   = mean_i B_i Omega                              # all-reduce, S x 16 floats (fp32)
    I   = the k slices with the largest ||Z[s, :]||_2   # agreed: every rank has Z
    C   = mean_i B_i[I]                                 # the only payload: k x n, in comm_dtype
    U   = NewtonSchulz(C)                               # identical on every rank
    M_i = B_i, with M_i[I] = B_i[I] - (1 - mu) C        # error feedback, C as received
    X   = X (1 - lr wd);  X[I] -= lr sqrt(m / n) U

(slices along the short side, or rows for NorDion2, as in single-process Dion2;
``Omega`` is a Gaussian ``long side x 16`` matrix scaled by 1/4, drawn from the
optimizer's seed, the parameter's index and the step, so identical on every rank).
The means are linear, so ``mean_i M_i`` is the momentum single-process Dion2 keeps
on the mean gradient whenever ``I`` is the set the exact mean would select: then
the two runs are the same maths (tested). The selection is the one approximation:
``Z`` is a sketch of the mean B itself (linear, so exact to compute from the
ranks' sketches), whose row norms estimate the mean rows' L2 norms (Dion2 ranks
by L1). A cheaper rule, the mean of the ranks' own row L1 norms (S floats),
ranks by the ranks' noise as much as by their agreement: on the ablation's model
it kept 80% (2 ranks) and 88% (4 ranks) of the L1 mass the exact selection
would, against 96% and 97% for the sketch (``python -m
benchmarks.dion2_selection``). Bytes per step: ``S x 16`` fp32 plus the ``k x n``
rows in ``comm_dtype`` (fp32 / bf16 / fp8, through the quantized mean that never
sums in 8 bits), against ``m x n`` fp32 for the gradient all-reduce.
Memory: the step holds every matrix's fp32 B at once (the exchanges are coalesced
over all of them), as Dion's replicated step holds its momenta.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..dist.accounting import CommStats
from ..dist.collectives import quantized_mean_
from ..layouts.placement import placement
from ..quant.buffer import QuantizedBuffer
from ..quant.rng import stream_key
from .dion2 import finish_, init_dion2_state, newton_schulz, rows_only, slice_dim, top_slices

__all__ = ["SKETCH_COLUMNS", "dion2_rows_step_", "sketch_matrix"]


def dion2_rows_step_(
    items: list[tuple[dict[str, Any], Tensor, Tensor, dict[str, Any], int]],
    process_group: Any,
    stats: CommStats,
    *,
    seed: int,
) -> None:
    """One compressed Dion2 / NorDion2 step of every ``(group, p, grad, state, index)``.

    Collective over ``process_group``: every rank calls it with the same matrices
    in the same order. Two exchanges for all of them: the sketches (fp32), then
    the selected rows (one quantized mean per ``comm_dtype``).

    Args:
        items: this step's matrices; ``grad`` is this rank's own (not averaged).
        process_group: the replicas.
        stats: the optimizer's byte counters.
        seed: the optimizer's seed (stochastic rounding).
    """
    mats = []
    for group, p, grad, st, index in items:
        if not st:
            init_dion2_state(p, group, st, placement(p))
        B = QuantizedBuffer(st, "momentum").read(add=grad.float())
        dim = slice_dim(p.shape, rows_only(group))
        omega = sketch_matrix(B.shape[1 - dim], seed=seed, index=index, step=st["step"])
        mats.append((group, p, st, index, B, dim, (B if dim == 0 else B.T) @ omega.to(B.device)))
    quantized_mean_([mat[-1] for mat in mats], "fp32", process_group, stats)
    selected: dict[str, list[Tensor]] = {}
    chosen = []
    for group, p, st, index, B, dim, sketch in mats:
        norms = sketch.square().sum(dim=1)
        idx = top_slices(norms, group["rank_fraction"], group["rank_multiple_of"])
        rows = B.index_select(dim, idx)
        selected.setdefault(group["comm_dtype"], []).append(rows)
        chosen.append((group, p, st, index, B, dim, idx, rows))
    for fmt, rows in selected.items():
        quantized_mean_(rows, fmt, process_group, stats)  # C = mean_i B_i[I], as received
    for group, p, st, index, B, dim, idx, C in chosen:
        U = newton_schulz(C)
        B.index_add_(dim, idx, C, alpha=-(1.0 - group["mu"]))  # M_i[I] = B_i[I] - (1 - mu) C
        m, n = p.shape
        finish_(p, B, U, dim, idx, group, st, seed=seed, index=index, scale=math.sqrt(m / n))


SKETCH_COLUMNS = 16


def sketch_matrix(rows: int, *, seed: int, index: int, step: int) -> Tensor:
    """The ``(rows, 16)`` Gaussian sketch of a step (entries N(0, 1/16)), identical on every
    rank: drawn on the CPU from (seed, parameter index, step)."""
    gen = torch.Generator().manual_seed(stream_key(seed, index, step, "sketch") & (2**63 - 1))
    return torch.randn(rows, SKETCH_COLUMNS, generator=gen) / math.sqrt(SKETCH_COLUMNS)
