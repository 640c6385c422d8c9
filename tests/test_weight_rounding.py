"""bf16 parameters updated with stochastic rounding (``weight_rounding="stochastic"``).

Independent expectations: closed forms (a bf16 weight of 1.0 and updates below
half its step: nearest never moves it, SR moves it by N x update in expectation),
a z-score of the rounding error with each element's exact Bernoulli variance
against the fp32 update computed from the same bf16 start, a bit-exact resume,
and the bits of a row block equal to those of the whole tensor.
"""

from __future__ import annotations

import math

import pytest
import torch

import dion_lp
import dion_lp.quant.buffer as buffer_mod

N_ELEMS = 64 * 1024


def _lion(p: torch.Tensor, rounding: str, lr: float) -> dion_lp.Dion:
    return dion_lp.Dion(
        [dict(params=[p], algorithm="lion")], lr=lr, weight_decay=0.0, weight_rounding=rounding
    )


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_small_updates_lost_to_nearest_kept_by_sr(rounding):
    # Lion's update is exactly lr * sign(.): with a positive gradient every step
    # subtracts lr = 1e-4 from a weight of 1.0. bf16's step below 1.0 is 2^-8, so
    # nearest rounds 1.0 - 1e-4 back to 1.0 every time; SR is unbiased, so after N
    # steps E[w] = 1 - N lr (each step's expectation is exact, whatever the grid).
    p = torch.nn.Parameter(torch.ones(N_ELEMS // 256, 256, dtype=torch.bfloat16))
    opt = _lion(p, rounding, lr=1e-4)
    steps = 40
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    w = p.detach().float()
    if rounding == "nearest":
        assert torch.equal(w, torch.ones_like(w))  # every update lost
        return
    want = 1.0 - steps * 1e-4
    z = (w.mean().item() - want) / (w.std().item() / math.sqrt(w.numel()))
    assert abs(z) < 5, f"mean {w.mean().item():.6f}, expected {want:.6f}, z = {z:.2f}"
    assert w.min().item() < 1.0  # it moved


def test_dion_update_unbiased_with_exact_variance():
    # One Dion step on a bf16 matrix: the fp32 result is computed from the same bf16
    # start by an fp32 copy of the optimizer; SR picks the bf16 neighbour above with
    # probability frac, so the error e_i has mean 0 and variance step_i^2 f_i (1 - f_i).
    torch.manual_seed(0)
    X0 = torch.randn(256, 192).to(torch.bfloat16)
    G = torch.randn(256, 192).to(torch.bfloat16).float()  # the same gradient in both runs
    exact = torch.nn.Parameter(X0.float())
    exact.grad = G.clone()
    dion_lp.Dion([exact], lr=1e-3, rank_fraction=0.25).step()
    target = exact.detach()  # fp32 result of the same maths
    p = torch.nn.Parameter(X0.clone())
    p.grad = G.to(torch.bfloat16)
    dion_lp.Dion([p], lr=1e-3, rank_fraction=0.25, weight_rounding="stochastic").step()
    got = p.detach().float()
    lo = target.to(torch.bfloat16).float()  # nearest; the bracket [lo, hi] around target
    lo = torch.where(lo > target, _next_down(lo), lo)
    hi = _next_up(lo)
    assert bool(((got == lo) | (got == hi)).all())  # always a neighbour
    frac = (target - lo) / (hi - lo)
    var = (hi - lo).square() * frac * (1 - frac)
    z = (got - target).sum().item() / math.sqrt(var.sum().item())
    assert abs(z) < 5, z


def _next_up(x: torch.Tensor) -> torch.Tensor:
    b = x.to(torch.bfloat16)
    return torch.nextafter(b, torch.full_like(b, math.inf)).float()


def _next_down(x: torch.Tensor) -> torch.Tensor:
    b = x.to(torch.bfloat16)
    return torch.nextafter(b, torch.full_like(b, -math.inf)).float()


def _model(dtype=torch.bfloat16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.LayerNorm(96), torch.nn.Linear(96, 8)
    ).to(dtype)


def _step(model, opt, step):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
    model(x).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


def _opt(model, **kw):
    groups = dion_lp.param_groups(model, scalar_algorithm="adamw", rank_fraction=0.5)
    return dion_lp.Dion(groups, momentum_dtype="int8", weight_rounding="stochastic", **kw)


def test_resume_is_bit_exact():
    model = _model()
    opt = _opt(model)
    for step in range(4):
        _step(model, opt, step)
    want = [p.detach().clone() for p in model.parameters()]

    model = _model()
    opt = _opt(model)
    for step in range(2):
        _step(model, opt, step)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    model, opt = _model(), None
    model.load_state_dict(saved_model)
    opt = _opt(model)
    opt.load_state_dict(saved_opt)
    for step in range(2, 4):
        _step(model, opt, step)
    for a, b in zip(model.parameters(), want, strict=True):
        assert torch.equal(a.detach(), b)


def test_row_blocks_round_like_the_whole_tensor(monkeypatch):
    def run():
        model = _model()
        opt = _opt(model)
        for step in range(3):
            _step(model, opt, step)
        return [p.detach().clone() for p in model.parameters()]

    want = run()
    monkeypatch.setattr(buffer_mod, "BLOCK_NUMEL", 200)  # the update in blocks of 2-3 rows
    got = run()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_float16_stochastic_is_refused():
    p = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16 with weight_rounding='stochastic'"):
        dion_lp.Dion([p], weight_rounding="stochastic")
    dion_lp.Dion([p], weight_rounding="nearest")  # fine


def test_invalid_weight_rounding_is_named():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="Invalid weight_rounding: 'kahan'"):
        dion_lp.Dion([p], weight_rounding="kahan")


def test_state_dict_without_the_key_loads_as_nearest():
    # A state dict written before weight_rounding existed (this version's format,
    # unreleased key) loads, and reproduces how it was trained: nearest.
    model = _model()
    opt = dion_lp.Dion(dion_lp.param_groups(model), weight_rounding="stochastic")
    _step(model, opt, 0)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["weight_rounding"]
    opt.load_state_dict(sd)
    assert all(g["weight_rounding"] == "nearest" for g in opt.param_groups)
    assert all("weight_rounding" not in g for g in sd["param_groups"])  # not mutated
