"""Small models the hook tests share."""

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
