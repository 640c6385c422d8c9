"""Orthonormalization (Householder QR; Cholesky QR on row blocks) and column normalization, in fp32.

These are the only places Dion divides by data-dependent numbers, so they are
written to be safe on the inputs users hit: all-zero gradients, rank-deficient
factors, and factors that arrive in low precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "column_normalize",
    "column_normalize_",
    "negligible_columns",
    "orthonormalize",
    "orthonormalize_rows_",
]

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


def column_normalize(
    R: Tensor, previous: Tensor, norms: Tensor | None = None, n: int | None = None
) -> tuple[Tensor, Tensor]:
    """Unit-norm columns of ``R``; negligible columns stay zero, the warm start keeps ``previous``.

    A column is negligible when :func:`negligible_columns` says so: zero, or
    rounding noise next to the largest column (B has rank below r). Out of
    place: :func:`column_normalize_` on copies.

    Args:
        R: shape (n, r), float32.
        previous: the right factor of the last step, shape (n, r).
        norms: the column norms of the whole R, shape (r,), when ``R`` is only this
            rank's rows of it (sharded); None: computed from ``R``.
        n: rows of the whole R (default ``R.shape[0]``).

    Returns:
        ``(Q_step, Q_next)``, both (n, r), float32. ``Q_step`` is the factor of this
        step's update (zero where a column of ``R`` is negligible, so such a column
        moves nothing); ``Q_next`` is the warm start of the next step (the old
        column where ``R``'s column is zero, so the power iteration never dies).
    """
    Q_next = previous.float().clone()
    return column_normalize_(R.clone(), Q_next, norms, n), Q_next


def column_normalize_(
    R: Tensor, Q: Tensor, norms: Tensor | None = None, n: int | None = None, scale: float = 1.0
) -> Tensor:
    """:func:`column_normalize` in place: ``R`` becomes ``Q_step``, ``Q`` (the previous
    factor, any float dtype) becomes ``Q_next``. No temporary of R's size.

    Args:
        R: shape (n, r), float32, overwritten.
        Q: shape (n, r), the last step's factor, overwritten with the next warm start.
        norms, n: as in :func:`column_normalize`.
        scale: ``Q`` holds the factor times ``scale`` (an fp8 Q is stored times
            sqrt(n), so that its entries are ~1, where fp8 is finest; clamped to
            +-448, the fp8_e4m3 max, which only n > 200,000 could reach); written
            in row blocks of at most 64K elements.

    Returns:
        ``R``, now ``Q_step``.
    """
    if norms is None:
        norms = torch.linalg.vector_norm(R, dim=0)
    negligible = negligible_columns(norms, R.shape[0] if n is None else n)
    R.div_(torch.where(negligible, torch.ones_like(norms), norms))
    kept = negligible.nonzero().flatten()
    # index ops on the bits: CPU kernels have no float8 index_copy_
    bits = Q.view(torch.uint8) if Q.element_size() == 1 else Q
    old = bits.index_select(1, kept) if kept.numel() else None
    if kept.numel():  # those columns move nothing, and keep the old warm start
        R.index_fill_(1, kept, 0.0)
    if scale == 1.0:
        Q.copy_(R)
    else:
        step = max(1, 2**16 // max(1, R.shape[1]))
        for r0 in range(0, R.shape[0], step):
            Q[r0 : r0 + step].copy_((R[r0 : r0 + step] * scale).clamp_(-448.0, 448.0))
    if old is not None:
        bits.index_copy_(1, kept, old)
    return R


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


# ------------------------------------------------ Cholesky QR on row blocks
_U = 2.0**-24  # fp32 unit roundoff
_MAX_DIAG_RATIO = 300.0  # Cholesky factor of P^T P beyond this: kappa(P) too large for CholQR2
_MAX_PASSES = 5


def _cholesky(G: Tensor) -> tuple[Tensor, bool]:
    """Upper R with R^T R = G, and whether it succeeded with finite entries."""
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    return R, bool(info == 0) and bool(torch.isfinite(R).all())


def _shifted_cholesky(G: Tensor, rows: int) -> Tensor:
    """Cholesky factor of G + s I with a shift above the Gram's rounding error.

    ``s = 10 sqrt(rows r) u ||G||_2``, raised tenfold until the factorization
    succeeds (an all-zero G gets the smallest normal shift: P stays zero).
    """
    r = G.shape[0]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    norm = float(torch.linalg.matrix_norm(G, ord=2)) if r else 0.0
    shift = max(10.0 * math.sqrt(rows * r) * _U * norm, torch.finfo(torch.float32).tiny)
    for _ in range(8):
        R, ok = _cholesky(G + shift * eye)
        if ok:
            return R
        shift *= 10.0
    return math.sqrt(shift) * eye


def _gram_sums(blocks: list[Tensor], sum_: Callable[[list[Tensor]], None]) -> list[Tensor]:
    """``sum over the ranks of P^T P`` of each block: one call of ``sum_`` on upper triangles."""
    uppers, index = [], []
    for P in blocks:
        r = P.shape[1]
        rows, cols = torch.triu_indices(r, r, device=P.device)
        index.append((rows, cols))
        uppers.append((P.T @ P)[rows, cols])
    sum_(uppers)
    grams = []
    for P, (rows, cols), upper in zip(blocks, index, uppers, strict=True):
        G = torch.zeros(P.shape[1], P.shape[1], dtype=torch.float32, device=P.device)
        G[rows, cols] = upper
        G[cols, rows] = upper
        grams.append(G)
    return grams


def orthonormalize_rows_(
    blocks: list[Tensor], rows: Sequence[int], sum_: Callable[[list[Tensor]], None]
) -> list[Tensor]:
    """Orthonormalize row-sharded matrices without gathering them (iterated Cholesky QR).

    Each pass sums the r x r Gram matrices ``G = P^T P`` (upper triangles) of all the still
    active matrices over the ranks holding their rows (one call of ``sum_``: an fp32
    collective, or nothing on one rank), factors ``G = R^T R``, sets
    ``P <- P R^{-1}`` on every rank's rows. A pass whose Gram matrix is within 0.5
    of the identity (Frobenius) takes P to orthonormal columns up to fp32
    rounding, so a matrix is done after such a pass: two passes (CholeskyQR2) for
    a well-conditioned P. An ill-conditioned first pass (Cholesky failed, or its
    diagonal spans more than :data:`_MAX_DIAG_RATIO`) and any failed later one use
    a shifted Cholesky factor (shifted CholeskyQR3, Fukaya et al. 2020), and the
    passes go on (at most five): directions that P lacks (rank deficiency) come
    out as an orthonormal completion set by rounding noise, as with Householder
    QR (ColumnNormalize then finds their columns of R negligible and drops them
    from the update). An all-zero P stays zero. The Gram sums are bitwise identical on every
    rank, so every rank takes the same branches.

    Args:
        blocks: this rank's rows of each P (``(k_i, r_i)`` fp32); their union over
            the ranks is the full ``(rows_i, r_i)`` matrix. Replaced in the list.
        rows: the full row count of each matrix.
        sum_: sums a list of fp32 tensors over the ranks holding the other rows, in place.

    Returns:
        ``blocks``, now this rank's rows of matrices with orthonormal columns spanning
        the same space (Cholesky QR's R has a positive diagonal: P equals Householder
        QR's up to the signs of its columns).
    """
    n = len(blocks)
    done = [False] * n
    for rnd in range(_MAX_PASSES):
        active = [i for i in range(n) if not done[i]]
        if not active:
            break
        grams = _gram_sums([blocks[i] for i in active], sum_)
        for i, G in zip(active, grams, strict=True):
            eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            if rnd > 0 and float(torch.linalg.norm(G - eye)) <= 0.5:
                done[i] = True  # this pass leaves P orthonormal up to rounding
            elif not bool(G.diagonal().sum() > 0):
                done[i] = True  # all-zero P
                continue
            R, ok = _cholesky(G)
            if ok and rnd == 0:
                diag = R.diagonal()
                ok = bool(diag.max() <= _MAX_DIAG_RATIO * diag.min())
            if not ok:
                R = _shifted_cholesky(G, rows[i])
            blocks[i] = torch.linalg.solve_triangular(R, blocks[i], upper=True, left=False)
    return blocks
