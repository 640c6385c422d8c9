"""Single-process Dion against the fp64 reference twin and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dion_lp
from dion_lp.algorithms.dion import initial_right_factor
from dion_lp.options import dion_rank
from dion_lp.reference import dion_reference_step

SHAPES = [(32, 16), (16, 32), (24, 24), (48, 5)]


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank_fraction", [1.0, 0.5, 0.2])
def test_matches_reference_step_by_step(shape, rank_fraction):
    torch.manual_seed(0)
    lr, mu, wd, seed = 0.05, 0.9, 0.1, 3
    X = nn.Parameter(torch.randn(shape))
    opt = dion_lp.Dion([X], lr=lr, mu=mu, weight_decay=wd, rank_fraction=rank_fraction, seed=seed)
    m, n = shape
    r = dion_rank(m, n, rank_fraction, 1)
    Xr = X.detach().double().clone()
    Mr = torch.zeros(shape, dtype=torch.float64)
    Qr = initial_right_factor(min(m, n), r, seed=seed, index=0).double()
    for G in _grads(shape, 6, seed=1):
        X.grad = G.clone()
        opt.step()
        Xr, Mr, Qr = dion_reference_step(Xr, G.double(), Mr, Qr, lr=lr, mu=mu, weight_decay=wd)
        st = opt.state[X]
        torch.testing.assert_close(X.detach().double(), Xr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st["momentum_codes"].double(), Mr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st["Q"].double(), Qr, rtol=1e-4, atol=1e-4)
    assert st["Q"].shape == (min(m, n), r)


def test_full_rank_first_step_closed_form():
    """Full rank, zero momentum: P spans G's columns, so P R^T = P P^T G = G and M = mu G;
    the update is lr sqrt(m/n) P Q^T with orthonormal P and unit columns of Q, so its
    Frobenius norm is lr sqrt(m/n) sqrt(r) and its rank r."""
    torch.manual_seed(1)
    m, n, lr, mu = 40, 24, 0.1, 0.8
    X = nn.Parameter(torch.randn(m, n))
    X0 = X.detach().clone()
    G = torch.randn(m, n)
    X.grad = G.clone()
    opt = dion_lp.Dion([X], lr=lr, mu=mu, weight_decay=0.0, rank_fraction=1.0)
    opt.step()
    torch.testing.assert_close(opt.state[X]["momentum_codes"], mu * G, rtol=1e-4, atol=1e-5)
    update = X.detach() - X0
    expected = lr * math.sqrt(m / n) * math.sqrt(n)
    assert update.norm().item() == pytest.approx(expected, rel=1e-5)
    assert torch.linalg.matrix_rank(update.double(), rtol=1e-6).item() == n


@pytest.mark.parametrize("shape,rank_fraction", [((40, 24), 0.25), ((24, 40), 0.5)])
def test_low_rank_update_norm_and_rank(shape, rank_fraction):
    torch.manual_seed(2)
    lr = 0.02
    X = nn.Parameter(torch.zeros(shape))  # zero start: the update is read off without cancellation
    X0 = X.detach().clone()
    X.grad = torch.randn(shape)
    opt = dion_lp.Dion([X], lr=lr, weight_decay=0.0, rank_fraction=rank_fraction)
    opt.step()
    m, n = shape
    r = dion_rank(m, n, rank_fraction, 1)
    update = (X.detach() - X0).double()
    assert update.norm().item() == pytest.approx(lr * math.sqrt(m / n) * math.sqrt(r), rel=1e-5)
    assert torch.linalg.matrix_rank(update, rtol=1e-6).item() == r


def test_rank_rounding():
    assert dion_rank(768, 3072, 1 / 16, 1) == 48
    assert dion_rank(30, 100, 0.1, 1) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert dion_rank(30, 100, 0.1, 8) == 8
    assert dion_rank(10, 100, 0.5, 8) == 8
    assert dion_rank(6, 100, 0.5, 8) == 6  # capped at min(m, n)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, "Invalid lr: -1.0"),
        ({"lr": float("nan")}, "Invalid lr"),
        ({"mu": 1.0}, "Invalid mu: 1.0"),
        ({"mu": -0.1}, "Invalid mu: -0.1"),
        ({"rank_fraction": 0.0}, "Invalid rank_fraction: 0.0"),
        ({"rank_fraction": 1.5}, "Invalid rank_fraction: 1.5"),
        ({"rank_multiple_of": 0}, "Invalid rank_multiple_of: 0"),
        ({"weight_decay": -0.01}, "Invalid weight_decay: -0.01"),
        ({"betas": (0.9, 1.0)}, r"Invalid betas\[1\]: 1.0"),
        ({"betas": (-0.1, 0.9)}, r"Invalid betas\[0\]: -0.1"),
        ({"eps": 0.0}, "Invalid eps: 0.0"),
        ({"momentum_dtype": "int3"}, "Invalid momentum_dtype: 'int3'"),
        ({"comm_dtype": "fp16x"}, "Invalid comm_dtype: 'fp16x'"),
        ({"algorithm": "sgd"}, "Invalid algorithm: 'sgd'"),
        ({"nonfinite": "ignore"}, "Invalid nonfinite: 'ignore'"),
        ({"block_size": 0}, "Invalid block_size: 0"),
        ({"seed": 1.5}, "Invalid seed: 1.5"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dion_lp.Dion([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_group_overrides_are_validated_too():
    with pytest.raises(ValueError, match="Invalid rank_fraction: 2"):
        dion_lp.Dion([{"params": [nn.Parameter(torch.randn(4, 4))], "rank_fraction": 2}])


def test_thin_and_non_matrix_params_rejected_in_dion_group():
    with pytest.raises(ValueError, match="dimension of 1"):
        dion_lp.Dion([nn.Parameter(torch.randn(1, 8))])
    with pytest.raises(ValueError, match="2-D matrices"):
        dion_lp.Dion([nn.Parameter(torch.randn(8))])
    with pytest.raises(ValueError, match="not floating"):
        dion_lp.Dion([{"params": [torch.zeros(3, dtype=torch.long)], "algorithm": "lion"}])
    # the same tensors are fine in a scalar group
    dion_lp.Dion([{"params": [nn.Parameter(torch.randn(1, 8))], "algorithm": "lion"}])


def test_zero_gradient_applies_only_weight_decay_and_keeps_iterating():
    torch.manual_seed(3)
    lr, wd = 0.1, 0.5
    X = nn.Parameter(torch.randn(16, 12))
    X0 = X.detach().clone()
    opt = dion_lp.Dion([X], lr=lr, weight_decay=wd, rank_fraction=0.5)
    X.grad = torch.zeros_like(X)
    opt.step()
    torch.testing.assert_close(X.detach(), X0 * (1 - lr * wd))
    st = opt.state[X]
    assert torch.isfinite(st["Q"]).all() and st["Q"].norm(dim=0).min() > 0.99
    # a later real gradient still moves the weights (the power iteration is alive)
    X1 = X.detach().clone()
    X.grad = torch.randn(16, 12)
    opt.step()
    assert ((X.detach() - X1 * (1 - lr * wd)).norm() > 0.1 * lr).item()


def test_params_without_grad_are_skipped():
    A, B = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    B0 = B.detach().clone()
    opt = dion_lp.Dion([A, B])
    A.grad = torch.randn(8, 8)
    opt.step()
    assert B not in opt.state or not opt.state[B]
    assert torch.equal(B.detach(), B0)


def test_transposed_non_contiguous_param_matches_contiguous():
    torch.manual_seed(4)
    base = torch.randn(20, 12)
    Xt = nn.Parameter(base.T)  # 12 x 20, not contiguous
    Xc = nn.Parameter(base.T.contiguous())
    assert not Xt.is_contiguous()
    opt_t = dion_lp.Dion([Xt], rank_fraction=0.5, seed=7)
    opt_c = dion_lp.Dion([Xc], rank_fraction=0.5, seed=7)
    for G in _grads((12, 20), 4, seed=5):
        Xt.grad, Xc.grad = G.clone(), G.clone()
        opt_t.step()
        opt_c.step()
    torch.testing.assert_close(Xt.detach(), Xc.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_use_fp32_maths(dtype):
    torch.manual_seed(5)
    X32 = nn.Parameter(torch.randn(16, 16))
    X16 = nn.Parameter(X32.detach().to(dtype))
    X32.data.copy_(X16.detach().float())
    opt32 = dion_lp.Dion([X32], lr=0.01)
    opt16 = dion_lp.Dion([X16], lr=0.01)
    G = torch.randn(16, 16)
    X32.grad, X16.grad = G.clone(), G.to(dtype)
    opt32.step()
    opt16.step()
    assert X16.dtype == dtype
    assert opt16.state[X16]["momentum_codes"].dtype == torch.float32
    torch.testing.assert_close(X16.detach().float(), X32.detach(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_gradient(mode):
    torch.manual_seed(6)
    good = nn.Parameter(torch.randn(8, 8))
    bad = nn.Parameter(torch.randn(8, 8))
    vec = nn.Parameter(torch.randn(8))
    opt = dion_lp.Dion(
        [
            {"params": [good, bad], "param_names": ["good", "bad"]},
            {"params": [vec], "param_names": ["vec"], "algorithm": "adamw"},
        ],
        nonfinite=mode,
    )
    for p in (good, bad, vec):
        p.grad = torch.randn_like(p)
    opt.step()
    snapshot = {k: v.clone() for k, v in opt.state[bad].items() if torch.is_tensor(v)}
    before = [p.detach().clone() for p in (good, bad, vec)]
    bad.grad[2, 3] = float("nan")
    good.grad = torch.randn_like(good)
    vec.grad = torch.randn_like(vec)
    if mode == "raise":
        with pytest.raises(dion_lp.NonFiniteGradientError, match="'bad'"):
            opt.step()
        for p, b in zip((good, bad, vec), before, strict=True):
            assert torch.equal(p.detach(), b)  # nothing at all was updated
    else:
        opt.step()
        assert torch.equal(bad.detach(), before[1])
        assert not torch.equal(good.detach(), before[0])
        assert not torch.equal(vec.detach(), before[2])
    for k, v in snapshot.items():
        assert torch.equal(opt.state[bad][k], v)
    assert opt.state[bad]["step"] == 1


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "fp8_e4m3", "dynamic8"])
def test_huge_finite_gradients_stay_finite_and_larger_ones_are_refused(fmt):
    """Up to GRAD_LIMIT (1e18) every format scales without overflow; beyond it, where
    AdamW's g^2 would overflow fp32 (1.8e19), the gradient counts as non-finite."""
    from dion_lp.gradients import GRAD_LIMIT

    gen = torch.Generator().manual_seed(8)
    X = nn.Parameter(torch.randn(96, 64, generator=gen))
    v = nn.Parameter(torch.randn(6144, generator=gen))
    opt = dion_lp.Dion(
        [{"params": [X]}, {"params": [v], "algorithm": "adamw"}],
        momentum_dtype=fmt,
        rank_fraction=0.25,
    )
    for _ in range(3):
        X.grad = torch.randn(96, 64, generator=gen).clamp(-1, 1) * GRAD_LIMIT
        v.grad = torch.randn(6144, generator=gen).clamp(-1, 1) * GRAD_LIMIT
        opt.step()
    assert torch.isfinite(X).all() and torch.isfinite(v).all()
    # Dion's update is orthonormal: RMS lr * sqrt(m / n) per step whatever |G|
    assert X.abs().max() < 10
    before = X.detach().clone()
    X.grad[0, 0] = 2 * GRAD_LIMIT
    with pytest.raises(dion_lp.NonFiniteGradientError, match="overflows fp32"):
        opt.step()
    assert torch.equal(X.detach(), before)


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_rank_deficient_gradient_gives_an_update_of_its_rank(shape):
    """G = U C_t V^T of rank 2 with r = 16 (so M stays in that span too): the update
    has rank 2, not 2 directions plus 14 of normalized rounding noise."""
    gen = torch.Generator().manual_seed(9)
    m, n = shape
    X = nn.Parameter(torch.randn(m, n, generator=gen))
    opt = dion_lp.Dion([X], lr=0.01, weight_decay=0.0, rank_fraction=0.25)
    U, V = torch.randn(m, 2, generator=gen), torch.randn(n, 2, generator=gen)
    for _ in range(3):
        before = X.detach().clone()
        X.grad = U @ torch.randn(2, 2, generator=gen) @ V.T
        opt.step()
        s = torch.linalg.svdvals((X.detach() - before).double())
        assert s[2] < 1e-3 * s[0], s[:4]  # fp32 rounding of X - before is ~1e-4 s[0]
        assert s[1] > 0.1 * s[0]  # both real directions move


def test_bad_parameter_sets_are_refused():
    X = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="more than one parameter group"):
        dion_lp.Dion([{"params": [X]}, {"params": [X]}])
    with pytest.raises(ValueError, match="int32 is not floating"):
        dion_lp.Dion([nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)])
    with pytest.raises(ValueError, match="one device"):
        dion_lp.Dion([X, nn.Parameter(torch.randn(8, 8, device="meta"))])


def test_same_seed_same_run_different_seed_different_run():
    def run(seed):
        torch.manual_seed(0)
        X = nn.Parameter(torch.randn(24, 16))
        opt = dion_lp.Dion([X], rank_fraction=0.25, seed=seed)
        for G in _grads((24, 16), 3, seed=9):
            X.grad = G
            opt.step()
        return X.detach()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_adamw_group_matches_torch_adamw():
    torch.manual_seed(7)
    a = nn.Parameter(torch.randn(10, 3))
    b = nn.Parameter(a.detach().clone())
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = dion_lp.Dion([{"params": [a], "algorithm": "adamw"}], **kw)
    ref = torch.optim.AdamW([b], **kw)
    for G in _grads((10, 3), 20, seed=10):
        a.grad, b.grad = G.clone(), G.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)


def test_lion_group_matches_closed_form():
    """Lion's first step from zero momentum moves every entry by exactly lr*sign(g) (+ decay);
    the second uses sign(b1 m + (1 - b1) g) with m = (1 - b2) g1."""
    lr, wd, b1, b2 = 1e-3, 0.1, 0.9, 0.99
    X = nn.Parameter(torch.randn(6, 5))
    X0 = X.detach().clone()
    opt = dion_lp.Dion(
        [{"params": [X], "algorithm": "lion"}], lr=lr, weight_decay=wd, betas=(b1, b2)
    )
    g1, g2 = _grads((6, 5), 2, seed=11)
    X.grad = g1
    opt.step()
    X1 = X0 * (1 - lr * wd) - lr * g1.sign()
    torch.testing.assert_close(X.detach(), X1)
    X.grad = g2
    opt.step()
    m1 = (1 - b2) * g1
    X2 = X1 * (1 - lr * wd) - lr * (b1 * m1 + (1 - b1) * g2).sign()
    torch.testing.assert_close(X.detach(), X2)


def test_state_bytes_fp32_counts_every_tensor():
    X = nn.Parameter(torch.randn(64, 32))
    v = nn.Parameter(torch.randn(32))
    opt = dion_lp.Dion([{"params": [X]}, {"params": [v], "algorithm": "adamw"}], rank_fraction=0.25)
    X.grad, v.grad = torch.randn_like(X), torch.randn_like(v)
    opt.step()
    r = dion_rank(64, 32, 0.25, 1)
    assert opt.state_bytes() == 4 * (64 * 32 + 32 * r) + 4 * (32 + 32)
