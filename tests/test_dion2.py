"""Dion2, NorDion2 and Muon groups (dion_lp.algorithms.dion2), in every momentum format.

Oracles: the float64 references of dion_lp.reference (each algorithm as its paper
writes it), torch.optim.Muon for Muon's conventions, a brute-force L1 ranking for
the selection, the fp32 run for the low-precision ones (the first step does not
depend on the momentum's format; training ends within 1% of fp32's loss
reduction), and the uninterrupted run for a resumed one.
"""

from __future__ import annotations

import io

import pytest
import torch
from _models import MOMENTUM_FORMATS, train_student
from torch import nn

import dion_lp
from dion_lp.algorithms.dion2 import newton_schulz, selected_slices
from dion_lp.reference import (
    dion2_reference_step,
    muon_reference_step,
    newton_schulz_reference,
    nordion2_reference_step,
)

SHAPES = [(48, 80), (96, 40)]  # wide: rows are selected; tall: columns


def _run(algorithm: str, shape, steps: int, fmt: str = "fp32", **kw) -> tuple[nn.Parameter, dict]:
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(shape))
    opt = dion_lp.Dion(
        [{"params": [W], "algorithm": algorithm}],
        lr=0.02, mu=0.9, weight_decay=0.1, momentum_dtype=fmt, **kw,
    )  # fmt: skip
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(t)) for t in range(steps)]
    for G in grads:
        W.grad = G.clone()
        opt.step()
    return W, {"opt": opt, "grads": grads}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_dion2_equals_the_float64_reference(shape, fraction: float) -> None:
    W, run = _run("dion2", shape, steps=5, rank_fraction=fraction)
    torch.manual_seed(0)
    X = torch.randn(shape).double()
    M = torch.zeros_like(X)
    for G in run["grads"]:
        X, M = dion2_reference_step(
            X, G.double(), M, lr=0.02, ef_decay=0.9, fraction=fraction, wd=0.1
        )
    assert (W.double() - X).abs().max() <= 1e-5 * X.abs().max()
    M_opt = run["opt"].state[W]["momentum_codes"]
    assert (M_opt.double() - M).abs().max() <= 1e-5 * M.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
def test_nordion2_equals_the_float64_reference(shape) -> None:
    """Rows are selected whatever the shape; the per-row second moment follows too."""
    W, run = _run("nordion2", shape, steps=5, rank_fraction=0.25)
    torch.manual_seed(0)
    X = torch.randn(shape).double()
    M, V = torch.zeros_like(X), torch.zeros(shape[0], dtype=torch.float64)
    for G in run["grads"]:
        X, M, V = nordion2_reference_step(
            X, G.double(), M, V, lr=0.02, ef_decay=0.9, fraction=0.25, beta2=0.95, wd=0.1
        )
    assert (W.double() - X).abs().max() <= 1e-5 * X.abs().max()
    variance = run["opt"].state[W]["row_variance"].double()
    assert (variance - V).abs().max() <= 1e-5 * V.abs().max()
    assert (V > 0).sum() >= 0.25 * shape[0]  # at least the last step's rows


@pytest.mark.parametrize("shape", SHAPES)
def test_muon_equals_the_float64_reference(shape) -> None:
    """The momentum is stored as mu / (1 - mu) times torch's; the parameters agree."""
    W, run = _run("muon", shape, steps=5)
    torch.manual_seed(0)
    X = torch.randn(shape).double()
    M = torch.zeros_like(X)
    for G in run["grads"]:
        X, M = muon_reference_step(X, G.double(), M, lr=0.02, mu=0.9, wd=0.1)
    assert (W.double() - X).abs().max() <= 1e-5 * X.abs().max()
    stored = run["opt"].state[W]["momentum_codes"].double()
    assert (stored - 9.0 * M).abs().max() <= 1e-5 * (9.0 * M).abs().max()


def test_muon_follows_torch_optim_muon() -> None:
    """torch.optim.Muon (Newton-Schulz in bf16) and the "muon" group (fp32): the same
    update up to bf16's ~1% per step, over 3 steps."""
    torch.manual_seed(0)
    W1 = nn.Parameter(torch.randn(64, 96))
    W2 = nn.Parameter(W1.detach().clone())
    ours = dion_lp.Dion([{"params": [W1], "algorithm": "muon"}], lr=0.02, mu=0.95, weight_decay=0.1)
    theirs = torch.optim.Muon([W2], lr=0.02, momentum=0.95, weight_decay=0.1)
    start = W1.detach().clone()
    for t in range(3):
        G = torch.randn(64, 96, generator=torch.Generator().manual_seed(t))
        W1.grad, W2.grad = G.clone(), G.clone()
        ours.step()
        theirs.step()
    moved_ours, moved_theirs = W1.detach() - start, W2.detach() - start
    rel = (moved_ours - moved_theirs).norm() / moved_theirs.norm()
    assert rel < 0.03, rel


def test_newton_schulz_orthogonalizes_like_the_reference() -> None:
    A = torch.randn(40, 100, generator=torch.Generator().manual_seed(0))
    U = newton_schulz(A)
    assert (U.double() - newton_schulz_reference(A.double())).abs().max() < 1e-5
    s = torch.linalg.svdvals(U.double())
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic's band, not exactly 1
    left, _, right = torch.linalg.svd(A.double(), full_matrices=False)
    polar = left @ right
    assert (U.double() * polar).sum() / (U.double().norm() * polar.norm()) > 0.98
    assert torch.allclose(newton_schulz(A.T), newton_schulz(A).T, atol=1e-6)  # orientation


def test_selection_is_the_top_l1_slices() -> None:
    g = torch.Generator().manual_seed(1)
    for shape, fraction in (((30, 50), 0.3), ((50, 30), 0.5), ((20, 20), 1.0)):
        B = torch.randn(shape, generator=g)
        dim, idx = selected_slices(B, fraction, 1)
        assert dim == (0 if shape[0] <= shape[1] else 1)
        norms = B.abs().sum(dim=1 - dim)
        k = idx.numel()
        assert k == min(shape[dim], -(-int(fraction * 100) * min(shape) // 100))
        assert torch.equal(idx, norms.argsort(descending=True)[:k].sort().values)


@pytest.mark.parametrize("algorithm", ["dion2", "nordion2", "muon"])
@pytest.mark.parametrize("fmt", MOMENTUM_FORMATS)
def test_every_format_steps_and_resumes_exactly(algorithm: str, fmt: str) -> None:
    """Step 1 (M = 0) is the fp32 step bit for bit; save after 2, resume, 2 more: the
    uninterrupted run's parameters and state, bit for bit."""
    shape = (64, 96)
    first, _ = _run(algorithm, shape, steps=1, fmt=fmt, rank_fraction=0.25)
    reference, _ = _run(algorithm, shape, steps=1, rank_fraction=0.25)
    assert torch.equal(first, reference)
    straight, run = _run(algorithm, shape, steps=4, fmt=fmt, rank_fraction=0.25)
    part, half = _run(algorithm, shape, steps=2, fmt=fmt, rank_fraction=0.25)
    stream = io.BytesIO()
    torch.save(half["opt"].state_dict(), stream)
    stream.seek(0)
    resumed = nn.Parameter(part.detach().clone())
    opt = dion_lp.Dion(
        [{"params": [resumed], "algorithm": algorithm}],
        lr=0.02, mu=0.9, weight_decay=0.1, momentum_dtype=fmt, rank_fraction=0.25, seed=7,
    )  # fmt: skip
    opt.load_state_dict(torch.load(stream, weights_only=True))
    for G in run["grads"][2:]:
        resumed.grad = G.clone()
        opt.step()
    assert torch.equal(resumed, straight)
    for key, value in run["opt"].state[straight].items():
        other = opt.state[resumed][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


@pytest.mark.parametrize("algorithm", ["dion2", "nordion2", "muon"])
def test_int8_momentum_trains_like_fp32(algorithm: str) -> None:
    """Under 1% of the fp32 run's loss reduction lost after 100 steps (initial 2.086)."""

    def make(fmt: str):
        def build(model: nn.Module) -> dion_lp.Dion:
            hidden = [model[0].weight, model[2].weight]
            rest = [model[0].bias, model[2].bias, model[4].weight, model[4].bias]
            return dion_lp.Dion(
                [
                    {"params": hidden, "algorithm": algorithm},
                    {"params": rest, "algorithm": "adamw", "lr": 3e-3},
                ],
                lr=0.01, rank_fraction=0.5, momentum_dtype=fmt,
            )  # fmt: skip

        return build

    initial = 2.0860607624053955
    reference = train_student(make("fp32"), 100)
    loss = train_student(make("int8"), 100)
    assert reference < 0.8 * initial  # it trains
    assert (loss - reference) / (initial - reference) < 0.01, (loss, reference)


def test_bad_parameters_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"in a dion2 group: shape \(8,\)"):
        dion_lp.Dion([{"params": [nn.Parameter(torch.ones(8))], "algorithm": "dion2"}])
    with pytest.raises(ValueError, match="Invalid algorithm: 'dion3'"):
        dion_lp.Dion([nn.Parameter(torch.ones(8, 8))], algorithm="dion3")


def test_bf16_weights_round_stochastically() -> None:
    """A bf16 matrix: the update goes through write_weights_ (SR); two seeds differ, and
    the mean of the new weights over 64 seeds is the fp32 result within 5 sigma."""
    torch.manual_seed(0)
    X0 = torch.randn(32, 48)
    G = torch.randn(32, 48)
    outs = []
    for seed in range(64):
        W = nn.Parameter(X0.bfloat16())
        opt = dion_lp.Dion(
            [{"params": [W], "algorithm": "dion2"}],
            lr=1e-3, weight_rounding="stochastic", seed=seed, rank_fraction=0.5,
        )  # fmt: skip
        W.grad = G.bfloat16()
        opt.step()
        outs.append(W.detach().double())
    exact = nn.Parameter(X0.bfloat16().float())
    opt = dion_lp.Dion([{"params": [exact], "algorithm": "dion2"}], lr=1e-3, rank_fraction=0.5)
    exact.grad = G.bfloat16().float()
    opt.step()
    stack = torch.stack(outs)
    assert not torch.equal(stack[0], stack[1])
    ulp = (exact.detach().abs().double() * 2.0**-7).clamp(min=1e-30)
    sigma = ulp / 2 / 8  # <= half an ulp per draw, over sqrt(64)
    assert ((stack.mean(0) - exact.detach().double()).abs() <= 5 * sigma + 1e-7).all()


def test_state_dict_without_dion2_exchange_loads_as_mean_gradient():
    """A group saved before the key existed loads with the mode it trained in."""
    W, run = _run("dion2", (32, 48), steps=1, rank_fraction=0.25, dion2_exchange="selected_rows")
    sd = run["opt"].state_dict()
    for group in sd["param_groups"]:
        del group["dion2_exchange"]
    run["opt"].load_state_dict(sd)
    assert all(g["dion2_exchange"] == "mean_gradient" for g in run["opt"].param_groups)
    with pytest.raises(ValueError, match="Invalid dion2_exchange: 'rows'"):
        dion_lp.Dion([W], dion2_exchange="rows")
