"""The Dion step, written once in the paper's order over a layout (arXiv 2504.05295, Alg. 1).

For each m x n matrix, in its tall orientation T (L x S, L >= S), rank r::

    B = M + G                      # M: momentum (device-local), G: gradient
    P = B Q                        # layout: local product, reduced over shards / replicas
    P = Orthonormalize(P)          # layout: Householder QR, or Cholesky QR on row blocks
    R = B^T P                      # layout: local product, reduced over shards / replicas
    M = B - (1 - mu) P R^T         # error feedback: what the rank-r step missed stays in M
    Q = ColumnNormalize(R)         # norms of the whole R (layout: summed over shards)
    X = X (1 - lr wd) - lr sqrt(m/n) P Q^T

A rank holds some rows of T (``P`` has the same rows) and some columns of T
(``R`` and ``Q`` have the same rows as those columns): all of them for a local
matrix, a row block of T when the long dim is sharded, a column block when the
short dim is. Written that way the error feedback, the new Q and the update are
the same three lines whatever the layout; the layout
(:mod:`dion_lp.layouts.local`, :mod:`dion_lp.layouts.sharded`) supplies the two
products, the orthonormalization and the column norms with their collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..dist.dtensor import local
from ..layouts.placement import Placement
from ..options import dion_rank
from ..orthogonalize import column_normalize
from ..quant.buffer import QuantizedBuffer
from ..quant.rng import stream_key

__all__ = ["DionMatrix", "dion_step_", "init_dion_state", "initial_right_factor"]


@dataclass
class DionMatrix:
    """One Dion matrix during a step.

    ``rows_long``: the state rows run along the long dim of the matrix, so the
    rows of a state tensor are rows of T; else they are columns of T.
    """

    param: Tensor
    grad: Tensor  # fp32, this rank's part, shaped like the local parameter
    group: dict[str, Any]
    state: dict[str, Any]
    index: int  # the parameter's position in the optimizer (seeds Q and the rounding)
    place: Placement
    B: Tensor | None = None  # (length, row_numel) fp32: the state itself for fp32 momentum
    P: Tensor | None = None  # this rank's rows of T x r
    R: Tensor | None = None  # this rank's columns of T x r
    Q: Tensor | None = None  # like R: the right factor of the last step, fp32
    norms: Tensor | None = None  # (r,) column norms of the whole R, when sharded over columns
    shared: Tensor | None = None  # the T that P and R are computed from, if not self.T

    @property
    def rows_long(self) -> bool:
        m, n = self.place.global_shape
        return self.place.row_dim == (0 if m >= n else 1)

    @property
    def T(self) -> Tensor:
        """This rank's part of B in the tall orientation (a view)."""
        return self.B if self.rows_long else self.B.T

    @property
    def long_short(self) -> tuple[int, int]:
        m, n = self.place.global_shape
        return max(m, n), min(m, n)


def initial_right_factor(n: int, r: int, *, seed: int, index: int) -> Tensor:
    """The seeded random start of Q for the parameter at position ``index``.

    Drawn on the CPU from a generator seeded by ``(seed, index)``, so it is the
    same on every rank and every device, whatever order states are created in.

    Returns:
        Shape (n, r), float32, unit-norm columns.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + index) % (2**63))
    Q = torch.randn(n, r, generator=gen, dtype=torch.float32)
    return Q / torch.linalg.vector_norm(Q, dim=0, keepdim=True)


def init_dion_state(
    p: Tensor, group: dict[str, Any], st: dict[str, Any], *, seed: int, index: int, place: Placement
) -> None:
    """Create the state of Dion matrix ``p``: zero momentum, seeded Q, step 0.

    Q keeps the rows of T's columns this rank holds (all of them unless the
    short dim is sharded). It is stored in bf16 beside a low-precision momentum
    and always used in fp32.
    """
    m, n = place.global_shape
    r = dion_rank(m, n, group["rank_fraction"], group["rank_multiple_of"])
    fmt = group["momentum_dtype"]
    device = local(p).device
    rows, U, k = place.rows, place.row_numel, place.length
    QuantizedBuffer.create(
        st,
        "momentum",
        rows=rows,
        row_numel=U,
        local_rows=k,
        fmt=fmt,
        block_size=group["block_size"],
        device=device,
        wrap=place.wrap,
    )
    if group["momentum_residual"] and fmt != "fp32":
        residual = torch.zeros(k, U, dtype=torch.bfloat16, device=device)
        st["momentum_residual"] = place.wrap(residual, (rows, U))
    S = min(m, n)
    Q = initial_right_factor(S, r, seed=seed, index=index)
    Q = Q.to(device=device, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
    if place.row_dim == (0 if m >= n else 1):  # rows are T's rows: every rank holds all of Q
        st["Q"] = place.wrap(Q, (S, r), sharded=False)
    else:  # rows are T's columns: Q's rows are split like them
        st["Q"] = place.wrap(Q[place.start : place.start + k].clone(), (S, r))
    st["step"] = 0


def read_momentum_(mat: DionMatrix) -> None:
    """B = M + G (fp32, this rank's rows; the state itself when the momentum is fp32)."""
    B = QuantizedBuffer(mat.state, "momentum").read(add=mat.place.to_rows(mat.grad))
    residual = mat.state.get("momentum_residual")
    if residual is not None:
        B = B.add_(local(residual))
    mat.B = B
    mat.Q = local(mat.state["Q"]).float()


def dion_step_(mats: list[DionMatrix], layout: Any, *, seed: int) -> None:
    """One Dion step of ``mats`` over ``layout``, in place (see the module docstring).

    Args:
        mats: matrices stepped together (their collectives coalesced by the layout).
        layout: supplies ``left_``, ``orthonormalize_``, ``right_`` and ``column_norms_``.
        seed: the optimizer's seed (stochastic rounding of the momentum).
    """
    for mat in mats:
        read_momentum_(mat)  # B = M + G
    layout.left_(mats)  # P = B Q
    layout.orthonormalize_(mats)  # P = Orthonormalize(P)
    layout.right_(mats)  # R = B^T P
    layout.column_norms_(mats)  # ||R_:,j|| when R is split over ranks
    for mat in mats:
        _finish(mat, seed)
        mat.B = mat.P = mat.R = mat.Q = mat.norms = mat.shared = None


def _finish(mat: DionMatrix, seed: int) -> None:
    """Error feedback, the momentum write, the new Q and the parameter update of one matrix."""
    group, st, place = mat.group, mat.state, mat.place
    P, R = mat.P, mat.R
    # M = B - (1 - mu) P R^T   (in place on B: the momentum itself when fp32)
    mat.T.addmm_(P, R.T, alpha=-(1.0 - group["mu"]))
    _write_momentum(mat, seed)
    # Q = ColumnNormalize(R)
    Q_step, Q_next = column_normalize(R, mat.Q, mat.norms, n=mat.long_short[1])
    local(st["Q"]).copy_(Q_next)
    st["step"] += 1
    # X = X (1 - lr wd) - lr sqrt(m / n) P Q^T
    m, n = place.global_shape
    scale = group["lr"] * math.sqrt(m / n)
    X_rows = place.to_rows(mat.param)
    apply_low_rank_update_(X_rows if mat.rows_long else X_rows.T, P, Q_step, group, scale)


def _write_momentum(mat: DionMatrix, seed: int) -> None:
    """Store B as the new momentum in its format; keep what rounding dropped if asked."""
    st, group = mat.state, mat.group
    buf = QuantizedBuffer(st, "momentum")
    if buf.fmt == "fp32":
        return  # B is the state tensor itself, already updated in place
    key = stream_key(seed, mat.index, st["step"], "momentum")
    buf.write(mat.B, stochastic=group["stochastic_rounding"], key=key, row0=mat.place.start)
    residual = st.get("momentum_residual")
    if residual is not None:  # what this write dropped, added back next step
        local(residual).copy_(mat.B - buf.read())


def apply_low_rank_update_(
    X: Tensor,  # (rows, cols) view of the parameter, modified in place
    P: Tensor,  # (rows, r) fp32
    Q: Tensor,  # (cols, r) fp32
    group: dict[str, Any],
    scale: float,
) -> None:
    """X = X (1 - lr wd) - scale P Q^T in fp32, written in X's dtype (one fused product)."""
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if X.dtype == torch.float32:
        X.mul_(decay).addmm_(P, Q.T, alpha=-scale)
    else:
        X.copy_(torch.addmm(X.float(), P, Q.T, beta=decay, alpha=-scale))
