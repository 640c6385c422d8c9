"""dion_lp.quant.kernels: the compiled kernels give the eager codes bit for bit, and compile
once per shape family (a new block count does not recompile).

The rest of the suite runs the kernels eagerly (tests/conftest.py); this module turns
compilation on. Every graph here uses blocks of 64 elements, so the Dion step at the
end reuses the graphs the codec tests compiled (compile time is the cost of this file).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import dion_lp
from dion_lp.quant import kernels
from dion_lp.quant.rng import key_tensor, stream_key

C = 64  # block length of every graph in this module


@pytest.fixture(autouse=True)
def compiled():
    before = kernels.compile_enabled()
    kernels.set_compile(True)
    yield
    kernels.set_compile(before)


def _both(fn, *args):
    """(eager result, compiled result) of a kernel call producing fresh outputs."""
    kernels.set_compile(False)
    eager = fn(*args)
    kernels.set_compile(True)
    return eager, fn(*args)


def _values(R: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g) * torch.logspace(-6, 3, R)[:, None]
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])  # zeros and subnormal-scale values
    x[1] = 0.0  # an all-zero block
    return x


@pytest.mark.parametrize(
    ("fmt", "stochastic"),
    [("int8", True), ("int8", False), ("fp8_e4m3", True), ("fp8_e5m2", False)],
)
def test_scaled_encode_compiled_equals_eager(fmt: str, stochastic: bool) -> None:
    x = _values(300)
    key = key_tensor(stream_key(1, 2, 3, "momentum"), base=12345) if stochastic else None
    dtype = dion_lp.quant.code_dtype(fmt)

    def encode(x):
        codes, scales = torch.empty(x.shape, dtype=dtype), torch.empty(x.shape[0])
        absmax = kernels.absmax_blocks(x)
        kernels.encode_scaled_(x, codes, scales, absmax, fmt, stochastic, key)
        return codes.view(torch.uint8), scales

    (c0, s0), (c1, s1) = _both(encode, x)
    assert torch.equal(c0, c1) and torch.equal(s0, s1)


@pytest.mark.parametrize("stochastic", [True])
def test_bf16_encode_compiled_equals_eager(stochastic: bool) -> None:
    x = _values(300, seed=1)
    key = key_tensor(stream_key(1, 2, 3, "exp_avg"))

    def encode(x):
        codes = torch.empty(x.shape, dtype=torch.bfloat16)
        kernels.encode_bf16_(x, codes, stochastic, key)
        return codes.view(torch.int16)

    eager, comp = _both(encode, x)
    assert torch.equal(eager, comp)

    def encode_consuming(x):  # rounds x's bits in place (x is a dead temporary)
        codes = torch.empty(x.shape, dtype=torch.bfloat16)
        kernels.encode_bf16_(x.clone(), codes, stochastic, key, consume=True)
        return codes.view(torch.int16)

    eager_in_place, comp_in_place = _both(encode_consuming, x)
    assert torch.equal(eager_in_place, eager) and torch.equal(comp_in_place, eager)


def test_decode_add_compiled_equals_eager() -> None:
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-127, 128, (300, C), dtype=torch.int8, generator=g)
    scales, add = torch.rand(300, generator=g), torch.randn(300, C, generator=g)
    eager, comp = _both(kernels.decode_blocks, codes, scales, add)
    assert torch.equal(eager, comp)
    half = torch.randn(300, C, generator=g).to(torch.bfloat16)
    eager, comp = _both(kernels.decode_blocks, half, None, add)
    assert torch.equal(eager, comp)


def test_a_new_block_count_does_not_recompile() -> None:
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-127, 128, (300, C), dtype=torch.int8, generator=g)
    kernels.decode_blocks(codes, torch.rand(300), torch.randn(300, C))  # compiled (or cached)
    graphs = counters["stats"]["unique_graphs"]
    for R in (2, 17, 1000, 4097):
        c = torch.randint(-127, 128, (R, C), dtype=torch.int8, generator=g)
        kernels.decode_blocks(c, torch.rand(R), torch.randn(R, C))
    assert counters["stats"]["unique_graphs"] == graphs


def test_dion_steps_compiled_equal_eager() -> None:
    """Three Dion steps with int8 SR momentum and Lion bf16 state: compiled == eager."""

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        W = torch.nn.Parameter(torch.randn(96, C) * 0.02)  # rows of 64: blocks of 64
        E = torch.nn.Parameter(torch.randn(128, C) * 0.02)
        opt = dion_lp.Dion(
            [
                {"params": [W], "momentum_dtype": "int8"},
                {"params": [E], "algorithm": "lion", "momentum_dtype": "bf16", "lr": 1e-3},
            ],
            rank_fraction=0.25,
            block_size=C,
        )
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            W.grad, E.grad = torch.randn(96, C, generator=g), torch.randn(128, C, generator=g)
            opt.step()
        st = opt.state[W]
        return [W.detach(), E.detach(), st["momentum_codes"], st["momentum_scales"]]

    eager, comp = _both(run)
    for a, b in zip(eager, comp, strict=True):
        assert torch.equal(a, b)
