"""dion_lp.ddp.lowrank and the hooks' ``lowrank_rank``: rank-r PowerSGD means with error feedback.

Independent expectations: the parent regenerates every rank's matrices and runs
the same maths in fp64 from its definition (P^ spans mean(M) Q; the applied mean
is P^ P^T mean(M); rank w keeps M_w - P^ P^T M_w), and closed forms: a mean of
rank <= r goes through exactly, the residuals' mean is exactly what the applied
mean missed, and the wire bytes are two quantized means of the factors.
"""

from __future__ import annotations

import pytest
import torch
from _collectives import recorded_collectives
from _dist import spawn_fixture
from _models import VOCAB, D, EmbedNet
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dion_lp
from dion_lp import hooks
from dion_lp.ddp.lowrank import compressed_shape, initial_q, lowrank_mean_
from dion_lp.dist.accounting import CommStats, collective_bytes, mean_bytes

dist_results = spawn_fixture(__name__, world_sizes=(2, 3))

SHAPES = [(40, 24), (16, 3, 12)]  # the second is viewed as 16 x 36
RANK, STEPS = 4, 4


def _matrices(rank, step, low_rank=False):
    gen = torch.Generator().manual_seed(100 * rank + step)
    if low_rank:  # every rank's matrix in the same 2-dim column space: mean has rank 2
        basis = torch.Generator().manual_seed(7)
        out = []
        for s in SHAPES:
            U = torch.randn(s[0], 2, generator=basis)
            out.append((U @ torch.randn(2, torch.Size(s[1:]).numel(), generator=gen)).view(s))
        return out
    return [torch.randn(s, generator=gen) * (1 + rank) for s in SHAPES]


def _run(rank, fmt, low_rank=False):
    """STEPS calls of lowrank_mean_; per step (applied means, residuals, bytes)."""
    residuals = [torch.zeros(s) for s in SHAPES]
    qs = [initial_q(f"m{i}", *compressed_shape(s, RANK)[1:]) for i, s in enumerate(SHAPES)]
    out = []
    for step in range(STEPS):
        grads = _matrices(rank, step, low_rank)
        stats = CommStats()
        lowrank_mean_(grads, residuals, qs, fmt, None, stats)
        out.append(([g.clone() for g in grads], [e.clone() for e in residuals], stats.bytes_sent))
    return out


def _oracle(world_size, low_rank=False):
    """The same maths in fp64, from the definition; per step (applied, per-rank residuals)."""
    residuals = [[torch.zeros(s, dtype=torch.float64) for s in SHAPES] for _ in range(world_size)]
    qs = [initial_q(f"m{i}", *compressed_shape(s, RANK)[1:]).double() for i, s in enumerate(SHAPES)]
    out = []
    for step in range(STEPS):
        applied = []
        for i, s in enumerate(SHAPES):
            Ms = [
                (_matrices(w, step, low_rank)[i].double() + residuals[w][i]).reshape(s[0], -1)
                for w in range(world_size)
            ]
            mean = sum(Ms) / world_size
            P_hat, _ = torch.linalg.qr(mean @ qs[i])
            applied.append((P_hat @ P_hat.T @ mean).view(s))
            qs[i] = mean.T @ P_hat
            for w in range(world_size):
                residuals[w][i] = (Ms[w] - P_hat @ P_hat.T @ Ms[w]).view(s)
        out.append((applied, [list(r) for r in residuals]))
    return out


# ---------------------------------------------------------------------------- cases
def case_lowrank_mean(rank, world_size):
    return {
        (fmt, low): _run(rank, fmt, low)
        for fmt in ("fp32", "bf16", "fp8_e4m3")
        for low in (False, True)
    }


# ---------------------------------------------------------------------------- tests
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_compressed_shape_follows_the_rate_rule():
    assert compressed_shape((40, 24), 4) == (40, 24, 4)
    assert compressed_shape((16, 3, 12), 4) == (16, 36, 4)
    assert compressed_shape((8, 8), 4) is None  # (8 + 8) 4 * 2 > 64: not worth it
    assert compressed_shape((8, 8), 2) == (8, 8, 2)  # (8 + 8) 2 * 2 == 64
    assert compressed_shape((100,), 4) is None and compressed_shape((40, 24), 0) is None
    assert compressed_shape((50257, 768), 32) == (50257, 768, 32)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8_e4m3"])
def test_identical_on_every_rank(dist_results, fmt):
    per_rank = [r[fmt, False] for r in dist_results["case_lowrank_mean"]]
    for other in per_rank[1:]:
        for (a, _, _), (b, _, _) in zip(per_rank[0], other, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_fp32_matches_the_fp64_oracle(dist_results):
    N = dist_results.world_size
    per_rank = [r["fp32", False] for r in dist_results["case_lowrank_mean"]]
    for step, (applied, residuals) in enumerate(_oracle(N)):
        for i in range(len(SHAPES)):
            assert _rel(per_rank[0][step][0][i], applied[i]) < 1e-4
            for w in range(N):
                assert _rel(per_rank[w][step][1][i], residuals[w][i]) < 1e-4


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8_e4m3"])
def test_residuals_hold_exactly_what_the_applied_mean_missed(dist_results, fmt):
    """sum_t applied_t + mean_w e_w,T == sum_t mean_w g_w,t: nothing lost, only delayed."""
    N = dist_results.world_size
    per_rank = [r[fmt, False] for r in dist_results["case_lowrank_mean"]]
    for i in range(len(SHAPES)):
        true_sum = sum(_matrices(w, t)[i].double() for w in range(N) for t in range(STEPS)) / N
        applied_sum = sum(per_rank[0][t][0][i].double() for t in range(STEPS))
        residual_mean = sum(per_rank[w][-1][1][i].double() for w in range(N)) / N
        torch.testing.assert_close(applied_sum + residual_mean, true_sum, rtol=0, atol=2e-5)
        assert residual_mean.norm() > 0.05 * true_sum.norm()  # rank 4 of 24+: it did drop some


def test_low_rank_mean_goes_through_exactly(dist_results):
    N = dist_results.world_size
    per_rank = [r["fp32", True] for r in dist_results["case_lowrank_mean"]]
    for step in range(STEPS):
        for i in range(len(SHAPES)):
            mean = sum(_matrices(w, step, low_rank=True)[i] for w in range(N)) / N
            # fp32 Gram-Schmidt and two matmuls: measured 1.14e-5 on one CPU, under 1e-5 on another
            assert _rel(per_rank[0][step][0][i], mean) < 5e-5
            assert per_rank[0][step][1][i].norm() < 1e-4 * mean.norm()


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8_e4m3"])
def test_bytes_are_two_factor_means(dist_results, fmt):
    N = dist_results.world_size
    P_numel = sum(s[0] * RANK for s in SHAPES)
    Q_numel = sum(torch.Size(s[1:]).numel() * RANK for s in SHAPES)
    expected = mean_bytes(P_numel, fmt, N) + mean_bytes(Q_numel, fmt, N)
    dense = mean_bytes(sum(torch.Size(s).numel() for s in SHAPES), fmt, N)
    for per_rank in dist_results["case_lowrank_mean"]:
        for _, _, sent in per_rank[fmt, False]:
            assert sent == expected < dense / 2


# ---------------------------------------------------------------------------- DDP + hooks
BATCH, HOOK_RANK, HOOK_STEPS = 12, 2, 4


def _hooked(fmt, adamw=False):
    torch.manual_seed(0)
    model = DistributedDataParallel(EmbedNet())
    if adamw:  # register_ddp picks compress_hook: every gradient averaged, matrices rank 2
        opt = torch.optim.AdamW(model.parameters())
    else:
        opt = dion_lp.Dion(dion_lp.param_groups(model.module), lr=0.01)
    state = hooks.register_ddp(model, opt, comm_dtype=fmt, lowrank_rank=HOOK_RANK)
    names = {id(p): n for n, p in model.module.named_parameters()}
    order = [p for g in opt.param_groups for p in g["params"]]
    return model, state, {str(i): names[id(p)] for i, p in enumerate(order)}


def _hook_step(model, rank, step):
    """This rank's local gradients (under no_sync) and what the hook made of them."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randint(VOCAB, (2, BATCH), generator=gen)
    out = []
    for sync in (False, True):
        model.zero_grad(set_to_none=True)
        with model.no_sync() if not sync else torch.enable_grad():
            nn.functional.cross_entropy(model(x), y).backward()
        out.append({n: p.grad.clone() for n, p in model.module.named_parameters()})
    return out


def case_ddp_hook(rank, world_size):
    out = {}
    for fmt in ("fp32", "fp8_e4m3"):
        model, state, keys = _hooked(fmt)
        with recorded_collectives() as log:
            steps = [_hook_step(model, rank, s) for s in range(HOOK_STEPS)]
        out[fmt] = (steps, state.state_dict(), keys, [(kind, S) for kind, S, _ in log])
    model, state, _ = _hooked("fp8_e4m3", adamw=True)
    assert isinstance(state, hooks.CompressState)
    out["compress"] = ([_hook_step(model, rank, s) for s in range(HOOK_STEPS)], state.state_dict())
    # resume: 2 steps, save, a fresh model + hook state loads it, 2 more steps
    model, state, _ = _hooked("fp8_e4m3")
    for s in range(2):
        _hook_step(model, rank, s)
    saved = state.state_dict()
    model, state, _ = _hooked("fp8_e4m3")
    state.load_state_dict(saved)
    out["resumed"] = [_hook_step(model, rank, s) for s in range(2, HOOK_STEPS)]
    return out


COMPRESSED = ("emb.weight", "head.weight")  # 64 x 16: (64 + 16) 2 * 2 <= 1024


@pytest.mark.parametrize("fmt", ["fp32", "fp8_e4m3"])
def test_hook_sends_matrices_as_factors_and_keeps_dion_local(dist_results, fmt):
    N = dist_results.world_size
    per_rank = [r[fmt] for r in dist_results["case_ddp_hook"]]
    for steps, _, _, _ in per_rank[1:]:  # every rank applies the same gradients
        for (_, synced), (_, synced0) in zip(steps, per_rank[0][0], strict=True):
            for name in synced:
                if name != "hidden.weight":
                    assert torch.equal(synced[name], synced0[name]), name
    for steps, _, _, _ in per_rank:
        for local, synced in steps:
            assert torch.equal(synced["hidden.weight"], local["hidden.weight"])  # Dion's: local
            for name in COMPRESSED:
                assert torch.linalg.matrix_rank(synced[name]) <= HOOK_RANK
    for step in range(HOOK_STEPS):  # vectors: the plain mean
        for name in ("hidden.bias", "head.bias"):
            mean = sum(r[0][step][0][name] for r in per_rank) / N
            tol = 1e-6 if fmt == "fp32" else 0.1
            assert _rel(per_rank[0][0][step][1][name], mean) < tol


def test_hook_matches_the_fp64_oracle_and_loses_nothing(dist_results):
    N = dist_results.world_size
    per_rank = [r["fp32"] for r in dist_results["case_ddp_hook"]]
    keys = {name: key for key, name in per_rank[0][2].items()}
    for name in COMPRESSED:
        shape = per_rank[0][0][0][0][name].shape
        q = initial_q(keys[name], shape[1], HOOK_RANK).double()
        residuals = [torch.zeros(shape, dtype=torch.float64) for _ in range(N)]
        for step in range(HOOK_STEPS):
            Ms = [per_rank[w][0][step][0][name].double() + residuals[w] for w in range(N)]
            mean = sum(Ms) / N
            P_hat, _ = torch.linalg.qr(mean @ q)
            q = mean.T @ P_hat
            residuals = [M - P_hat @ P_hat.T @ M for M in Ms]
            assert _rel(per_rank[0][0][step][1][name], P_hat @ P_hat.T @ mean) < 1e-4
        for w in range(N):  # the saved residuals are the oracle's
            assert _rel(per_rank[w][1]["residuals"][keys[name]], residuals[w]) < 1e-4


@pytest.mark.parametrize("fmt", ["fp32", "fp8_e4m3"])
def test_hook_bytes_match_the_wrapped_collectives(dist_results, fmt):
    N = dist_results.world_size
    vectors = D + VOCAB  # hidden.bias, head.bias
    P_numel, Q_numel = 2 * VOCAB * HOOK_RANK, 2 * D * HOOK_RANK
    flags = collective_bytes("all_reduce", 4, N)  # a uint8 flag per averaged gradient (4)
    per_step = sum(mean_bytes(n, fmt, N) for n in (vectors, P_numel, Q_numel))
    for _, saved, _, log in (r[fmt] for r in dist_results["case_ddp_hook"]):
        reduces = [S for kind, S in log if kind == "all_reduce"]
        assert reduces == [4] * HOOK_STEPS  # only the flags: no gradient all-reduced
        measured = sum(S * (N - 1) // N for kind, S in log if kind != "all_reduce")
        assert measured == HOOK_STEPS * per_step  # bus bytes of N equal chunks
        assert saved["comm_stats"]["bytes_sent"] == HOOK_STEPS * (per_step + flags)
        dense = mean_bytes(2 * VOCAB * D + vectors, fmt, N)
        assert per_step < 0.6 * dense


def test_compress_hook_lowrank_loses_nothing(dist_results):
    """compress_hook + lowrank_rank: every matrix (Dion's 16 x 16 too) of rank <= 2;
    sum of applied means + mean residual == sum of true means (names as keys)."""
    N = dist_results.world_size
    per_rank = [r["compress"] for r in dist_results["case_ddp_hook"]]
    for name in ("emb.weight", "hidden.weight", "head.weight"):
        applied = sum(per_rank[0][0][t][1][name].double() for t in range(HOOK_STEPS))
        true = sum(per_rank[w][0][t][0][name].double() for w in range(N) for t in range(HOOK_STEPS))
        residual = sum(per_rank[w][1]["residuals"][name].double() for w in range(N))
        torch.testing.assert_close(applied + residual / N, true / N, rtol=0, atol=1e-5)
        for w in range(1, N):
            assert torch.equal(per_rank[w][0][-1][1][name], per_rank[0][0][-1][1][name])
        assert torch.linalg.matrix_rank(per_rank[0][0][-1][1][name]) <= HOOK_RANK


def test_hook_resumes_bit_for_bit(dist_results):
    for r in dist_results["case_ddp_hook"]:
        straight = r["fp8_e4m3"][0][2:]
        for (_, a), (_, b) in zip(straight, r["resumed"], strict=True):
            for name in a:
                assert torch.equal(a[name], b[name]), name


def test_lowrank_arguments_are_checked():
    model = EmbedNet()
    opt = dion_lp.Dion(dion_lp.param_groups(model), lr=0.01)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="lowrank_rank"):
            hooks.DionHookState(opt, lowrank_rank=bad)
    with pytest.raises(ValueError, match="error_feedback=True"):
        hooks.CompressState(lowrank_rank=2, error_feedback=False)
    state = hooks.DionHookState(opt, lowrank_rank=2)
    saved = state.state_dict()
    with pytest.raises(ValueError, match="lowrank_rank=2"):
        hooks.DionHookState(opt).load_state_dict(saved)
    wrapped = hooks.compress_wrapper(lambda s, b: None)
    with pytest.raises(ValueError, match="lowrank_rank"):
        wrapped(hooks.CompressState(comm_dtype="bf16", lowrank_rank=2), None)


def test_lowrank_state_pickles_without_the_process_group():
    import pickle

    model = EmbedNet()
    opt = dion_lp.Dion(dion_lp.param_groups(model), lr=0.01)
    state = hooks.DionHookState(opt, lowrank_rank=2)
    state.lowrank_q["0"] = initial_q("0", 16, 2)
    back = pickle.loads(pickle.dumps(state))
    assert back.lowrank_rank == 2 and back.process_group is None
    assert torch.equal(back.state_dict()["lowrank_q"]["0"], state.lowrank_q["0"])
