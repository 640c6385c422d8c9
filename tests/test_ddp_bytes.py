"""benchmarks/ddp_bytes.py: the GPT-2-small accounting against hand counts, and a measured run."""

from __future__ import annotations

import math

import pytest

from benchmarks import ddp_bytes
from dion_lp.dist.accounting import collective_bytes, mean_bytes

N = 8
V, D, T, L = 50257, 768, 1024, 12


def test_gpt2_small_counts():
    params = ddp_bytes.gpt2_params()
    assert sum(p.numel for p in params) == 124_439_808
    dion = [p for p in params if p.dion]
    assert len(dion) == 4 * L and sum(p.numel for p in dion) == L * 12 * D * D


def test_default_ddp_is_an_fp32_all_reduce_of_everything():
    params = ddp_bytes.gpt2_params()
    got = ddp_bytes.account("ddp_fp32", params, N, 1 / 16)
    # per-bucket rounding only: each bucket's 4-byte elements split into N chunks
    assert abs(got - collective_bytes("all_reduce", 4 * 124_439_808, N)) < 64


@pytest.mark.parametrize("rank", [8, 32])
def test_lowrank_hook_bytes_by_hand(rank):
    """Hook: wte (V x D) and wpe (T x D) as rank-r factors, the vectors whole; Dion: P, R."""
    params = ddp_bytes.gpt2_params()
    vectors = sum(p.numel for p in params if len(p.shape) == 1)
    hook = (
        mean_bytes(vectors, "fp8_e4m3", N)
        + mean_bytes((V + T) * rank, "fp8_e4m3", N)
        + mean_bytes(2 * D * rank, "fp8_e4m3", N)
    )
    r = D // 16  # every Dion matrix has min side 768 at rank_fraction 1/16
    tall = L * (3 * D * r + D * r + 4 * D * r + 4 * D * r)  # qkv, proj, fc, fc-proj
    thin = L * 4 * D * r
    factors = mean_bytes(tall, "fp8_e4m3", N) + mean_bytes(thin, "fp8_e4m3", N)
    flags = collective_bytes("all_reduce", 2 * len(params), N)  # Dion's: 2 per tensor
    # the hook's: 1 per gradient it averages: wte, wpe, ln_f (2), per block 2 norms x
    # (weight, bias) and the biases of qkv, attention proj, fc, mlp proj
    hook_flags = collective_bytes("all_reduce", 2 + 2 + L * (4 + 4), N)
    got = ddp_bytes.account(f"dion_fp8_lr{rank}", params, N, 1 / 16)
    assert got == hook + hook_flags + factors + flags
    default = ddp_bytes.account("ddp_fp32", params, N, 1 / 16)
    assert default / got >= 30  # the target, as an exact byte count
    assert default / ddp_bytes.account("dion_fp8", params, N, 1 / 16) < 12  # without lowrank


@pytest.mark.timeout(240)
def test_measured_bytes_equal_the_accounting():
    measured = ddp_bytes.measure(["ddp_fp32", "dion_fp8_lr32"], steps=3, rank_fraction=1 / 16)
    for method, m in measured.items():
        assert m["measured"] == m["accounted"] > 0, method
        assert math.isfinite(m["loss"]), method
    assert measured["dion_fp8_lr32"]["measured"] < measured["ddp_fp32"]["measured"] / 10
