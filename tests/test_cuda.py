"""The same maths on CUDA as on the CPU: codecs, a Dion step, a checkpoint round trip.

Skipped without a GPU (none has been lent to this project, so this module has
never run: the CUDA path stays "untested" in the README until it has). The
expectations are the CPU's results on the same inputs, which the rest of the
suite checks against its oracles:

- round-to-nearest codes are equal to the CPU's (the maths is elementwise IEEE
  fp32; a differing code is allowed only where y sits within 2^-20 of a tie);
- stochastic rounding returns a bracketing neighbour and is unbiased (the CUDA
  generator draws other bits, so codes are compared in distribution);
- Dion fp32 and int8 steps track the CPU's within fp32 rounding (cuBLAS/cuSOLVER
  sum in other orders), and a state_dict saved on CUDA resumes bit for bit there.
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from test_quant import brackets, code_values, full_grid, normalized
from torch import nn

import dion_lp
from dion_lp import quant

# DION_LP_TEST_DEVICE=cpu dry-runs this module on the CPU (it then checks only that
# the tests themselves are sound: the CPU against itself).
CUDA = torch.device(os.environ.get("DION_LP_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    CUDA.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
)
FORMATS_8 = ("int8", "fp8_e4m3", "fp8_e5m2", "dynamic8")


def _input(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * 10 ** (-2 * torch.rand(numel, generator=g))


@pytest.mark.parametrize("fmt", ("bf16", *FORMATS_8))
def test_nearest_codes_equal_the_cpu(fmt: str) -> None:
    x = _input(4096 + 37, seed=0)  # a short tail block
    cpu = quant.quantize(x, fmt, block_size=256)
    gpu = quant.quantize(x.to(CUDA), fmt, block_size=256)
    if cpu.scales is not None:
        torch.testing.assert_close(gpu.scales.cpu(), cpu.scales, rtol=0, atol=0)
    back_cpu, back_gpu = quant.dequantize(cpu), quant.dequantize(gpu).cpu()
    differ = back_cpu != back_gpu
    assert differ.float().mean() < 1e-3, f"{int(differ.sum())} codes differ"


@pytest.mark.parametrize("fmt", ("bf16", *FORMATS_8))
def test_stochastic_is_bracketing_and_unbiased_on_cuda(fmt: str) -> None:
    """test_quant's oracle (the full grid of the format) applied to codes drawn on CUDA."""
    width, draws = 64, 4000
    x = _input(width, seed=1).clamp(-0.5, 0.5)
    x[0] = 0.9  # the block's absmax (the signed codebook has no -1)
    g = torch.Generator(device=CUDA).manual_seed(0)
    q = quant.quantize(
        x.to(CUDA).repeat(draws), fmt, block_size=width, stochastic=True, generator=g
    )
    scales = None if q.scales is None else q.scales.cpu()
    q = quant.QuantizedTensor(q.codes.cpu(), scales, fmt, q.shape, q.dtype, q.block_size)
    q1 = quant.quantize(x, fmt, block_size=width)  # the CPU's scales: equal (test above)
    y = normalized(x, q1)
    lo, hi = brackets(full_grid(fmt), y)
    got = (q.codes.double() if fmt == "bf16" else code_values(q)).view(draws, width)
    assert ((got == lo) | (got == hi)).all()
    scale = 1.0 if fmt == "bf16" else q1.scales.double()
    gap = hi - lo
    p = torch.where(gap > 0, (y - lo) / gap.clamp(min=1e-300), 0.0)
    sigma = gap * scale * (p * (1 - p)).sqrt()
    mean = quant.dequantize(q).double().view(draws, width).mean(0)
    tol = 5 * sigma / math.sqrt(draws) + 2.0**-20 * x.double().abs()
    assert ((mean - x.double()).abs() <= tol).all()


def _model(device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(device)


def _optimizer(model: nn.Module, momentum_dtype: str, stochastic: bool, seed: int) -> dion_lp.Dion:
    groups = dion_lp.param_groups(model, rank_fraction=0.25)
    return dion_lp.Dion(
        groups, lr=0.02, momentum_dtype=momentum_dtype, stochastic_rounding=stochastic, seed=seed
    )


def _steps(model: nn.Module, opt: dion_lp.Dion, steps: range) -> None:
    """Train on batches ``steps`` (batch k is the same on every device and in every run)."""
    device = next(model.parameters()).device
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 32, generator=g)
        nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
        opt.step()
        opt.zero_grad()


def _train(device: torch.device, momentum_dtype: str, steps: int, stochastic: bool = True):
    model = _model(device)
    opt = _optimizer(model, momentum_dtype, stochastic, seed=1)
    _steps(model, opt, range(steps))
    return model, opt


@pytest.mark.parametrize("momentum_dtype,atol", [("fp32", 1e-4), ("int8", 1e-3)])
def test_dion_on_cuda_tracks_the_cpu(momentum_dtype: str, atol: float) -> None:
    # nearest rounding: both devices round the same values the same way (the CUDA
    # generator's stochastic draws are checked in distribution above)
    cpu, _ = _train(torch.device("cpu"), momentum_dtype, 5, stochastic=False)
    gpu, opt = _train(CUDA, momentum_dtype, 5, stochastic=False)
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        assert b.device.type == CUDA.type
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=0, atol=atol)
    assert all(t.device.type == CUDA.type for st in opt.state.values() for t in _tensors(st))


def _tensors(state: dict):
    for value in state.values():
        if isinstance(value, torch.Tensor):
            yield value


@pytest.mark.parametrize("momentum_dtype", ["fp32", "int8", "fp8_e4m3"])
def test_cuda_checkpoint_resumes_bit_for_bit(momentum_dtype: str) -> None:
    straight, _ = _train(CUDA, momentum_dtype, 6)
    model, opt = _train(CUDA, momentum_dtype, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = _model(CUDA, seed=123)  # another init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2 = _optimizer(model2, momentum_dtype, stochastic=True, seed=999)
    opt2.load_state_dict(saved["opt"])
    _steps(model2, opt2, range(3, 6))  # the straight run's batches 3..5
    for a, b in zip(straight.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ("bf16", "int8", "fp8_e4m3", "fp8_e5m2"))
@pytest.mark.parametrize("compiled", [False, True])
def test_stochastic_codes_equal_the_cpu_with_the_same_key(fmt: str, compiled: bool) -> None:
    """Counter-based bits are a function of (key, index) only: with one key the CUDA path
    (eager, or compiled to Triton) rounds exactly as the CPU's eager path, except where
    y = x / scale itself differs (division on the device; counted, at most 1e-3)."""
    from dion_lp.quant import kernels
    from dion_lp.quant.rng import key_tensor

    x = _input(64 * 257, seed=7)
    key = 0x1234_5678_9ABC_DEF0
    before = kernels.compile_enabled()
    try:
        kernels.set_compile(False)
        cpu = _encode_with_key(x, fmt, key_tensor(key))
        kernels.set_compile(compiled)
        dev = _encode_with_key(x.to(CUDA), fmt, key_tensor(key, device=CUDA))
    finally:
        kernels.set_compile(before)
    differ = (cpu[0] != dev[0].cpu()).float().mean().item()
    assert differ <= (0.0 if fmt == "bf16" else 1e-3), differ
    if cpu[1] is not None:
        assert torch.equal(cpu[1], dev[1].cpu())


def _encode_with_key(x: torch.Tensor, fmt: str, key: torch.Tensor):
    codes = torch.empty(x.numel(), dtype=quant.code_dtype(fmt), device=x.device)
    scales = None
    if fmt != "bf16":
        scales = torch.empty(quant.scale_count(x.numel(), 64, fmt), device=x.device)
    quant.encode_(x, codes, scales, fmt, 64, True, key=key)
    return codes.view(torch.uint8) if fmt != "bf16" else codes.view(torch.int16), scales
