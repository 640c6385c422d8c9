"""state_dict round trips: weights_only loading and bit-exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import dion_lp

FORMATS = ["fp32", "bf16", "int8", "fp8_e4m3", "dynamic8"]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(96, 128), nn.LayerNorm(128), nn.Linear(128, 80), nn.Linear(80, 3)
    )


def _opt(model, momentum_dtype, residual=False, seed=5):
    groups = [
        {"params": [model[0].weight, model[2].weight], "algorithm": "dion"},
        {"params": [model[0].bias, model[1].weight, model[1].bias], "algorithm": "adamw"},
        {
            "params": [model[2].bias, model[3].weight, model[3].bias],
            "algorithm": "lion",
            "lr": 1e-3,
        },
    ]
    return dion_lp.Dion(
        groups,
        lr=0.02,
        rank_fraction=0.5,
        momentum_dtype=momentum_dtype,
        momentum_residual=residual,
        seed=seed,
    )


def _train(model, opt, steps, start):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(16, 96, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("momentum_dtype", FORMATS)
def test_resume_is_bit_exact(momentum_dtype):
    residual = momentum_dtype != "fp32"
    straight = _model()
    opt = _opt(straight, momentum_dtype, residual)
    _train(straight, opt, 10, 0)

    first = _model()
    opt1 = _opt(first, momentum_dtype, residual)
    _train(first, opt1, 5, 0)
    model_sd, opt_sd = _roundtrip(first.state_dict()), _roundtrip(opt1.state_dict())

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_sd)
    opt2 = _opt(resumed, momentum_dtype, residual, seed=999)
    opt2.load_state_dict(opt_sd)
    _train(resumed, opt2, 5, 5)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for p_a, p_b in zip(straight.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[p_a].items():
            other = opt2.state[p_b][key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype, key
                assert torch.equal(value, other), key
            else:
                assert value == other, key


def test_loading_another_optimizers_state_is_refused():
    model = _model()
    adam = torch.optim.AdamW(model.parameters())
    opt = _opt(model, "fp32")
    with pytest.raises(ValueError, match="not saved by dion_lp.Dion"):
        opt.load_state_dict(adam.state_dict())


def test_loading_a_different_momentum_format_is_refused():
    model = _model()
    opt = _opt(model, "int8")
    _train(model, opt, 1, 0)
    sd = opt.state_dict()
    other = _opt(model, "fp8_e4m3")
    with pytest.raises(ValueError, match="int8"):
        other.load_state_dict(sd)


def test_loading_a_future_version_is_refused():
    model = _model()
    opt = _opt(model, "fp32")
    sd = opt.state_dict()
    sd["dion_lp"]["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        opt.load_state_dict(sd)
