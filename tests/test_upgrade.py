"""A checkpoint written by dion_lp 0.1.0 (tests/data) is refused as is and loads once upgraded.

The fixture holds, besides the optimizer state, what 0.1.0 itself decoded from
every buffer and the parameters after a fourth step taken by 0.1.0 from that
state: the independent expectations here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dion_lp
from dion_lp import quant
from dion_lp.quant.buffer import QuantizedBuffer, row_blocks

FIXTURE = Path(__file__).parent / "data" / "dion_lp_0_1_0.pt"
# Buffers that version 2 stores exactly as 0.1.0 did: fp32 / bf16, and 8-bit rows that
# are whole blocks of 256 (W4: rows of 256). The others are re-encoded in row blocks.
EXACT = {("W3", "momentum"), ("W4", "momentum"), ("b", "exp_avg"), ("b", "exp_avg_sq")}
EXACT |= {("N", "exp_avg")}


@pytest.fixture(scope="module")
def saved() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _optimizer(saved: dict) -> tuple[dion_lp.Dion, dict[str, torch.nn.Parameter]]:
    params = {n: torch.nn.Parameter(t.clone()) for n, t in saved["params"].items()}
    groups = [dict(g, params=[params[n] for n in g["params"]]) for g in saved["groups"]]
    return dion_lp.Dion(groups, seed=3), params


def test_version_1_is_refused_with_the_converter_named(saved: dict) -> None:
    opt, _ = _optimizer(saved)
    with pytest.raises(ValueError, match=r"0\.1\.0.*upgrade_state_dict"):
        opt.load_state_dict(saved["optimizer"])
    assert not opt.state  # nothing changed


def test_upgraded_state_holds_what_0_1_0_held(saved: dict) -> None:
    upgraded = dion_lp.upgrade_state_dict(saved["optimizer"])
    assert saved["optimizer"]["dion_lp"]["version"] == 1  # the input is not changed
    opt, params = _optimizer(saved)
    opt.load_state_dict(upgraded)
    for name, p in params.items():
        st, old = opt.state[p], saved["decoded"][name]
        assert st["step"] == 3
        if "Q" in old:
            assert torch.equal(st["Q"].float(), old["Q"])
        for buffer, value in old.items():
            if buffer == "Q":
                continue
            got = QuantizedBuffer(st, buffer).read().reshape(value.shape)
            if (name, buffer) in EXACT:
                assert torch.equal(got, value), (name, buffer)
                continue
            # re-encoded with nearest rounding in row blocks: quantize() of 0.1.0's values
            fmt = st[f"{buffer}_format"]["fmt"]
            block = row_blocks(value[0].numel(), 256)[1]
            oracle = quant.dequantize(quant.quantize(value, fmt, block_size=block))
            assert torch.equal(got, oracle), (name, buffer)


def test_upgraded_run_takes_0_1_0s_next_step(saved: dict) -> None:
    """Exact buffers give 0.1.0's fourth step to fp32 rounding; re-encoded ones stay close."""
    opt, params = _optimizer(saved)
    opt.load_state_dict(dion_lp.upgrade_state_dict(saved["optimizer"]))
    before = {n: p.detach().clone() for n, p in params.items()}
    for name, p in params.items():
        p.grad = saved["grad4"][name].clone()
    opt.step()
    for name, p in params.items():
        want = saved["params_after_4"][name] - before[name]
        got = p.detach() - before[name]
        rel = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
        exact = all((name, b) in EXACT for b in saved["decoded"][name] if b != "Q")
        # exact state: only the fused update's fp32 rounding differs; re-encoded 8-bit
        # momentum moved by at most half a step of its new block
        assert rel < (5e-5 if exact else 2e-2), (name, rel)  # measured 6e-6 / 4e-3-6e-3


def test_upgrade_refuses_other_input(saved: dict) -> None:
    with pytest.raises(ValueError, match="expected a dion_lp 0.1.0 state dict"):
        dion_lp.upgrade_state_dict(dion_lp.upgrade_state_dict(saved["optimizer"]))
