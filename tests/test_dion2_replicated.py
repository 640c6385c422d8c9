"""Dion2, NorDion2 and Muon groups on 2 and 3 gloo ranks.

Averaged gradients (grad_sync) against a single process fed the mean gradient;
the selected-rows exchange (dion2_exchange="selected_rows") against a float64 run
of the same maths with every rank's momentum in one process, and its bytes.
"""

from __future__ import annotations

import pytest
import torch
from _dist import spawn_fixture
from _replicated import (
    MU,
    SHAPES,
    STEPS,
    assert_identical_across_ranks,
    grads_,
    groups_,
    params_,
    run_,
)

import dion_lp
from dion_lp.algorithms.dion2_rows import sketch_matrix
from dion_lp.dist.accounting import mean_bytes
from dion_lp.reference import newton_schulz_reference

dist_results = spawn_fixture(__name__, world_sizes=(2, 3))


def case_dion2_and_muon(rank, world_size):
    """The matrices in a dion2 / muon group: their gradients averaged by grad_sync
    (int8 momentum: the rounding bits are the same on every rank)."""
    out = {}
    for algorithm in ("dion2", "nordion2", "muon"):
        params, _ = run_(world_size, rank, momentum_dtype="int8", algorithm=algorithm)
        out[algorithm] = [p.detach() for p in params]
    return out


def case_dion2_selected_rows(rank, world_size):
    """Each rank keeps its own Dion2 momentum; only row norms and selected rows travel."""
    out = {}
    for comm_dtype in ("fp32", "bf16"):
        params = params_()
        groups = [{"params": params[:2], "rank_fraction": 0.25}]
        groups.append({"params": params[2:], "algorithm": "adamw"})
        opt = dion_lp.Dion(
            groups,
            lr=0.02, mu=MU, weight_decay=0.1, algorithm="dion2", grad_sync=True,
            dion2_exchange="selected_rows", comm_dtype=comm_dtype,
        )  # fmt: skip
        bytes_per_step = []
        for step in range(STEPS):
            for p, g in zip(params, grads_(rank, step), strict=True):
                p.grad = g
            before = opt.comm_stats()["bytes_sent"]
            opt.step()
            bytes_per_step.append(opt.comm_stats()["bytes_sent"] - before)
        out[comm_dtype] = [p.detach() for p in params], bytes_per_step
    return out


@pytest.mark.parametrize("algorithm", ["dion2", "nordion2", "muon"])
def test_dion2_and_muon_equal_single_process_on_the_mean_gradient(dist_results, algorithm):
    per_rank = [r[algorithm] for r in dist_results["case_dion2_and_muon"]]
    assert_identical_across_ranks(per_rank)
    params = params_()
    opt = dion_lp.Dion(
        groups_(params, momentum_dtype="int8"), lr=0.02, mu=MU, weight_decay=0.1,
        algorithm=algorithm,
    )  # fmt: skip
    for step in range(STEPS):
        per_step = [grads_(r, step) for r in range(dist_results.world_size)]
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in per_step) / dist_results.world_size
        opt.step()
    for got, want in zip(per_rank[0], params, strict=True):  # the mean: summed in another order
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


def _selected_rows_reference(world_size):
    """The compressed Dion2 maths in float64, every rank's momentum in one process (the
    sketch matrices drawn as the optimizer documents: sketch_matrix)."""
    shapes = SHAPES[:2]
    gen = torch.Generator().manual_seed(0)
    X = [torch.randn(s, generator=gen).double() * 0.1 for s in SHAPES][:2]
    M = [[torch.zeros(s, dtype=torch.float64) for s in shapes] for _ in range(world_size)]
    for step in range(STEPS):
        grads = [grads_(r, step) for r in range(world_size)]
        for j, (m, n) in enumerate(shapes):
            B = [M[r][j] + grads[r][j].double() for r in range(world_size)]
            dim = 0 if m <= n else 1
            omega = sketch_matrix(B[0].shape[1 - dim], seed=0, index=j, step=step).double()
            Z = sum((b if dim == 0 else b.T) @ omega for b in B) / world_size
            k = -(-min(m, n) // 4)
            chosen = Z.square().sum(dim=1).argsort(descending=True)[:k].sort().values
            C = sum(b.index_select(dim, chosen) for b in B) / world_size
            U = newton_schulz_reference(C)
            for r in range(world_size):
                M[r][j] = B[r].index_add(dim, chosen, C, alpha=-(1 - MU))
            X[j] = (X[j] * (1 - 0.02 * 0.1)).index_add(dim, chosen, U, alpha=-0.02 * (m / n) ** 0.5)
    return X


def test_dion2_selected_rows_is_its_maths_and_sends_rows_only(dist_results):
    """fp32: the parameters of a float64 run of the same maths; bf16 rows stay close. Bytes
    per step: a quantized mean of the row norms (fp32) and of the k x n rows, exactly."""
    N = dist_results.world_size
    expected = _selected_rows_reference(N)
    per_rank = [r["fp32"][0] for r in dist_results["case_dion2_selected_rows"]]
    assert_identical_across_ranks(per_rank)
    for got, want in zip(per_rank[0][:2], expected, strict=True):
        assert (got.double() - want).abs().max() < 1e-5
    bf16 = dist_results["case_dion2_selected_rows"][0]["bf16"][0]
    for got, want in zip(bf16[:2], expected, strict=True):
        assert (got.double() - want).abs().max() < 3e-3
    (m1, n1), (m2, n2) = SHAPES[:2]  # (96, 64): 16 of 64 columns; (48, 160): 12 of 48 rows
    for fmt in ("fp32", "bf16"):
        rows = mean_bytes(16 * 96 + 12 * 160, fmt, N)
        norms = mean_bytes((64 + 48) * 16, "fp32", N)  # the sketches
        flags = -(-2 * (N - 1) * 8 // N)  # the non-finite agreement: 4 params x 2 bytes
        adamw = mean_bytes(16 * 16 + 16, fmt, N)  # grad_sync of the AdamW group
        sent = dist_results["case_dion2_selected_rows"][0][fmt][1]
        assert sent == [flags + norms + rows + adamw] * STEPS
        # under half the fp32 gradient all-reduce even here, where the 16-column sketches
        # of 64- and 48-slice matrices are a third of the payload
        assert rows + norms < mean_bytes(m1 * n1 + m2 * n2, "fp32", N) / 2
