"""Orthonormalization and column normalization, always in fp32.

These are the only places Dion divides by data-dependent numbers, so they are
written to be safe on the inputs users hit: all-zero gradients, rank-deficient
factors, and factors that arrive in low precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["orthonormalize", "column_normalize"]


def orthonormalize(P: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``P`` by reduced QR, computed in fp32.

    Args:
        P: shape (m, r) with m >= r, any floating dtype.

    Returns:
        Shape (m, r), float32, with ``P^T P = I``. A zero (or rank-deficient) ``P``
        still yields orthonormal columns (LAPACK's Householder QR never divides
        by a zero norm), so no NaN reaches the optimizer state.
    """
    Q, _ = torch.linalg.qr(P.float(), mode="reduced")
    return Q


def column_normalize(R: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-norm columns of ``R``; zero columns stay zero, the warm start keeps ``previous``.

    Args:
        R: shape (n, r), float32.
        previous: the right factor of the last step, shape (n, r).

    Returns:
        ``(Q_step, Q_next)``, both (n, r), float32. ``Q_step`` is the factor of this
        step's update (zero where a column of ``R`` is zero, so such a column
        moves nothing); ``Q_next`` is the warm start of the next step (the old
        column where ``R``'s column is zero, so the power iteration never dies).
    """
    norms = torch.linalg.vector_norm(R, dim=0, keepdim=True)
    nonzero = norms > 0
    safe = torch.where(nonzero, norms, torch.ones_like(norms))
    Q_step = torch.where(nonzero, R / safe, torch.zeros_like(R))
    Q_next = torch.where(nonzero, Q_step, previous.to(Q_step.dtype))
    return Q_step, Q_next
