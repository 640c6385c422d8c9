"""Row-block streaming of low-precision states: bounded temporaries, the same step.

A Dion momentum above ``dion.WHOLE_NUMEL`` elements is decoded, used and
re-encoded one row block at a time in each pass; the element-wise rules always
work in row blocks. Here the thresholds are made tiny so that small matrices
stream in many blocks, and every result is compared with the same run decoded
whole (the independent expectation: the maths of the unstreamed step):

- element-wise rules: bit for bit (the rule is element-wise and the rounding bits
  follow each element's global index);
- Dion: the products ``B Q`` / ``B^T P`` are sums over blocks in another order, so
  equal up to fp32 summation order, and a code whose value sits at a rounding
  boundary may round the other way. Measured over the grid below after 3 steps
  of lr 0.02: parameters within 1.2e-7 to 7.2e-7 (3.6e-6 with fp8 SR + residual,
  where a flipped code's difference is carried by the residual), at most 0.26% of
  the codes one rounding step apart, Q within 2^-10 (bf16). Bounds: 1e-5, 0.5%
  and 2^-9.
"""

from __future__ import annotations

import pytest
import torch
from _models import small_mlp

import dion_lp
import dion_lp.algorithms.dion as dion_algo
import dion_lp.quant.buffer as buffer_mod
from dion_lp.quant.buffer import QuantizedBuffer

FORMATS = ["bf16", "int8", "fp8_e4m3", "dynamic8"]
STEPS = 3


def _grads(shape: tuple[int, ...], step: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 + step))


def _stream(monkeypatch: pytest.MonkeyPatch, block: int = 200) -> None:
    """Every momentum streams, in blocks of ``block`` elements (a few rows)."""
    monkeypatch.setattr(buffer_mod, "BLOCK_NUMEL", block)
    monkeypatch.setattr(dion_algo, "WHOLE_NUMEL", 0)


def _run_dion(shape, fmt, sr, residual):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape))
    opt = dion_lp.Dion(
        [p],
        lr=0.02,
        rank_fraction=0.25,
        momentum_dtype=fmt,
        stochastic_rounding=sr,
        momentum_residual=residual,
    )
    for step in range(STEPS):
        p.grad = _grads(shape, step)
        opt.step()
    return p.detach().clone(), opt.state[p]


def _code_bits(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.int16 if codes.element_size() == 2 else torch.uint8).int()


@pytest.mark.parametrize("shape", [(160, 48), (48, 160)], ids=["tall", "wide"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sr,residual", [(True, False), (False, False), (True, True)])
def test_dion_streamed_equals_whole(monkeypatch, shape, fmt, sr, residual):
    want, st_want = _run_dion(shape, fmt, sr, residual)
    reads = []
    original = QuantizedBuffer.read

    def spy(self, add=None, rows=None, out=None):
        reads.append(rows)
        return original(self, add, rows, out)

    _stream(monkeypatch)
    monkeypatch.setattr(QuantizedBuffer, "read", spy)
    got, st_got = _run_dion(shape, fmt, sr, residual)
    assert len({r for r in reads if r is not None}) >= 8  # many row blocks, each decoded
    assert None not in reads or residual  # never decoded whole (residual: its own reads)
    assert (got - want).abs().max().item() <= 1e-5  # lr 0.02: 5e-4 of one step
    q_got, q_want = st_got["Q"].float(), st_want["Q"].float()  # bf16, entries < 0.5
    assert (q_got - q_want).abs().max().item() <= 2.0**-9  # one bf16 ulp at 0.5
    a, b = _code_bits(st_got["momentum_codes"]), _code_bits(st_want["momentum_codes"])
    assert (a - b).abs().max().item() <= 1  # at most one rounding step apart
    assert (a != b).float().mean().item() < 5e-3
    assert st_got["step"] == st_want["step"] == STEPS


def _run_elementwise(algorithm, fmt, dtype=torch.float32):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s).to(dtype)) for s in ((130, 70), (3, 40, 50))]
    opt = dion_lp.Dion(
        [dict(params=params, algorithm=algorithm)], lr=0.01, momentum_dtype=fmt, weight_decay=0.1
    )
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = _grads(p.shape, 10 * step + i).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()["state"]


@pytest.mark.parametrize("algorithm", ["adamw", "lion"])
@pytest.mark.parametrize("fmt", ["fp32", *FORMATS])
def test_elementwise_blocks_are_bit_exact(monkeypatch, algorithm, fmt):
    want, st_want = _run_elementwise(algorithm, fmt)
    _stream(monkeypatch, block=333)  # blocks of 4 rows of 70, 6 rows of 50 (3-D: 2000 / row)
    got, st_got = _run_elementwise(algorithm, fmt)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    for i in st_want:
        for key, value in st_want[i].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(st_got[i][key], value), (i, key)


def test_elementwise_bf16_params_bit_exact(monkeypatch):
    want, _ = _run_elementwise("adamw", "int8", torch.bfloat16)
    _stream(monkeypatch, block=100)
    got, _ = _run_elementwise("adamw", "int8", torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_model_training_streamed_close_to_whole(monkeypatch):
    """A whole model (Dion + AdamW groups, int8 SR) trains the same, streamed or not."""

    def train():
        model = small_mlp()
        opt = dion_lp.Dion(
            dion_lp.param_groups(model, scalar_algorithm="adamw", rank_fraction=0.5),
            momentum_dtype="int8",
        )
        for step in range(STEPS):
            x = torch.randn(16, model[0].in_features, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    want = train()
    _stream(monkeypatch)
    got = train()
    for a, b in zip(got, want, strict=True):  # measured 2.0e-5: a few SR flips, lr 0.01
        assert (a - b).abs().max().item() <= 1e-4
