"""fp4_e2m1: the non-uniform 4-bit momentum format, and the fp8 Q beside 4-bit momenta.

Oracles: the 15 values of the OCP e2m1 grid enumerated in float64 (nearest must
reach the minimum distance and break ties to the even index, stochastic must
return one of the two bracketing values and average to the input), bytes written
out by hand, int4's layout (the same bytes per row, block and shard), eager
kernels for the compiled ones, a float64 recomputation of Q, and fp32 Dion for
training.
"""

from __future__ import annotations

import math

import pytest
import torch
from _models import train_student
from torch import nn

import dion_lp
from dion_lp import quant
from dion_lp.quant import kernels
from dion_lp.quant.buffer import QuantizedBuffer, buffer_nbytes
from dion_lp.quant.formats import MOMENTUM_FORMATS, format_info, unsigned_variant
from dion_lp.quant.rng import key_tensor, stream_key
from dion_lp.quant.rounding import pack_int4, unpack_fp4

MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
GRID = torch.cat([-MAGNITUDES.flip(0)[:-1], MAGNITUDES])  # 15 values, ascending


def values(q: quant.QuantizedTensor) -> torch.Tensor:
    """The grid value (in [-6, 6]) of every element of an fp4 QuantizedTensor, float64."""
    return unpack_fp4(q.codes.view(1, -1)).view(-1)[: math.prod(q.shape)].double()


def normalized(x: torch.Tensor, q: quant.QuantizedTensor) -> torch.Tensor:
    s = q.scales.repeat_interleave(q.block_size)[: x.numel()]
    return (x.reshape(-1) / torch.where(s > 0, s, 1.0)).clamp(-6, 6).double()


def make_input(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * 10 ** (-2 * torch.rand(numel, generator=g))
    x[torch.rand(numel, generator=g) < 0.05] = 0.0
    return x


def test_registry_and_the_bit_patterns() -> None:
    info = format_info("fp4_e2m1")
    assert "fp4_e2m1" in MOMENTUM_FORMATS and info.pack == 2 and not info.wire
    assert unsigned_variant("fp4_e2m1") == "udynamic8"
    assert buffer_nbytes((768, 3072), "fp4_e2m1", 256) == buffer_nbytes((768, 3072), "int4", 256)
    # every nibble: sign bit 3, e2m1 index in bits 0-2 (nibble 8 is -0)
    decoded = unpack_fp4(pack_int4(torch.arange(16).view(1, 16))).view(-1).double()
    assert torch.equal(decoded, torch.cat([MAGNITUDES, -MAGNITUDES]))
    x = torch.tensor([6.0, -0.5, 1.5, -6.0, 0.0, 3.0, -4.0])  # absmax 6: scale 1
    q = quant.quantize(x, "fp4_e2m1", block_size=8)
    assert q.scales.tolist() == [1.0]
    assert q.codes.tolist() == [0x97, 0xF3, 0x50, 0x0E]  # -0.5 = 0x9, -6 = 0xF, -4 = 0xE
    assert torch.equal(quant.dequantize(q), x)


@pytest.mark.parametrize("block_size", [256, 100, 33])
def test_nearest_matches_brute_force_oracle(block_size: int) -> None:
    x = make_input(1001, seed=1)
    q = quant.quantize(x, "fp4_e2m1", block_size=block_size)
    padded = torch.cat([x, x.new_zeros(-x.numel() % block_size)])
    assert torch.equal(q.scales, padded.view(-1, block_size).abs().amax(1) / 6)
    y = normalized(x, q)
    best = (y[:, None] - GRID[None, :]).abs().amin(1)
    assert ((values(q) - y).abs() <= best).all()
    assert (values(q)[x == 0] == 0).all() and (q.codes.view(1, -1) != 0x88).all()  # no -0


def test_nearest_ties_go_to_the_even_index() -> None:
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25])
    q = quant.quantize(ties, "fp4_e2m1", block_size=10)
    assert values(q).tolist() == [6, 0, 1, 1, 2, 2, 4, 4, -4, 0]


@pytest.mark.parametrize("block_size", [16, 7])  # whole bytes per block, and straddling
def test_representable_values_never_move(block_size: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = GRID.float()[torch.randint(0, 15, (483,), generator=g)]
    x[::block_size] = 6.0  # every block holds its max: scale 2^-5 exactly
    x = x * 2.0**-5
    for stochastic in (False, True):
        q = quant.quantize(x, "fp4_e2m1", block_size=block_size, stochastic=stochastic)
        assert torch.equal(quant.dequantize(q), x)


def test_stochastic_picks_a_neighbour_and_is_unbiased() -> None:
    """Mean of N draws within 5 sigma / sqrt(N) of x, sigma = sqrt((y - lo)(hi - y)) scale."""
    draws, width = 3000, 64
    x = make_input(width, seed=4)
    x[0] = 0.9
    g = torch.Generator().manual_seed(1)
    q = quant.quantize(x.repeat(draws), "fp4_e2m1", block_size=width, stochastic=True, generator=g)
    got = values(q).view(draws, width)
    y = normalized(x, quant.quantize(x, "fp4_e2m1", block_size=width))
    hi_index = torch.searchsorted(GRID, y, right=False).clamp(1, 14)
    lo, hi = GRID[hi_index - 1], GRID[hi_index]
    assert ((got == lo) | (got == hi)).all()
    assert (got != got[0]).any()
    scale = q.scales[0].double()
    mean = quant.dequantize(q).double().view(draws, width).mean(0)
    sigma = scale * ((y - lo) * (hi - y)).clamp(min=0).sqrt()
    err = ((mean - x.double()).abs() - 2.0**-20 * x.double().abs()).clamp(min=0)
    assert (err[sigma == 0] == 0).all()
    z = err[sigma > 0] / (sigma[sigma > 0] / math.sqrt(draws))
    assert z.max() < 5, z.max()


@pytest.mark.parametrize("stochastic", [False, True])
def test_row_shards_write_the_bytes_of_the_whole_buffer(stochastic: bool) -> None:
    x = torch.randn(40, 301, generator=torch.Generator().manual_seed(0))

    def buffer(state: dict, local_rows: int) -> QuantizedBuffer:
        return QuantizedBuffer.create(
            state, "m", rows=40, row_numel=301, local_rows=local_rows, fmt="fp4_e2m1",
            block_size=128, device="cpu",
        )  # fmt: skip

    whole: dict = {}
    buffer(whole, 40).write(x, stochastic=stochastic, key=7)
    for start, stop in ((0, 13), (13, 40)):
        part: dict = {}
        buffer(part, stop - start).write(x[start:stop], stochastic=stochastic, key=7, row0=start)
        assert torch.equal(part["m_codes"], whole["m_codes"][start:stop])
    flat = torch.empty(40 * 306 // 2, dtype=torch.uint8), torch.empty(120)
    padded = torch.nn.functional.pad(x, (0, 5))  # rows of 3 blocks of 102 (even)
    quant.encode_(padded, *flat, "fp4_e2m1", 102, stochastic, key=key_tensor(7))
    assert torch.equal(whole["m_codes"].view(-1), flat[0])


def test_compiled_kernels_equal_eager() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g) * torch.logspace(-6, 3, 300)[:, None]
    x[1] = 0.0
    key = key_tensor(stream_key(1, 2, 3, "momentum"), base=12345)
    before = kernels.compile_enabled()

    def run(stochastic: bool) -> tuple[torch.Tensor, ...]:
        codes, scales = torch.empty(300, 32, dtype=torch.uint8), torch.empty(300)
        absmax = x.abs().amax(dim=1)
        kernels.encode_4bit_(x, codes, scales, absmax, "fp4_e2m1", stochastic, key)
        add = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
        return codes, scales, kernels.decode_4bit_blocks(codes, scales, "fp4_e2m1", add)

    try:
        for stochastic in (True, False):
            kernels.set_compile(False)
            eager = run(stochastic)
            kernels.set_compile(True)
            for a, b in zip(eager, run(stochastic), strict=True):
                assert torch.equal(a, b)
    finally:
        kernels.set_compile(before)


# ------------------------------------------------------------- Q beside a 4-bit momentum
@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1"])
def test_q_is_stored_in_fp8_times_sqrt_s(fmt: str) -> None:
    """After one step from M = 0: Q = ColumnNormalize(G^T Orth(G Q0)), recomputed in
    float64 from the stored Q0, equals the stored fp8 Q / sqrt(S) within half an fp8
    step (2^-4 relative on normals, 2^-10 / sqrt(S) absolute on subnormals; 1e-6 of
    slack for the fp32 products), and the RMS error is ~1-2%."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(96, 64))
    opt = dion_lp.Dion([W], lr=0.01, rank_fraction=0.25, momentum_dtype=fmt)
    opt.step()  # no gradient: no state yet
    W.grad = torch.randn(96, 64)
    G = W.grad.double()
    opt.step()
    st = opt.state[W]
    assert st["Q"].dtype == torch.float8_e4m3fn and st["Q"].shape == (64, 16)
    stored = st["Q"].double() / 8.0  # S = 64
    # the initial Q is the library's fp32 one, rounded into fp8 times sqrt(S)
    Q0 = dion_algo_initial(64, 16, opt)
    P = torch.linalg.qr(G @ Q0)[0]
    R = G.T @ P
    want = R / R.norm(dim=0)
    half_step = torch.maximum(want.abs() * 2.0**-4, torch.full_like(want, 2.0**-10 / 8.0))
    assert ((stored - want).abs() <= half_step + 1e-6).all()
    rms = ((stored - want).norm() / want.norm()).item()
    assert 0.003 < rms < 0.03, rms


def dion_algo_initial(S: int, r: int, opt: dion_lp.Dion) -> torch.Tensor:
    from dion_lp.algorithms.dion import initial_right_factor

    Q0 = initial_right_factor(S, r, seed=opt.seed, index=0) * math.sqrt(S)
    return Q0.clamp(-448, 448).to(torch.float8_e4m3fn).double() / math.sqrt(S)


def test_negligible_columns_keep_their_fp8_warm_start() -> None:
    """A rank-1 gradient at r = 4: three columns of R are noise and keep Q's old bytes."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(48, 32))
    opt = dion_lp.Dion([W], lr=0.01, rank_fraction=4 / 32, momentum_dtype="fp4_e2m1")
    W.grad = torch.randn(48, 1) @ torch.randn(1, 32)
    opt.step()
    before = opt.state[W]["Q"].view(torch.uint8).clone()
    W.grad = torch.zeros(48, 32)  # B = M: still rank 1
    opt.step()
    after = opt.state[W]["Q"].view(torch.uint8)
    changed = (after != before).any(dim=0)
    assert changed.sum().item() <= 1  # only the one live direction may move


@pytest.mark.parametrize("rank_fraction", [1.0, 0.25])
def test_fp4_momentum_trains_like_fp32(rank_fraction: float) -> None:
    """Under 1% of fp32 Dion's loss reduction lost after 100 steps (as int4's test)."""

    def make(fmt: str):
        def build(model: nn.Module) -> dion_lp.Dion:
            hidden = [model[0].weight, model[2].weight]
            rest = [model[0].bias, model[2].bias, model[4].weight, model[4].bias]
            return dion_lp.Dion(
                [{"params": hidden}, {"params": rest, "algorithm": "adamw", "lr": 3e-3}],
                lr=0.01, rank_fraction=rank_fraction, momentum_dtype=fmt,
            )  # fmt: skip

        return build

    initial = 2.0860607624053955
    reference = train_student(make("fp32"), 100)
    loss = train_student(make("fp4_e2m1"), 100)
    assert (loss - reference) / (initial - reference) < 0.01, (loss, reference)
