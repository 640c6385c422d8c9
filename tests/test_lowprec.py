"""Low-precision optimizer state: exact byte counts, tracking of fp32, why SR matters.

The codecs themselves are tested in test_quant.py and the buffers in
test_state.py; here the whole optimizer is checked against closed forms and
against its own fp32 run.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dion_lp
from dion_lp.quant.buffer import QuantizedBuffer

FORMATS = ("bf16", "int8", "fp8_e4m3", "dynamic8")


@pytest.mark.parametrize("fmt", ("fp32", *FORMATS))
def test_state_bytes_closed_form(fmt):
    """codes + one fp32 scale per 256-block + Q (fp32, or bf16 beside a compact momentum)."""
    m, n, rank_fraction = 256, 768, 1 / 16
    X = nn.Parameter(torch.randn(m, n))
    opt = dion_lp.Dion([X], rank_fraction=rank_fraction, momentum_dtype=fmt)
    X.grad = torch.randn(m, n)
    opt.step()
    r = math.ceil(rank_fraction * min(m, n))
    code_bytes = {"fp32": 4, "bf16": 2}.get(fmt, 1)
    scale_bytes = 4 * math.ceil(m * n / 256) if fmt not in ("fp32", "bf16") else 0
    q_bytes = min(m, n) * r * (4 if fmt == "fp32" else 2)
    assert opt.state_bytes() == m * n * code_bytes + scale_bytes + q_bytes
    if fmt in ("int8", "fp8_e4m3"):
        # issue target: <= 1.15 bytes of state per parameter at rank 1/16
        assert opt.state_bytes() / (m * n) <= 1.15


def test_whole_model_with_lion_int8_is_about_one_byte_per_param():
    """Embedding and head in Lion int8, hidden matrices in Dion int8 at rank 1/16."""
    torch.manual_seed(0)
    vocab, d = 4096, 256
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(vocab, d),
            "fc1": nn.Linear(d, 4 * d),
            "fc2": nn.Linear(4 * d, d),
            "norm": nn.LayerNorm(d),
            "lm_head": nn.Linear(d, vocab, bias=False),
        }
    )
    groups = dion_lp.param_groups(model, "lion", rank_fraction=1 / 16)
    opt = dion_lp.Dion(groups, momentum_dtype="int8")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    # closed form: 1 code byte + 4/256 scale bytes per quantized element; vectors
    # below MIN_QUANT_NUMEL stay fp32; Q is bf16 (min(m, n) x r)
    vectors = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    quantized = n_params - vectors
    q_bytes = 2 * 2 * d * math.ceil(d / 16)
    expected = quantized + 4 * math.ceil(4 * d * d / 256) * 2 + 4 * 2 * (vocab * d // 256)
    expected += 4 * vectors + q_bytes
    assert opt.state_bytes() == expected
    assert opt.state_bytes() / n_params <= 1.2


def _run(fmt, steps=30, *, stochastic=True, seed=0):
    gen = torch.Generator().manual_seed(1)
    X0 = torch.randn(96, 160, generator=gen)
    grads = [torch.randn(96, 160, generator=gen) for _ in range(steps)]
    X = nn.Parameter(X0.clone())
    opt = dion_lp.Dion(
        [X],
        lr=0.02,
        rank_fraction=0.25,
        momentum_dtype=fmt,
        stochastic_rounding=stochastic,
        seed=seed,
    )
    for G in grads:
        X.grad = G
        opt.step()
    return X0, X.detach()


# Relative distance of the final parameter from the fp32 run after 30 steps of
# unstructured gradients, as a share of how far the fp32 run moved. Measured
# here: 1.1% (bf16), 8.4% (int8), 14% (fp8_e4m3), 8.5% (dynamic8), all with SR.
# Orthonormalization maps every direction of P to unit singular value, so the
# weak directions of a noise gradient amplify rounding: the parameter-level
# gap is a loose figure; the training-level one (test_training.py) is < 1%.
TRACKING_TOLERANCE = {"bf16": 0.03, "int8": 0.15, "fp8_e4m3": 0.25, "dynamic8": 0.15}


@pytest.mark.parametrize("fmt", FORMATS)
def test_low_precision_momentum_tracks_fp32(fmt):
    X0, ref = _run("fp32")
    _, out = _run(fmt)
    moved = torch.linalg.norm(ref - X0)
    rel = (torch.linalg.norm(out - ref) / moved).item()
    assert rel < TRACKING_TOLERANCE[fmt], rel
    # and it is not trivially equal: the format did change the numerics
    assert rel > 1e-6


def test_stochastic_rounding_keeps_small_momentum_that_nearest_loses():
    """Lion's momentum m <- b2 m + (1 - b2) g of a constant g: m_k = (1 - b2^k) g.

    One large element per 256-block sets the absmax scale; the small elements'
    increments (1 - b2) g are far below half an int8 step, so round-to-nearest
    drops every one of them and their momentum stays 0 forever, while
    stochastic rounding keeps it unbiased: the mean over the 255 x 32 small
    elements matches the closed form within 5 standard errors.
    """
    n_blocks, big, small, beta2, steps = 32, 1.0, 1e-3, 0.99, 40
    g = torch.full((n_blocks, 256), small)
    g[:, 0] = big
    expected = (1 - beta2**steps) * small
    means = {}
    for stochastic in (False, True):
        X = nn.Parameter(torch.zeros(n_blocks, 256))  # 1-D tensors keep fp32 state
        opt = dion_lp.Dion(
            [{"params": [X], "algorithm": "lion"}],
            lr=0.0,
            weight_decay=0.0,
            betas=(0.9, beta2),
            momentum_dtype="int8",
            stochastic_rounding=stochastic,
        )
        for _ in range(steps):
            X.grad = g.clone()
            opt.step()
        st = opt.state[X]
        assert st["exp_avg_codes"].dtype == torch.int8
        m = QuantizedBuffer(st, "exp_avg").read()
        means[stochastic] = m.view(n_blocks, 256)[:, 1:]
    assert means[False].abs().max().item() == 0.0
    sr = means[True]
    # the int8 step is absmax / 127, absmax = (1 - b2^k) * big
    step = (1 - beta2**steps) * big / 127
    stderr = step / math.sqrt(sr.numel())  # SR error per element is at most one step
    assert abs(sr.mean().item() - expected) < 5 * stderr
