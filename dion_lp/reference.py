"""Plain Dion in the paper's notation: the test oracle.

One m x n matrix at a time, no batching, no low precision, no process groups:
Algorithm 1 of Ahn, Xu et al., "Dion: A Communication-Efficient Optimizer for
Large Models" (arXiv 2504.05295), computed in the dtype of its inputs (the tests
use float64). The optimizer in :mod:`dion_lp.dion` is tested against it.

Conventions shared with the optimizer (and documented there):

- The step works on the tall orientation: a wide matrix (m < n) is transposed
  first, so Q always has ``min(m, n)`` rows.
- The update is scaled by ``sqrt(d_out / d_in)`` of the matrix as stored
  (``X.shape[0] / X.shape[1]``), whatever the orientation.
- ColumnNormalize leaves a column of R whose norm is zero at zero in the update
  and keeps the previous column of Q as the warm start, so an all-zero gradient
  applies only weight decay and does not kill the power iteration. "Zero" means
  at most 8 eps_fp32 n times the largest column norm: when B has rank below r,
  the extra columns are rounding noise and must not become update directions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dion_reference_step", "replicated_reference_step"]


def dion_reference_step(
    X: Tensor,  # m x n parameter
    G: Tensor,  # m x n gradient
    M: Tensor,  # m x n momentum
    Q: Tensor,  # min(m, n) x r right factor (warm start)
    *,
    lr: float,
    mu: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Dion step on one matrix; returns new ``(X, M, Q)`` and changes nothing.

    Args:
        X: parameter, shape (m, n).
        G: gradient, shape (m, n).
        M: momentum, shape (m, n).
        Q: right factor, shape (min(m, n), r).
        lr, mu, weight_decay: as in :class:`dion_lp.Dion`.

    Returns:
        ``(X_new, M_new, Q_new)`` with the shapes of the inputs.
    """
    X_new, (M_new,), Q_new = replicated_reference_step(
        X, [G], [M], Q, lr=lr, mu=mu, weight_decay=weight_decay
    )
    return X_new, M_new, Q_new


def replicated_reference_step(
    X: Tensor,  # m x n parameter, identical on every replica
    Gs: list[Tensor],  # one m x n gradient per replica
    Ms: list[Tensor],  # one m x n momentum per replica (device-local)
    Q: Tensor,  # min(m, n) x r, identical on every replica
    *,
    lr: float,
    mu: float,
    weight_decay: float,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """One Dion step over ``len(Gs)`` data-parallel replicas, exchanges as exact means.

    Args:
        X: parameter, shape (m, n).
        Gs: per-replica gradients, each (m, n).
        Ms: per-replica momenta, each (m, n).
        Q: shared right factor, shape (min(m, n), r).
        lr, mu, weight_decay: as in :class:`dion_lp.Dion`.

    Returns:
        ``(X_new, Ms_new, Q_new)``.
    """
    m, n = X.shape
    transpose = m < n
    # Work on the tall orientation.
    Bs = [(Mi + Gi) for Mi, Gi in zip(Ms, Gs, strict=True)]
    if transpose:
        Bs = [B.T for B in Bs]
    world = len(Bs)

    # P = Orthonormalize(mean_i B_i Q)
    P = sum(B @ Q for B in Bs) / world
    P, _ = torch.linalg.qr(P, mode="reduced")
    # R = mean_i B_i^T P
    R = sum(B.T @ P for B in Bs) / world
    # M_i = B_i - (1 - mu) P R^T
    Ms_new = [B - (1 - mu) * P @ R.T for B in Bs]
    # Q = ColumnNormalize(R), zero columns keep the previous Q as warm start
    norms = R.norm(dim=0, keepdim=True)
    # the optimizer's convention: a column at most 8 eps_fp32 n times the largest is noise
    nonzero = norms > 8 * torch.finfo(torch.float32).eps * R.shape[0] * norms.max()
    Q_step = torch.where(nonzero, R / torch.where(nonzero, norms, torch.ones_like(norms)), 0.0)
    Q_new = torch.where(nonzero, Q_step, Q)
    # X = X (1 - lr wd) - lr sqrt(d_out / d_in) P Q^T
    update = P @ Q_step.T
    if transpose:
        update = update.T
        Ms_new = [Mi.T for Mi in Ms_new]
    X_new = X * (1 - lr * weight_decay) - lr * math.sqrt(m / n) * update
    return X_new, Ms_new, Q_new
