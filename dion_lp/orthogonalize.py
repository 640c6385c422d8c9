"""Orthonormalization and column normalization, always in fp32.

These are the only places Dion divides by data-dependent numbers, so they are
written to be safe on the inputs users hit: all-zero gradients, rank-deficient
factors, and factors that arrive in low precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["orthonormalize", "column_normalize", "negligible_columns"]

# A column of R whose norm is at most this times n times the largest is rounding
# noise, not a direction of B: with B of rank k < r, the r - k extra columns of
# P are orthogonal to B's range and R = B^T P has columns of norm ~ eps * |B|
# (measured <= 1e-5 relative on 3072 x 768). Normalizing them would turn that
# noise into full-size update directions.
NEGLIGIBLE_RTOL = 8 * torch.finfo(torch.float32).eps


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
    """Unit-norm columns of ``R``; negligible columns stay zero, the warm start keeps ``previous``.

    A column is negligible when :func:`negligible_columns` says so: zero, or
    rounding noise next to the largest column (B has rank below r).

    Args:
        R: shape (n, r), float32.
        previous: the right factor of the last step, shape (n, r).

    Returns:
        ``(Q_step, Q_next)``, both (n, r), float32. ``Q_step`` is the factor of this
        step's update (zero where a column of ``R`` is negligible, so such a column
        moves nothing); ``Q_next`` is the warm start of the next step (the old
        column where ``R``'s column is zero, so the power iteration never dies).
    """
    norms = torch.linalg.vector_norm(R, dim=0, keepdim=True)
    nonzero = ~negligible_columns(norms, R.shape[0])
    safe = torch.where(nonzero, norms, torch.ones_like(norms))
    Q_step = torch.where(nonzero, R / safe, torch.zeros_like(R))
    Q_next = torch.where(nonzero, Q_step, previous.to(Q_step.dtype))
    return Q_step, Q_next


def negligible_columns(norms: Tensor, n: int) -> Tensor:
    """Which columns of R (norms given) are zero or rounding noise.

    Args:
        norms: column norms of R, shape (1, r) or (r,), float32.
        n: number of rows of the whole R (the short side of the matrix).

    Returns:
        Bool tensor shaped like ``norms``: ``norms <= 8 eps_fp32 n max(norms)``.
        All True for an all-zero R.
    """
    return norms <= (NEGLIGIBLE_RTOL * n) * norms.max()
