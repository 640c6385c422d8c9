"""Dion2, NorDion2 and Muon on whole matrices, with the momentum in any state format.

Dion2 (arXiv 2512.16928), for an m x n matrix, with ``alpha = rank_fraction`` and
``mu`` the error-feedback decay (the paper's ``ef_decay``)::

    B = M + G                                  # M: momentum, G: (averaged) gradient
    I = the k = ceil(alpha min(m, n)) slices of B with the largest L1 norm
        (rows when m <= n, else columns: slices along the short side)
    U = NewtonSchulz(B[I])                     # k x n (or m x k), fp32
    M = B, with M[I] = mu B[I]                 # what was not applied keeps accumulating
    X = X (1 - lr wd);  X[I] -= lr sqrt(m / n) U

NorDion2 (microsoft/dion's ``NorDion2``, exported there as Dion3) is Dion2 with
NorMuon's per-neuron normalisation: slices are always rows (neurons), and with
``beta2 = betas[1]`` and a per-row second moment ``V`` (fp32, m values)::

    V[I] = beta2 V[I] + (1 - beta2) mean_j U_ij^2
    U = U / (sqrt(V[I]) + 1e-8), rescaled to its Frobenius norm before

Muon (Jordan et al. 2024) is the same machinery with every slice selected and
Nesterov momentum, in the conventions of ``torch.optim.Muon``: ``M = mu (M + G)``,
``U = NewtonSchulz(G + M)``, scale ``sqrt(max(1, m / n))``. (torch keeps
``(1 - mu)`` times this momentum; Newton-Schulz normalises its input, so the
update is the same.)

All three keep one buffer, ``momentum`` (NorDion2 also a per-row
``row_variance``), in the group's ``momentum_dtype`` (fp32, bf16, int8,
fp8_e4m3, dynamic8, int4, fp4_e2m1; stochastic rounding with the counter-based
bits of :mod:`dion_lp.quant.rng`), written back once per step.
Newton-Schulz runs in fp32 on every device here (bf16 matmuls are ~90x slower
on a CPU). Gradients must already be the replicas' mean (DDP, the dion_lp DDP
hook, or ``grad_sync=True``): like AdamW and Lion groups, nothing else crosses
the network; or, for Dion2 / NorDion2 with ``dion2_exchange="selected_rows"``,
each rank keeps its own momentum and only the selected rows travel
(:mod:`dion_lp.algorithms.dion2_rows`). FSDP2-sharded parameters are refused
(selection needs whole rows). Memory: unlike Dion's, this step decodes a
low-precision momentum whole (one fp32 copy of the matrix while it runs; no
row-block streaming yet).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..dist.dtensor import local
from ..layouts.placement import Placement
from ..options import dion_rank
from ..quant.buffer import QuantizedBuffer
from ..quant.rng import stream_key
from ..quant.weights import write_weights_
from .elementwise import create_buffer

__all__ = [
    "NS_COEFFICIENTS",
    "NS_STEPS",
    "dion2_step_",
    "init_dion2_state",
    "newton_schulz",
    "selected_slices",
    "slice_dim",
    "top_slices",
]

# Muon's quintic iteration (Jordan et al. 2024; torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(A: Tensor, steps: int = NS_STEPS, eps: float = NS_EPS) -> Tensor:
    """Approximate orthogonalization of ``A`` (p, q) by Muon's quintic Newton-Schulz, fp32.

    ``A / (||A||_F + eps)`` is iterated ``X <- a X + (b S + c S^2) X`` with
    ``S = X X^T`` on the wide orientation; the singular values land in ~[0.7, 1.2]
    (not exactly 1: the coefficients trade accuracy for speed), the singular
    vectors are A's. Returns a new (p, q) float32 tensor.
    """
    a, b, c = NS_COEFFICIENTS
    X = A.float() / (torch.linalg.vector_norm(A.float()) + eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        S = X @ X.T
        X = torch.addmm(X, torch.addmm(S, S, S, beta=b, alpha=c), X, beta=a)
    return X.T if tall else X


def slice_dim(shape: tuple[int, int], rows_only: bool = False) -> int:
    """The dim Dion2 selects along: rows (0) when m <= n or ``rows_only``, else columns."""
    return 0 if shape[0] <= shape[1] or rows_only else 1


def top_slices(norms: Tensor, fraction: float, multiple_of: int) -> Tensor:
    """Sorted indices of the ``k`` largest ``norms`` (one per slice), ``k = ceil(fraction *
    slices)`` rounded up to ``multiple_of`` (as Dion's rank); all of them when k covers all."""
    n = norms.numel()
    k = dion_rank(n, n, fraction, multiple_of)
    if k == n:
        return torch.arange(n, device=norms.device)
    return torch.topk(norms, k, sorted=False).indices.sort().values


def selected_slices(
    B: Tensor, fraction: float, multiple_of: int, rows_only: bool = False
) -> tuple[int, Tensor]:
    """(dim, sorted indices) of the slices Dion2 orthogonalizes: the rows or columns
    (:func:`slice_dim`) of ``B`` (m, n) with the largest L1 norm (:func:`top_slices`)."""
    dim = slice_dim(B.shape, rows_only)
    return dim, top_slices(B.abs().sum(dim=1 - dim), fraction, multiple_of)


def _normalize_rows_(U: Tensor, V: Tensor, idx: Tensor, beta2: float) -> Tensor:
    """NorMuon's per-row normalisation of ``U`` (k, n) with the rows ``idx`` of ``V`` (m,),
    which it updates in place; returns U with its Frobenius norm kept."""
    v = V.index_select(0, idx).lerp_(U.square().mean(dim=1), 1.0 - beta2)
    V.index_copy_(0, idx, v)
    out = U / (v.sqrt() + 1e-8)[:, None]
    return out.mul_(torch.linalg.vector_norm(U) / torch.linalg.vector_norm(out).clamp(min=1e-8))


def init_dion2_state(
    p: Tensor, group: dict[str, Any], st: dict[str, Any], place: Placement
) -> None:
    """The zero momentum buffer of a Dion2 / NorDion2 / Muon matrix, in rows like ``place``
    (and NorDion2's fp32 per-row second moment ``row_variance``, (m,))."""
    create_buffer(st, "momentum", group["momentum_dtype"], p, group, place)
    if group["algorithm"] == "nordion2":
        st["row_variance"] = torch.zeros(p.shape[0], device=local(p).device)
    st["step"] = 0


def dion2_step_(
    p: Tensor,
    grad: Tensor,
    group: dict[str, Any],
    st: dict[str, Any],
    *,
    place: Placement,
    seed: int,
    index: int,
) -> None:
    """One Dion2, NorDion2 or Muon step (``group["algorithm"]``) of the matrix ``p``, in place.

    Args:
        p: the (m, n) parameter, updated in its own dtype (``weight_rounding``).
        grad: its gradient, the replicas' mean, any float dtype.
        group: the param group (lr, mu, weight_decay, rank_fraction, formats).
        st: the parameter's state dict; initialised on first use.
        place: where ``p``'s rows live (a plain tensor: its own rows).
        seed, index: the optimizer's seed and ``p``'s position (stochastic rounding).
    """
    if not st:
        init_dion2_state(p, group, st, place)
    buf = QuantizedBuffer(st, "momentum")
    G = grad.float()  # whole matrices: state rows are the parameter's rows
    B = buf.read(add=G)  # the state itself, updated in place, when fp32
    mu, (m, n) = group["mu"], p.shape
    if group["algorithm"] == "muon":
        B.mul_(mu)  # M = mu (M + G); the update orthogonalizes G + M (Nesterov)
        idx = torch.arange(m, device=B.device)
        U = newton_schulz(B + G)
        del G
        scale = math.sqrt(max(1.0, m / n))
        finish_(p, B, U, 0, idx, group, st, seed=seed, index=index, scale=scale)
        return
    del G
    dim, idx = selected_slices(
        B, group["rank_fraction"], group["rank_multiple_of"], rows_only=rows_only(group)
    )
    selected = B.index_select(dim, idx)
    U = newton_schulz(selected)
    B.index_copy_(dim, idx, selected.mul_(mu))  # M[I] = mu B[I]
    finish_(p, B, U, dim, idx, group, st, seed=seed, index=index, scale=math.sqrt(m / n))


def rows_only(group: dict[str, Any]) -> bool:
    """Whether the group's slices are always rows (NorDion2: per-neuron normalisation)."""
    return group["algorithm"] == "nordion2"


def finish_(
    p: Tensor,
    B: Tensor,
    U: Tensor,
    dim: int,
    idx: Tensor,
    group: dict[str, Any],
    st: dict[str, Any],
    *,
    seed: int,
    index: int,
    scale: float,
) -> None:
    """The end of a step: B (the new momentum, fp32) written back, NorDion2's
    normalisation of ``U``, and X's slices ``idx`` along ``dim`` moved by ``-lr scale U``."""
    step = st["step"]
    st["step"] += 1
    buf = QuantizedBuffer(st, "momentum")
    if buf.fmt != "fp32":
        key = stream_key(seed, index, step, "momentum")
        buf.write(B, stochastic=group["stochastic_rounding"], key=key, consume=True)
    if rows_only(group):
        U = _normalize_rows_(U, local(st["row_variance"]), idx, group["betas"][1])
    key = stream_key(seed, index, step, "param")
    _update_weights_(p, U, dim, idx, group, lr_scale=scale, key=key)


def _update_weights_(
    p: Tensor, U: Tensor, dim: int, idx: Tensor, group: dict[str, Any], *, lr_scale: float, key: int
) -> None:
    """X = X (1 - lr wd); X's slices ``idx`` along ``dim`` -= lr lr_scale U; in X's dtype."""
    lr = group["lr"]
    X = local(p)
    decay = 1.0 - lr * group["weight_decay"]
    if X.dtype == torch.float32:
        X.mul_(decay).index_add_(dim, idx, U, alpha=-lr * lr_scale)
        return
    new = X.float().mul_(decay).index_add_(dim, idx, U, alpha=-lr * lr_scale)
    stochastic = group["weight_rounding"] == "stochastic"
    write_weights_(X, new, stochastic=stochastic, key=key, first=0)
