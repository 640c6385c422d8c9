"""Low-rank mean of gradient matrices (PowerSGD, one power step), factors in any wire format.

For the DDP hooks' large matrices that Dion does not own (a tied embedding and
LM head is a third of GPT-2-small): instead of the whole n x m gradient, each
rank sends an n x r and an m x r factor. One power iteration with a warm-started
right factor (Vogels et al., 2019, "PowerSGD"), with error feedback:

    M_w = g_w + e_w                    (n, m): rank w's gradient plus its residual
    P   = mean_w(M_w Q)                (n, r): quantized mean, bitwise equal on all ranks
    P^  = orthonormalize(P)            fp32 QR, identical on all ranks
    Q_w = M_w^T P^                     (m, r)
    Q   = mean_w(Q_w)                  quantized mean, error feedback: eps_w
    applied = P^ Q^T                   (n, m): the same on every rank
    e_w = M_w - P^ (Q_w - eps_w)^T     the new residual
    Q   is kept as the next step's warm start

``eps_w`` is rank w's share of what rounding Q lost (``quantized_mean_``'s
``errors``), so mean_w(e_w) = mean_w(M_w) - applied exactly (in fp32 arithmetic):
what the rank-r step or the wire missed is delayed, never lost. P's rounding
needs no feedback: every rank uses the same P^, whatever it is. When the mean
gradient has rank <= r and fp32 travels, ``applied`` is that mean (P^ spans its
columns), so the compression is lossless on low-rank gradients.

Wire bytes per step: ``mean_bytes(sum n r) + mean_bytes(sum m r)`` in the
chosen format: two rounds of (all-to-all, all-gather) for all matrices together.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..dist.accounting import DEFAULT_BLOCK_SIZE, CommStats
from ..dist.collectives import quantized_mean_
from ..orthogonalize import orthonormalize

__all__ = ["compressed_shape", "initial_q", "lowrank_mean_"]

MIN_RATE = 2  # compress only when the factors are at most half the matrix (torch's rule)


def compressed_shape(shape: Sequence[int], rank: int) -> tuple[int, int, int] | None:
    """``(n, m, r)`` when a gradient of ``shape`` is worth compressing at ``rank``, else None.

    A gradient of two or more dimensions is viewed as ``(shape[0], -1)``, n x m;
    it is compressed at ``r = min(n, m, rank)`` when ``(n + m) r * MIN_RATE <= n m``.
    """
    if rank < 1 or len(shape) < 2:
        return None
    n, m = int(shape[0]), math.prod(int(s) for s in shape[1:])
    r = min(n, m, rank)
    if r < 1 or (n + m) * r * MIN_RATE > n * m:
        return None
    return n, m, r


def initial_q(key: str, m: int, r: int) -> Tensor:
    """The seeded start of the right factor of the matrix keyed ``key``: (m, r) fp32.

    Seeded from the key alone, so every rank (and a restarted run) draws the same.
    """
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(key.encode()))
    q = torch.randn(m, r, generator=gen, dtype=torch.float32)
    return q / torch.linalg.vector_norm(q, dim=0, keepdim=True)


@torch.no_grad()
def lowrank_mean_(
    grads: Sequence[Tensor],
    residuals: Sequence[Tensor],
    qs: Sequence[Tensor],
    fmt: str,
    group: Any = None,
    stats: CommStats | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """Replace each gradient, in place, by the rank-r estimate of its mean over ``group``.

    Collective: every rank calls it with the same shapes, ranks, ``fmt`` and
    ``block_size``, and the same ``qs`` (they stay equal on every rank).

    Args:
        grads: gradients of any float dtype, shape (n, ...) viewed as (n, m).
        residuals: float32, shaped like ``grads``; read and rewritten (error feedback).
        qs: float32 (m, r) right factors, read as the warm start and overwritten
            with this step's mean Q (bitwise equal on every rank).
        fmt: wire format of the factors, one of ``dion_lp.quant.formats.WIRE_FORMATS``.
        group: process group (None: the default group).
        stats: adds the bytes of both means.
        block_size: elements per scale of the fp8 formats.
    """
    if not grads:
        return
    Ms = [(g.float() + e).reshape(g.shape[0], -1) for g, e in zip(grads, residuals, strict=True)]
    Ps = [M @ q for M, q in zip(Ms, qs, strict=True)]
    quantized_mean_(Ps, fmt, group, stats, block_size=block_size)
    P_hats = [orthonormalize(P) for P in Ps]
    Q_locals = [M.T @ P_hat for M, P_hat in zip(Ms, P_hats, strict=True)]
    Q_means = [q.clone() for q in Q_locals]
    eps = [torch.empty_like(q) for q in Q_means]
    quantized_mean_(Q_means, fmt, group, stats, block_size=block_size, errors=eps)
    for g, e, q, M, P_hat, Q_local, Q_mean, err in zip(
        grads, residuals, qs, Ms, P_hats, Q_locals, Q_means, eps, strict=True
    ):
        e.copy_((M - P_hat @ (Q_local - err).T).view_as(e))
        g.copy_((P_hat @ Q_mean.T).view_as(g))
        q.copy_(Q_mean)
