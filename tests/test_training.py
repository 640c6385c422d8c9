"""Dion trains a small model about as well as torch's AdamW on the same task.

Task: a teacher-student classification stream. A fixed random teacher
(32 -> 64 tanh -> 8 classes) labels fresh Gaussian inputs every step (no
overfitting, no data download); the student is a 32-128-128-8 GELU MLP; 300
steps of batch 128; the figure is cross-entropy on 1,024 held-out samples.
Measured here (torch 2.13 CPU): start 2.08; AdamW lr 1e-3 0.474; torch Muon
lr 3e-3 (+AdamW) 0.470 (kept out of the suite: bf16 Newton-Schulz makes it 15x
slower on this CPU); Dion lr 0.01 full rank 0.515, rank 1/4 0.497.

Low-precision momentum (SR), share of fp32 Dion's loss reduction lost, measured
here: bf16 0.05%, int8 0.29%, fp8_e4m3 0.62%, dynamic8 0.05% (round-to-nearest:
-0.05%, -0.08%, 0.07%, -0.03%).
"""

from __future__ import annotations

import pytest
import torch
from _models import train_student

import dion_lp

STEPS = 300


def _dion(rank_fraction, **kw):
    def make(model):
        hidden = [model[0].weight, model[2].weight]
        rest = [model[0].bias, model[2].bias, model[4].weight, model[4].bias]
        return dion_lp.Dion(
            [
                {"params": hidden, "rank_fraction": rank_fraction},
                {"params": rest, "algorithm": "adamw", "lr": 3e-3},
            ],
            lr=0.01,
            **kw,
        )

    return make


@pytest.fixture(scope="module")
def adamw_loss():
    return train_student(lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3))


@pytest.mark.parametrize("rank_fraction", [1.0, 0.25])
def test_dion_trains_like_adamw(adamw_loss, rank_fraction):
    initial = train_student(lambda model: torch.optim.SGD(model.parameters(), lr=0.0), steps=0)
    loss = train_student(_dion(rank_fraction))
    assert loss < 0.3 * initial
    assert loss < 1.15 * adamw_loss, (loss, adamw_loss)


@pytest.fixture(scope="module")
def dion_fp32_loss():
    return train_student(_dion(1.0))


@pytest.mark.parametrize("momentum_dtype", ["bf16", "int8", "fp8_e4m3", "dynamic8"])
def test_8bit_momentum_loses_under_one_percent(dion_fp32_loss, momentum_dtype):
    """The issue's target: < 1% of fp32 momentum's loss reduction lost, at equal steps."""
    initial = train_student(lambda model: torch.optim.SGD(model.parameters(), lr=0.0), steps=0)
    reference = dion_fp32_loss
    loss = train_student(_dion(1.0, momentum_dtype=momentum_dtype))
    lost = (loss - reference) / (initial - reference)
    assert lost < 0.01, (momentum_dtype, loss, reference)
