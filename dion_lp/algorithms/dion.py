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
from ..orthogonalize import column_normalize_
from ..quant.buffer import QuantizedBuffer, block_ranges
from ..quant.rng import stream_key
from ..quant.weights import write_weights_

__all__ = [
    "WHOLE_NUMEL",
    "q_dtype",
    "q_scale",
    "DionMatrix",
    "dion_step_",
    "init_dion_state",
    "initial_right_factor",
    "update_weights_",
]

# A low-precision momentum of more than WHOLE_NUMEL elements (16 MiB in fp32) is
# never decoded whole: each pass of the step decodes, uses and drops one row block
# of at most quant.buffer.BLOCK_NUMEL elements (1 MiB in fp32) at a time. Smaller
# momenta are decoded once per step (fewer passes: faster).
WHOLE_NUMEL = 2**22


def q_dtype(momentum_dtype: str) -> torch.dtype:
    """How Q (S x r, the warm start of the next step) is stored for a momentum format.

    fp32 beside an fp32 momentum; bf16 beside an 8- or 16-bit one; float8_e4m3fn,
    times :func:`q_scale`, beside a 4-bit one (int4, fp4_e2m1), where a bf16 Q
    would be a fifth of the state (0.125 of 0.64 B/param at rank 1/4). Q only
    seeds the next power iteration (this step's update uses the fp32 Q_step), so
    its rounding costs a little accuracy of the tracked subspace, never the update
    itself; measured in the README's int4 table.
    """
    if momentum_dtype == "fp32":
        return torch.float32
    if momentum_dtype in ("int4", "fp4_e2m1"):
        return torch.float8_e4m3fn
    return torch.bfloat16


def q_scale(dtype: torch.dtype, S: int) -> float:
    """Q is stored times this: sqrt(S) for fp8 (unit columns have entries ~1 / sqrt(S)), else 1."""
    return math.sqrt(S) if dtype == torch.float8_e4m3fn else 1.0


@dataclass
class DionMatrix:
    """One Dion matrix during a step.

    ``rows_long``: the state rows run along the long dim of the matrix, so the
    rows of a state tensor are rows of T; else they are columns of T.
    """

    param: Tensor
    grad: Tensor  # this rank's part, shaped like the local parameter (any float dtype)
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
    blocks: tuple[tuple[int, int], ...] = ()  # local row blocks (r0, r1) when B is streamed
    scratch: Tensor | None = None  # fp32, one decoded block (codes' width), reused

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

    @property
    def rank(self) -> int:
        """r, the columns of the factors."""
        return local(self.state["Q"]).shape[1]

    def rows(self, r0: int, r1: int, reuse: bool = True) -> Tensor:
        """B's local rows ``r0:r1`` in fp32: a view of B, or decoded (+ G) when streamed.

        A decoded block lives in ``self.scratch`` (valid until the next call) unless
        ``reuse`` is False.
        """
        if self.B is not None:
            return self.B[r0:r1]
        G = self.place.to_rows(self.grad)[r0:r1].float()
        out = self.scratch if reuse else None
        B = QuantizedBuffer(self.state, "momentum").read(add=G, rows=(r0, r1), out=out)
        residual = self.state.get("momentum_residual")
        return B if residual is None else B.add_(local(residual)[r0:r1])

    def _row_blocks(self) -> tuple[tuple[int, int], ...]:
        return self.blocks or ((0, self.place.length),)

    def tall_times(self, Q: Tensor) -> Tensor:
        """``T @ Q`` for Q of T's (local) columns x r, one row block of B at a time."""
        if self.B is not None:
            return self.T @ Q
        k, r = self.place.length, Q.shape[1]
        if self.rows_long:  # B's rows are T's rows: P's rows block by block
            out = torch.empty(k, r, dtype=torch.float32, device=Q.device)
            for r0, r1 in self._row_blocks():
                torch.matmul(self.rows(r0, r1), Q, out=out[r0:r1])
            return out
        out = torch.zeros(self.place.row_numel, r, dtype=torch.float32, device=Q.device)
        for r0, r1 in self._row_blocks():  # B's rows are T's columns: a sum over blocks
            out.addmm_(self.rows(r0, r1).T, Q[r0:r1])
        return out

    def tall_t_times(self, P: Tensor) -> Tensor:
        """``T^T @ P`` for P of T's (local) rows x r, one row block of B at a time."""
        if self.B is not None:
            return self.T.T @ P
        k, r = self.place.length, P.shape[1]
        if not self.rows_long:
            out = torch.empty(k, r, dtype=torch.float32, device=P.device)
            for r0, r1 in self._row_blocks():
                torch.matmul(self.rows(r0, r1), P, out=out[r0:r1])
            return out
        out = torch.zeros(self.place.row_numel, r, dtype=torch.float32, device=P.device)
        for r0, r1 in self._row_blocks():
            out.addmm_(self.rows(r0, r1).T, P[r0:r1])
        return out

    def tall_copy(self) -> Tensor:
        """A copy of this rank's T, fp32 (B materialised whole)."""
        if self.B is not None:
            return self.T.clone()
        B = torch.cat([self.rows(r0, r1, reuse=False) for r0, r1 in self._row_blocks()])
        return B if self.rows_long else B.T


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
    dtype = q_dtype(fmt)
    Q = initial_right_factor(S, r, seed=seed, index=index).to(device)
    Q = (Q * q_scale(dtype, S)).clamp_(-448.0, 448.0) if dtype.itemsize == 1 else Q
    Q = Q.to(dtype=dtype)
    if place.row_dim == (0 if m >= n else 1):  # rows are T's rows: every rank holds all of Q
        st["Q"] = place.wrap(Q, (S, r), sharded=False)
    else:  # rows are T's columns: Q's rows are split like them
        st["Q"] = place.wrap(Q[place.start : place.start + k].clone(), (S, r))
    st["step"] = 0


def read_momentum_(mat: DionMatrix) -> None:
    """B = M + G (fp32, this rank's rows; the state itself when the momentum is fp32).

    A low-precision momentum of more than :data:`WHOLE_NUMEL` elements is not
    decoded whole: ``mat.blocks`` lists its row blocks of at most
    :data:`dion_lp.quant.buffer.BLOCK_NUMEL` elements, and every pass of the step
    decodes (M + G), uses and drops one block at a time, so the step's temporaries
    stay bounded whatever the matrix size.
    """
    buf = QuantizedBuffer(mat.state, "momentum")
    stored = local(mat.state["Q"])
    mat.Q = stored.float()
    scale = q_scale(stored.dtype, mat.long_short[1])
    if scale != 1.0:
        mat.Q.div_(scale)
    k, U = mat.place.length, mat.place.row_numel
    if buf.fmt != "fp32" and k * U > WHOLE_NUMEL:
        mat.blocks = tuple(block_ranges(k, U))
        width = buf.width  # elements per stored row (padded to whole blocks)
        most = max(r1 - r0 for r0, r1 in mat.blocks)
        mat.scratch = torch.empty(most * width, dtype=torch.float32, device=mat.Q.device)
        return
    B = buf.read(add=mat.place.to_rows(mat.grad).float())
    residual = mat.state.get("momentum_residual")
    if residual is not None:
        B = B.add_(local(residual))
    mat.B = B


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
    for mat in mats:
        mat.Q = None  # the fp32 copy of a bf16 Q is not needed again
    layout.orthonormalize_(mats)  # P = Orthonormalize(P)
    layout.right_(mats)  # R = B^T P
    layout.column_norms_(mats)  # ||R_:,j|| when R is split over ranks
    for mat in mats:
        _finish(mat, seed)
        mat.B = mat.P = mat.R = mat.norms = mat.shared = mat.scratch = None


def _finish(mat: DionMatrix, seed: int) -> None:
    """Error feedback, the momentum write, the new Q and the parameter update of one matrix."""
    st, step = mat.state, mat.state["step"]
    # M = B - (1 - mu) P R^T, written back in the momentum's format
    _error_feedback_(mat, stream_key(seed, mat.index, step, "momentum"))
    # Q = ColumnNormalize(R): R becomes this step's Q, the stored Q the next step's
    stored, S = local(st["Q"]), mat.long_short[1]
    Q_step = column_normalize_(mat.R, stored, mat.norms, n=S, scale=q_scale(stored.dtype, S))
    st["step"] += 1
    # X = X (1 - lr wd) - lr sqrt(m / n) P Q^T
    update_weights_(mat, Q_step, stream_key(seed, mat.index, step, "param"))


def update_weights_(mat: DionMatrix, Q_step: Tensor, key: int) -> None:
    """X = X (1 - lr wd) - lr sqrt(m / n) P Q^T, computed in fp32.

    An fp32 parameter: one fused in-place product. Another dtype: one row block of
    at most :data:`dion_lp.quant.buffer.BLOCK_NUMEL` elements at a time, written
    back with the group's ``weight_rounding`` (:func:`dion_lp.quant.weights.write_weights_`,
    random bits from ``key`` and each element's global index).
    """
    group, place = mat.group, mat.place
    m, n = place.global_shape
    scale = group["lr"] * math.sqrt(m / n)
    decay = 1.0 - group["lr"] * group["weight_decay"]
    X_rows = place.to_rows(mat.param)  # (k, row_numel): this rank's rows of the parameter
    if X_rows.dtype == torch.float32:
        X = X_rows if mat.rows_long else X_rows.T
        X.mul_(decay).addmm_(mat.P, Q_step.T, alpha=-scale)
        return
    # the rows of X are rows of P Q^T (T's rows) or of Q P^T (T's columns)
    left, right = (mat.P, Q_step) if mat.rows_long else (Q_step, mat.P)
    stochastic = group["weight_rounding"] == "stochastic"
    U = X_rows.shape[1]
    for r0, r1 in block_ranges(*X_rows.shape):
        rows = X_rows[r0:r1]
        new = torch.addmm(rows.float(), left[r0:r1], right.T, beta=decay, alpha=-scale)
        write_weights_(rows, new, stochastic=stochastic, key=key, first=(place.start + r0) * U)


def _error_feedback_(mat: DionMatrix, key: int) -> None:
    """M = B - (1 - mu) P R^T, in place on B (whole) or one row block of B at a time."""
    alpha = -(1.0 - mat.group["mu"])
    buf = QuantizedBuffer(mat.state, "momentum")
    if mat.B is not None:  # in place: the momentum itself when fp32
        mat.T.addmm_(mat.P, mat.R.T, alpha=alpha)
        _write_momentum(mat, buf, mat.B, None, key)
        return
    for r0, r1 in mat.blocks:  # B's row block: T's rows, or T's columns
        B = mat.rows(r0, r1)
        if mat.rows_long:
            B.addmm_(mat.P[r0:r1], mat.R.T, alpha=alpha)
        else:
            B.addmm_(mat.R[r0:r1], mat.P.T, alpha=alpha)
        _write_momentum(mat, buf, B, (r0, r1), key)


def _write_momentum(
    mat: DionMatrix, buf: QuantizedBuffer, B: Tensor, rows: tuple[int, int] | None, key: int
) -> None:
    """Store B (local rows ``rows``, or all) as the new momentum; keep what rounding dropped."""
    if buf.fmt == "fp32":
        return  # B is the state tensor itself, already updated in place
    stochastic = mat.group["stochastic_rounding"]
    residual = mat.state.get("momentum_residual")
    consume = residual is None  # B is dead after this write unless the residual needs it
    buf.write(B, stochastic=stochastic, key=key, row0=mat.place.start, rows=rows, consume=consume)
    if residual is not None:  # what this write dropped, added back next step
        res = local(residual)
        res = res if rows is None else res[rows[0] : rows[1]]
        res.copy_(B - buf.read(rows=rows))
