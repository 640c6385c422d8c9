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
MOMENTUM_FORMATS = ["fp32", "bf16", "int8", "fp8_e4m3", "dynamic8", "int4"]


def small_mlp(seed: int = 0, hidden: int = 128) -> nn.Sequential:
    """Two Dion matrices (96 -> hidden -> 80), a LayerNorm and a thin head, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(96, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 80), nn.Linear(80, 3)
    )
