"""Small models several test modules share."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, D = 64, 16


class EmbedNet(nn.Module):
    """An embedding and an untied head (element-wise groups; matrices a DDP hook may send
    low-rank), one Dion matrix, and vectors. Input: token ids; output: (.., VOCAB) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.hidden = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.emb(x))))


# every momentum format the optimizer stores (the registry's state formats)
MOMENTUM_FORMATS = ["fp32", "bf16", "int8", "fp8_e4m3", "dynamic8", "int4", "fp4_e2m1"]


def small_mlp(seed: int = 0, hidden: int = 128) -> nn.Sequential:
    """Two Dion matrices (96 -> hidden -> 80), a LayerNorm and a thin head, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(96, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 80), nn.Linear(80, 3)
    )


def teacher():
    """A fixed random 32-64-8 teacher: x -> its class (argmax of tanh(x W1) W2)."""
    gen = torch.Generator().manual_seed(1)
    W1 = torch.randn(32, 64, generator=gen) / 32**0.5
    W2 = torch.randn(64, 8, generator=gen) / 8
    return lambda x: (torch.tanh(x @ W1) @ W2 * 3).argmax(1)


def train_student(make_optimizer, steps: int = 300) -> float:
    """Held-out cross-entropy of a 32-128-128-8 student of :func:`teacher` after ``steps``
    steps of ``make_optimizer(model)`` (batches of 128; seeded: the same run every time)."""
    target = teacher()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8)
    )
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(128, 32, generator=gen)
        loss = nn.functional.cross_entropy(model(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_val = torch.randn(1024, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x_val), target(x_val)).item()
