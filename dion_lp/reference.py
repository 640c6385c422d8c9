"""Plain Dion, Dion2 and Muon in their papers' notation: the test oracles.

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

__all__ = [
    "dion2_reference_step",
    "dion_reference_step",
    "muon_reference_step",
    "nordion2_reference_step",
    "newton_schulz_reference",
    "replicated_reference_step",
]


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


def newton_schulz_reference(A: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Muon's quintic Newton-Schulz iteration (Jordan et al. 2024), in ``A``'s dtype.

    X = A / (||A||_F + eps), then ``steps`` times X = a X + b (X X^T) X + c (X X^T)^2 X
    with (a, b, c) = (3.4445, -4.7750, 2.0315), on the wide orientation.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = A / (A.norm() + eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        S = X @ X.T
        X = a * X + b * S @ X + c * S @ S @ X
    return X.T if tall else X


def dion2_reference_step(
    X: Tensor, G: Tensor, M: Tensor, *, lr: float, ef_decay: float, fraction: float, wd: float
) -> tuple[Tensor, Tensor]:
    """One Dion2 step (arXiv 2512.16928) on one m x n matrix; returns ``(X_new, M_new)``.

    B = M + G; the k = ceil(fraction min(m, n)) rows (m <= n) or columns (m > n) of
    B with the largest L1 norm are orthogonalized together by Newton-Schulz and
    applied to those slices of X, scaled lr sqrt(m / n), after weight decay on all
    of X; the selected slices of the momentum are multiplied by ef_decay.
    """
    m, n = X.shape
    B = M + G
    tall = m > n
    if tall:  # slices are columns: work on the transpose, where they are rows
        B, X = B.T, X.T
    k = max(1, min(B.shape[0], math.ceil(fraction * B.shape[0] - 1e-9)))
    chosen = B.abs().sum(dim=1).argsort(descending=True)[:k]
    U = newton_schulz_reference(B[chosen])
    M_new = B.clone()
    M_new[chosen] = ef_decay * B[chosen]
    X_new = X * (1 - lr * wd)
    X_new[chosen] -= lr * math.sqrt(m / n) * U
    return (X_new.T, M_new.T) if tall else (X_new, M_new)


def muon_reference_step(
    X: Tensor, G: Tensor, M: Tensor, *, lr: float, mu: float, wd: float
) -> tuple[Tensor, Tensor]:
    """One step of torch.optim.Muon's defaults (Nesterov, ``adjust_lr_fn="original"``);
    returns ``(X_new, M_new)`` with torch's momentum ``M = mu M + (1 - mu) G``."""
    m, n = X.shape
    M_new = mu * M + (1 - mu) * G
    U = newton_schulz_reference((1 - mu) * G + mu * M_new)  # torch: grad.lerp(buf, mu)
    X_new = X * (1 - lr * wd) - lr * math.sqrt(max(1.0, m / n)) * U
    return X_new, M_new


def nordion2_reference_step(
    X: Tensor,
    G: Tensor,
    M: Tensor,
    V: Tensor,
    *,
    lr: float,
    ef_decay: float,
    fraction: float,
    beta2: float,
    wd: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One NorDion2 step (Dion2 on rows + NorMuon's per-neuron normalisation); returns
    ``(X_new, M_new, V_new)``, ``V`` the per-row second moment (m,)."""
    m, n = X.shape
    B = M + G
    k = max(1, min(m, math.ceil(fraction * m - 1e-9)))
    chosen = B.abs().sum(dim=1).argsort(descending=True)[:k]
    U = newton_schulz_reference(B[chosen])
    V_new = V.clone()
    V_new[chosen] = beta2 * V[chosen] + (1 - beta2) * (U * U).mean(dim=1)
    normed = U / (V_new[chosen].sqrt() + 1e-8)[:, None]
    normed = normed * (U.norm() / normed.norm())
    M_new = B.clone()
    M_new[chosen] = ef_decay * B[chosen]
    X_new = X * (1 - lr * wd)
    X_new[chosen] -= lr * math.sqrt(m / n) * normed
    return X_new, M_new, V_new
