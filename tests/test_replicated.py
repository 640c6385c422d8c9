"""Replicated Dion on 2 and 3 gloo ranks against single-process Dion fed the mean gradient.

Every rank draws its own gradients (seeded by rank and step); the parent process
regenerates all of them to run the same maths in one process, which is the
independent expectation: synchronous semantics, as the paper promises.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _collectives import recorded_collectives
from _dist import spawn_fixture
from torch import nn

import dion_lp
from dion_lp.algorithms.dion2_rows import sketch_matrix
from dion_lp.dist.accounting import mean_bytes
from dion_lp.reference import newton_schulz_reference

dist_results = spawn_fixture(__name__, world_sizes=(2, 3))

# Two factor-exchanging matrices (tall and wide, rank 1/4, large enough for 8-bit
# momentum: >= MIN_QUANT_NUMEL elements), one square full-rank matrix whose
# (m + n) r >= m n makes the replicas average B itself, one vector.
SHAPES = [(96, 64), (48, 160), (16, 16), (16,)]
STEPS = 5
MU = 0.9


def _params():
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]


def _groups(params, **kw):
    return [
        {"params": params[:2], "rank_fraction": 0.25, **kw},
        {"params": params[2:3], "rank_fraction": 1.0, **kw},
        {"params": params[3:], "algorithm": "adamw", "lr": 1e-3, **kw},
    ]


def _grads(rank, step, zero_rank=None, scale=1.0):
    if rank == zero_rank:  # e.g. a rank whose batch touched none of these weights
        return [torch.zeros(s) for s in SHAPES]
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(s, generator=gen) * (1 + rank) * scale for s in SHAPES]


def _run(world_size, rank, steps=STEPS, zero_rank=None, scale=1.0, **kw):
    params = _params()
    group_kw = {k: kw.pop(k) for k in ("comm_dtype", "momentum_dtype") if k in kw}
    opt = dion_lp.Dion(
        _groups(params, **group_kw), lr=0.02, mu=MU, weight_decay=0.1, grad_sync=True, **kw
    )
    for step in range(steps):
        for p, g in zip(params, _grads(rank, step, zero_rank, scale), strict=True):
            p.grad = g
        opt.step()
    return params, opt


def _single_process_reference(world_size, steps=STEPS, zero_rank=None):
    params = _params()
    opt = dion_lp.Dion(_groups(params), lr=0.02, mu=MU, weight_decay=0.1)
    for step in range(steps):
        per_rank = [_grads(r, step, zero_rank) for r in range(world_size)]
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in per_rank) / world_size
        opt.step()
    return [p.detach() for p in params]


# ---------------------------------------------------------------------------- cases
def case_fp32(rank, world_size):
    params, opt = _run(world_size, rank)
    assert opt._world_size == world_size  # process_group=None picked the default group
    return [p.detach() for p in params]


def case_dion2_and_muon(rank, world_size):
    """The matrices in a dion2 / muon group: their gradients averaged by grad_sync
    (int8 momentum: the rounding bits are the same on every rank)."""
    out = {}
    for algorithm in ("dion2", "nordion2", "muon"):
        params, _ = _run(world_size, rank, momentum_dtype="int8", algorithm=algorithm)
        out[algorithm] = [p.detach() for p in params]
    return out


def case_dion2_selected_rows(rank, world_size):
    """Each rank keeps its own Dion2 momentum; only row norms and selected rows travel."""
    out = {}
    for comm_dtype in ("fp32", "bf16"):
        params = _params()
        groups = [{"params": params[:2], "rank_fraction": 0.25}]
        groups.append({"params": params[2:], "algorithm": "adamw"})
        opt = dion_lp.Dion(
            groups,
            lr=0.02, mu=MU, weight_decay=0.1, algorithm="dion2", grad_sync=True,
            dion2_exchange="selected_rows", comm_dtype=comm_dtype,
        )  # fmt: skip
        bytes_per_step = []
        for step in range(STEPS):
            for p, g in zip(params, _grads(rank, step), strict=True):
                p.grad = g
            before = opt.comm_stats()["bytes_sent"]
            opt.step()
            bytes_per_step.append(opt.comm_stats()["bytes_sent"] - before)
        out[comm_dtype] = [p.detach() for p in params], bytes_per_step
    return out


def case_formats(rank, world_size):
    out = {}
    for comm_dtype in ("bf16", "fp8_e4m3", "fp8_e5m2"):
        for momentum_dtype in ("fp32", "int8"):
            params, _ = _run(world_size, rank, comm_dtype=comm_dtype, momentum_dtype=momentum_dtype)
            out[comm_dtype, momentum_dtype] = [p.detach() for p in params]
    return out


def case_zero_gradient_on_one_rank(rank, world_size):
    out = {}
    for comm_dtype, momentum_dtype in (("fp32", "fp32"), ("fp8_e4m3", "int8")):
        params, opt = _run(
            world_size,
            rank,
            zero_rank=world_size - 1,
            comm_dtype=comm_dtype,
            momentum_dtype=momentum_dtype,
        )
        out[comm_dtype] = [p.detach() for p in params]
    return out


def case_huge_gradients(rank, world_size):
    """Gradients near GRAD_LIMIT: fp8/bf16 block scales absorb them, nothing overflows."""
    from dion_lp.gradients import GRAD_LIMIT

    out = {}
    for comm_dtype in ("bf16", "fp8_e4m3", "fp8_e5m2"):
        params, _ = _run(world_size, rank, scale=GRAD_LIMIT / 16, comm_dtype=comm_dtype)
        out[comm_dtype] = [p.detach() for p in params]
    return out


def case_group_without_this_rank(rank, world_size):
    tail = dist.new_group(list(range(1, world_size)))  # collective: every rank calls it
    if rank != 0:
        return None
    errors = []
    for build in (
        lambda: dion_lp.Dion([nn.Parameter(torch.randn(8, 8))], process_group=tail),
        lambda: dion_lp.hooks.CompressState(process_group=tail),
    ):
        try:
            build()
        except ValueError as err:
            errors.append(str(err))
    return errors


def case_error_feedback(rank, world_size):
    """Record P R^T as received, then check sum G = M_T - M_0 + (1 - mu) sum P R^T per rank."""
    from dion_lp.algorithms import dion as engine

    received = {}
    original = engine._finish

    def recording(mat, seed):
        PRt = mat.P @ mat.R.T  # tall orientation: back to the parameter's
        key = id(mat.param)
        received[key] = received.get(key, 0) + (PRt if mat.rows_long else PRt.T)
        return original(mat, seed)

    engine._finish = recording
    try:
        params, opt = _run(world_size, rank, comm_dtype="fp8_e4m3")
    finally:
        engine._finish = original
    out = []
    for i, p in enumerate(params[:3]):
        grad_sum = sum(_grads(rank, s)[i] for s in range(STEPS))
        M = opt.state[p]["momentum_codes"]
        out.append((grad_sum, M, received[id(p)]))
    return out


def case_comm_stats(rank, world_size):
    with recorded_collectives() as log:
        _, opt = _run(world_size, rank, steps=3, comm_dtype="fp8_e4m3")
    return [(kind, nbytes) for kind, nbytes, _ in log], opt.comm_stats()


def case_nonfinite(rank, world_size):
    out = {}
    for mode in ("raise", "skip"):
        params, opt = _run(world_size, rank, steps=2, nonfinite=mode)
        before = [p.detach().clone() for p in params]
        state_before = opt.state[params[0]]["momentum_codes"].clone()
        for p, g in zip(params, _grads(rank, 7), strict=True):
            p.grad = g
        if rank == world_size - 1:
            params[0].grad[0, 0] = float("inf")
        try:
            opt.step()
            out[mode] = "stepped"
        except dion_lp.NonFiniteGradientError as err:
            out[mode] = f"raised: {err}"
        out[mode, "params"] = [p.detach() for p in params]
        out[mode, "moved"] = [not torch.equal(a, b) for a, b in zip(params, before, strict=True)]
        out[mode, "state"] = torch.equal(opt.state[params[0]]["momentum_codes"], state_before)
    return out


def case_synchronize_for_checkpoint(rank, world_size):
    """Replacing momenta by their mean does not change the run (the updates only see means)."""
    params, opt = _run(world_size, rank, steps=3)
    opt.synchronize_for_checkpoint()
    M = opt.state[params[0]]["momentum_codes"].clone()
    for step in range(3, STEPS):
        for p, g in zip(params, _grads(rank, step), strict=True):
            p.grad = g
        opt.step()
    return M, [p.detach() for p in params]


def case_resume(rank, world_size):
    """STEPS straight vs STEPS // 2 + save (bytes, weights_only) + fresh optimizer + the rest."""
    import io

    out = {}
    for comm_dtype, momentum_dtype in (
        ("fp32", "fp32"),
        ("fp8_e4m3", "int8"),
        ("bf16", "bf16"),
        ("fp8_e5m2", "fp8_e4m3"),
        ("fp8_e4m3", "dynamic8"),
    ):
        kw = dict(comm_dtype=comm_dtype, momentum_dtype=momentum_dtype)
        straight, _ = _run(world_size, rank, **kw)
        params, opt = _run(world_size, rank, steps=STEPS // 2, **kw)
        buffer = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        params = [nn.Parameter(t.clone()) for t in saved["params"]]
        opt = dion_lp.Dion(
            _groups(params, **kw), lr=0.02, mu=MU, weight_decay=0.1, grad_sync=True, seed=123
        )
        opt.load_state_dict(saved["opt"])
        for step in range(STEPS // 2, STEPS):
            for p, g in zip(params, _grads(rank, step), strict=True):
                p.grad = g
            opt.step()
        out[comm_dtype, momentum_dtype] = all(
            torch.equal(a, b) for a, b in zip(straight, params, strict=True)
        )
    return out


# ---------------------------------------------------------------------------- tests
def _assert_identical_across_ranks(per_rank):
    for other in per_rank[1:]:
        for a, b in zip(per_rank[0], other, strict=True):
            assert torch.equal(a, b)


def test_fp32_equals_single_process_on_the_mean_gradient(dist_results):
    per_rank = dist_results["case_fp32"]
    _assert_identical_across_ranks(per_rank)
    expected = _single_process_reference(dist_results.world_size)
    for got, want in zip(per_rank[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["dion2", "nordion2", "muon"])
def test_dion2_and_muon_equal_single_process_on_the_mean_gradient(dist_results, algorithm):
    per_rank = [r[algorithm] for r in dist_results["case_dion2_and_muon"]]
    _assert_identical_across_ranks(per_rank)
    params = _params()
    opt = dion_lp.Dion(
        _groups(params, momentum_dtype="int8"), lr=0.02, mu=MU, weight_decay=0.1,
        algorithm=algorithm,
    )  # fmt: skip
    for step in range(STEPS):
        per_step = [_grads(r, step) for r in range(dist_results.world_size)]
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
        grads = [_grads(r, step) for r in range(world_size)]
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
    _assert_identical_across_ranks(per_rank)
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


@pytest.mark.parametrize("comm_dtype", ["bf16", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("momentum_dtype", ["fp32", "int8"])
def test_low_precision_formats_stay_identical_and_close(dist_results, comm_dtype, momentum_dtype):
    per_rank = [r[comm_dtype, momentum_dtype] for r in dist_results["case_formats"]]
    _assert_identical_across_ranks(per_rank)
    expected = _single_process_reference(dist_results.world_size)
    # 5 steps of lr 0.02: the update moved each entry by ~0.1; wire rounding may move it
    # by a few percent of that
    tol = {"bf16": 3e-3, "fp8_e4m3": 1.5e-2, "fp8_e5m2": 3e-2}[comm_dtype]
    for got, want in zip(per_rank[0][:3], expected[:3], strict=True):
        assert (got - want).abs().max().item() < tol


@pytest.mark.parametrize("comm_dtype,tol", [("fp32", 5e-5), ("fp8_e4m3", 0.1)])
def test_zero_gradient_on_one_rank_only(dist_results, comm_dtype, tol):
    """The last rank's gradients are all zero: the others' are averaged with its zeros.

    Error relative to how far the exact run moved: fp32 7e-6 to 1.44e-5 (fp32 rounding
    through five QRs; the figure depends on the CPU's BLAS kernels), fp8_e4m3 <= 0.051
    (measured, 2 and 3 ranks, on two CPUs).
    """
    per_rank = [r[comm_dtype] for r in dist_results["case_zero_gradient_on_one_rank"]]
    _assert_identical_across_ranks(per_rank)
    expected = _single_process_reference(
        dist_results.world_size, zero_rank=dist_results.world_size - 1
    )
    unchanged = _params()
    for got, want, before in zip(per_rank[0], expected, unchanged, strict=True):
        assert torch.isfinite(got).all()
        moved = (want - before).norm().item()  # how far the exact run went
        assert (got - want).norm().item() < tol * moved
    # and it is not the run in which the last rank had gradients too
    other = _single_process_reference(dist_results.world_size)[0]
    assert (per_rank[0][0] - other).norm() > 0.3 * (other - unchanged[0]).norm()


def test_error_feedback_loses_nothing(dist_results):
    for per_rank in dist_results["case_error_feedback"]:
        for grad_sum, M, received_sum in per_rank:
            torch.testing.assert_close(M, grad_sum - (1 - MU) * received_sum, rtol=1e-4, atol=1e-4)


def test_comm_stats_match_an_independent_count(dist_results):
    N = dist_results.world_size
    for log, stats in dist_results["case_comm_stats"]:
        kinds = {}
        for kind, nbytes in log:
            factor = 2 if kind == "all_reduce" else 1
            # bus-bandwidth convention, rounded up to whole bytes
            kinds[kind] = kinds.get(kind, 0) - (-factor * (N - 1) * nbytes // N)
        assert stats["bytes_sent"] == sum(kinds.values())
        assert {k: v for k, v in stats["by_kind"].items() if v} == kinds
        assert stats["steps"] == 3
        # one step: flags (4 params x 2 rows) + B of the 16x16 + P's + R's + the vector's grad
        r1, r2 = 16, 12  # ceil(0.25 * 64), ceil(0.25 * 48)
        expected = (
            -(-2 * (N - 1) * 8 // N)
            + mean_bytes(16 * 16, "fp8_e4m3", N)
            + mean_bytes(96 * r1 + 160 * r2, "fp8_e4m3", N)
            + mean_bytes(64 * r1 + 48 * r2, "fp8_e4m3", N)
            + mean_bytes(16, "bf16", N)
        )
        assert stats["last_step"] == expected
        # coalesced: one all-to-all per phase, not one per matrix
        assert sum(1 for kind, _ in log if kind == "all_to_all") == 3 * 4


def test_nonfinite_on_one_rank_is_seen_by_all(dist_results):
    results = dist_results["case_nonfinite"]
    for out in results:
        assert out["raise"].startswith("raised") and "on some rank" in out["raise"]
        assert out["raise", "moved"] == [False] * 4 and out["raise", "state"]
        assert out["skip"] == "stepped"
        assert out["skip", "moved"] == [False, True, True, True] and out["skip", "state"]
    _assert_identical_across_ranks([out["skip", "params"] for out in results])


def test_synchronized_momentum_continues_the_same_run(dist_results):
    results = dist_results["case_synchronize_for_checkpoint"]
    momenta = [M for M, _ in results]
    for M in momenta[1:]:
        assert torch.equal(M, momenta[0])
    expected = _single_process_reference(dist_results.world_size)
    for got, want in zip(results[0][1], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resume_on_every_rank_is_bit_exact(dist_results):
    for out in dist_results["case_resume"]:
        assert out == {key: True for key in out}, out
        assert len(out) == 5


@pytest.mark.parametrize("comm_dtype", ["bf16", "fp8_e4m3", "fp8_e5m2"])
def test_huge_gradients_cross_the_wire_without_overflow(dist_results, comm_dtype):
    """Dion's update and AdamW's are invariant to the gradient's scale (up to AdamW's
    eps), so 6e16-sized gradients must give the run of unit-sized ones."""
    per_rank = [r[comm_dtype] for r in dist_results["case_huge_gradients"]]
    _assert_identical_across_ranks(per_rank)
    expected = _single_process_reference(dist_results.world_size)
    tol = {"bf16": 3e-3, "fp8_e4m3": 1.5e-2, "fp8_e5m2": 3e-2}[comm_dtype]
    for got, want in zip(per_rank[0], expected, strict=True):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max().item() < tol


def test_a_group_without_this_rank_is_refused(dist_results):
    errors = dist_results["case_group_without_this_rank"][0]
    assert len(errors) == 2 and all("this rank (0) is not a member" in e for e in errors), errors


def test_process_group_errors():
    with pytest.raises(ValueError, match="not initialised"):
        dion_lp.Dion([nn.Parameter(torch.randn(4, 4))], process_group=object())
    with pytest.raises(ValueError, match="Invalid grad_sync"):
        dion_lp.Dion([nn.Parameter(torch.randn(4, 4))], grad_sync="yes")
