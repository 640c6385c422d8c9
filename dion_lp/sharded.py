"""Sharded Dion (FSDP2 / HSDP DTensor parameters) that never rebuilds a full matrix.

Dion works on the tall orientation T (L x S, L >= S) of each m x n matrix, as in
:mod:`dion_lp.dion`, so sharded Dion computes exactly what single-process Dion
computes. The parameter is split along one tensor dim over the *shard* group
(N ranks); in T that dim is either the long one or the short one. With ``B`` the
rank's momentum + gradient in the shard-major layout of
:mod:`dion_lp.sharded_state` (k rows of the sharded dim):

long dim sharded (B: k x S, rows of T; Q: S x r replicated)::

    P_i = B Q                          local rows of P           (no communication)
    P = Orthonormalize(P)              distributed Cholesky QR   (r x r Gram sums, fp32)
    R = sum_i B^T P_i                  S x r sum over the shards (comm_dtype)
    Q = ColumnNormalize(R)             local
    M = B - (1 - mu) P_i R^T ; X_i -= lr sqrt(m/n) P_i Q^T

short dim sharded (B: k x L, columns of T; Q_i: k x r, rows of Q sharded like X)::

    P = sum_i B^T Q_i                  L x r: reduce-scatter by row blocks (comm_dtype)
    P = Orthonormalize(P)              on the row blocks (r x r Gram sums, fp32)
    P = all-gather of the blocks       L x r (comm_dtype)
    R_i = B P                          k x r local rows of R
    Q_i = R_i / ||R_:,j||              column norms: r squared norms summed (fp32)
    M = B - (1 - mu) R_i P^T ; X_i -= lr sqrt(m/n) (P Q_i^T)^T

Each P is orthonormalized once, spread over the shard ranks: CholeskyQR2 on its
row blocks (two all-reduced r x r Gram matrices), with a shifted first pass and
further passes when P is ill-conditioned or rank deficient (shifted CholeskyQR3,
Fukaya et al. 2020); see :func:`orthonormalize_rows_`. Cholesky QR gives P up to
the signs of its columns relative to Householder QR; the signs cancel in
``P R^T`` and ``P Q^T``, so the updates agree with single-process Dion to float
rounding wherever P is well-conditioned.

Replicas (HSDP), two ways:

- Dion's compressed exchange (the paper's): ``fully_shard`` over the 1-D shard
  sub-mesh and ``Dion(..., process_group=<replicate group>, grad_sync=True)``.
  Each replica keeps its own gradients and momentum; replicas average P (or its
  row blocks) and R with :func:`dion_lp.comm.quantized_mean_`, as replicated Dion
  does, before orthonormalizing and normalizing, and the element-wise params'
  gradients (``grad_sync``). No gradient crosses the replicate dimension.
- Native FSDP2 HSDP (``fully_shard`` over a replicate x shard mesh): FSDP
  all-reduces the gradients over the replicas (its ``set_requires_all_reduce(False)``
  leaves them unset, so it cannot hand that exchange to Dion); every replica then
  runs the identical sharded step, with no further exchange.

Orientation differs from microsoft/dion: there the orientation follows the
sharding (the FSDP-sharded dim always goes to Q's side); here it stays tall, as
in unsharded Dion, so results do not depend on how the model is sharded.

Every collective moves factors (L r, S r), r x r Gram matrices or r norms, never
an m x n matrix (with r < min(m, n) each is smaller than one; at full rank the
L x r factor has the matrix's size), and every one is counted in
``Dion.comm_stats()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import (
    CommStats,
    collective_bytes,
    mean_bytes,
    quantized_mean_,
)
from .options import dion_rank
from .orthogonalize import column_normalize, negligible_columns
from .sharded_comm import _sum_, _wire_layout, all_gather_rows, reduce_scatter_rows
from .sharded_state import (
    ShardSpec,
    dcp_state_dict,
    from_shard_major,
    init_param_state,
    init_state,
    is_sharded,
    load_dcp_state_dict,
    local,
    long_sharded,
    read_buffer,
    rounding_generator,
    scalar_step_,
    shard_spec,
    to_shard_major,
    write_buffer,
)

__all__ = [
    "all_gather_rows",
    "dcp_state_dict",
    "init_state",
    "is_sharded",
    "load_dcp_state_dict",
    "orthonormalize_rows_",
    "reduce_scatter_rows",
    "sharded_step_",
    "step_bytes",
    "synchronize_momenta_",
]

_U = 2.0**-24  # fp32 unit roundoff
_MAX_DIAG_RATIO = 300.0  # Cholesky factor of P^T P beyond this: kappa(P) too large for CholQR2
_MAX_PASSES = 5


# ----------------------------------------------------------- orthonormalization
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


def _gram_sums(blocks: list[Tensor], group: Any, stats: CommStats | None) -> list[Tensor]:
    """``sum over group of P^T P`` for each block, in one fp32 collective of upper triangles."""
    uppers, index = [], []
    for P in blocks:
        r = P.shape[1]
        rows, cols = torch.triu_indices(r, r, device=P.device)
        index.append((rows, cols))
        uppers.append((P.T @ P)[rows, cols])
    _sum_(uppers, "fp32", group, stats)
    grams = []
    for P, (rows, cols), upper in zip(blocks, index, uppers, strict=True):
        G = torch.zeros(P.shape[1], P.shape[1], dtype=torch.float32, device=P.device)
        G[rows, cols] = upper
        G[cols, rows] = upper
        grams.append(G)
    return grams


def orthonormalize_rows_(
    blocks: list[Tensor], rows: Sequence[int], group: Any, stats: CommStats | None
) -> list[Tensor]:
    """Orthonormalize row-sharded matrices without gathering them (iterated Cholesky QR).

    Each pass sums the r x r Gram matrices ``G = P^T P`` (upper triangles) of all the still
    active matrices over ``group`` (one fp32 collective), factors ``G = R^T R``, sets
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
            ``group`` is the full ``(rows_i, r_i)`` matrix. Replaced in the list.
        rows: the full row count of each matrix.
        group: the ranks holding the other rows.

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
        grams = _gram_sums([blocks[i] for i in active], group, stats)
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


# ------------------------------------------------------------------------ step
@dataclass
class _Mat:
    """One sharded Dion matrix during a step (shapes in the docstring's notation)."""

    param: Tensor
    grad: Tensor  # fp32, shard-major (k x U)
    group: dict[str, Any]
    state: dict[str, Any]
    spec: ShardSpec
    index: int
    long: bool  # long dim sharded
    B: Tensor | None = None  # k x U fp32 (the state itself for fp32 momentum)
    Q: Tensor | None = None  # S x r, or k x r
    P: Tensor | None = None  # k x r; or own row block, then L x r
    R: Tensor | None = None  # S x r; or k x r
    norms: Tensor | None = None  # (r,) column norms of R, short dim sharded

    @property
    def fmt(self) -> str:
        return self.group["comm_dtype"]


def _per_fmt(
    mats: list[_Mat], tensors: list[Tensor], fn: Callable[[list[Tensor], str], list[Tensor] | None]
) -> list[Tensor]:
    """Apply ``fn`` once per wire format to the tensors of the mats using it; keep the order."""
    out = list(tensors)
    fmts = dict.fromkeys(mat.fmt for mat in mats)
    for fmt in fmts:
        idx = [i for i, mat in enumerate(mats) if mat.fmt == fmt]
        result = fn([tensors[i] for i in idx], fmt)
        if result is not None:
            for i, t in zip(idx, result, strict=True):
                out[i] = t
    return out


def _dion_partition_(mats: list[_Mat], stats: CommStats, seed: int, rg: Any) -> None:
    """One step of matrices sharing a shard group (``rg``: replicas, or None); coalesced."""
    sg = mats[0].spec.shard_group
    longs = [mat for mat in mats if mat.long]
    shorts = [mat for mat in mats if not mat.long]
    for mat in mats:  # B = M + G
        B = read_buffer(mat.state, "momentum")
        residual = mat.state.get("momentum_residual")
        if residual is not None:
            B = B.add_(local(residual))
        mat.B = B.add_(mat.grad)
        mat.Q = local(mat.state["Q"]).float()
    # P = B Q: local rows (long sharded) or partial sums reduce-scattered by rows
    for mat in longs:
        mat.P = mat.B @ mat.Q
    partial = [mat.B.T @ mat.Q for mat in shorts]
    blocks = _per_fmt(shorts, partial, lambda ts, f: reduce_scatter_rows(ts, f, sg, stats))
    for mat, block in zip(shorts, blocks, strict=True):
        mat.P = block
    if rg is not None:
        _per_fmt(mats, [mat.P for mat in mats], lambda ts, f: quantized_mean_(ts, f, rg, stats))
    rows = [mat.spec.rows if mat.long else mat.spec.row_numel for mat in mats]
    P_rows = orthonormalize_rows_([mat.P for mat in mats], rows, sg, stats)
    for mat, P in zip(mats, P_rows, strict=True):
        mat.P = P
    full = _per_fmt(
        shorts,
        [mat.P for mat in shorts],
        lambda ts, f: all_gather_rows(
            ts, [t.spec.row_numel for t in shorts if t.fmt == f], f, sg, stats
        ),
    )
    for mat, P in zip(shorts, full, strict=True):
        mat.P = P
    # R = B^T P: summed over the shards (long sharded) or local rows of R
    for mat in longs:
        mat.R = mat.B.T @ mat.P
    _per_fmt(longs, [mat.R for mat in longs], lambda ts, f: _sum_(ts, f, sg, stats))
    for mat in shorts:
        mat.R = mat.B @ mat.P
    if rg is not None:
        _per_fmt(mats, [mat.R for mat in mats], lambda ts, f: quantized_mean_(ts, f, rg, stats))
    squares = [mat.R.square().sum(dim=0) for mat in shorts]
    _sum_(squares, "fp32", sg, stats)
    for mat, sq in zip(shorts, squares, strict=True):
        mat.norms = sq.sqrt()
    for mat in mats:
        _finish(mat, seed)
        mat.B = mat.P = mat.R = mat.Q = None


def _finish(mat: _Mat, seed: int) -> None:
    """Error feedback, new Q and the parameter update of one matrix (all local)."""
    group, st, spec = mat.group, mat.state, mat.spec
    B, P, R = mat.B, mat.P, mat.R
    alpha = -(1.0 - group["mu"])
    if mat.long:  # M = B - (1 - mu) P_i R^T ; update rows P_i Q^T
        B.addmm_(P, R.T, alpha=alpha)
        Q_step, Q_next = column_normalize(R, mat.Q)
        update = P @ Q_step.T
    else:  # M = B - (1 - mu) R_i P^T ; update rows Q_i P^T
        B.addmm_(R, P.T, alpha=alpha)
        nonzero = ~negligible_columns(mat.norms, spec.rows)  # as column_normalize does
        safe = torch.where(nonzero, mat.norms, torch.ones_like(mat.norms))
        Q_step = torch.where(nonzero, R / safe, torch.zeros_like(R))
        Q_next = torch.where(nonzero, Q_step, mat.Q)
        update = Q_step @ P.T
    if st["momentum_sharded"]["fmt"] != "fp32":
        stochastic = group["stochastic_rounding"]
        gen = (
            rounding_generator(seed, mat.index, st["step"], spec, B.device) if stochastic else None
        )
        write_buffer(st, "momentum", B, stochastic=stochastic, generator=gen)
        residual = st.get("momentum_residual")
        if residual is not None:
            local(residual).copy_(B - read_buffer(st, "momentum"))
    local(st["Q"]).copy_(Q_next)
    st["step"] += 1
    X = local(mat.param)
    m, n = spec.global_shape
    scale = group["lr"] * math.sqrt(m / n)
    _apply_(X, from_shard_major(update, spec.shard_dim, X.shape), group, scale)


def _apply_(X: Tensor, update: Tensor, group: dict[str, Any], scale: float) -> None:
    """X = X (1 - lr wd) - scale update, in fp32, written in X's dtype."""
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if X.dtype == torch.float32:
        X.mul_(decay).add_(update, alpha=-scale)
    else:
        X.copy_(X.float().mul_(decay).add_(update, alpha=-scale))


def sharded_step_(
    items: list[tuple[dict[str, Any], Tensor, Tensor]],
    states: dict[Tensor, dict[str, Any]],
    *,
    seed: int,
    param_index: dict[int, int],
    stats: CommStats,
    grad_sync: bool,
    replicate_group: Any = None,
) -> None:
    """One optimizer step of every DTensor parameter in ``items`` (called by ``Dion.step``).

    Args:
        items: ``(group, param, fp32 grad)`` of the DTensor params to step.
        states: the optimizer's per-parameter state (created here on first use).
        seed: the optimizer's seed (Q and stochastic rounding).
        param_index: ``id(param) -> index`` (seeds each Q like unsharded Dion).
        stats: where every collective is counted.
        grad_sync: average the element-wise params' gradients over ``replicate_group``.
        replicate_group: the optimizer's explicit ``process_group``: replicas of a model
            sharded over a 1-D mesh, which average factors (and, with ``grad_sync``,
            the element-wise gradients) over it; None: no replicas, or native FSDP2
            HSDP, whose gradients FSDP has averaged over the replicas already.
    """
    mats: list[_Mat] = []
    scalars: list[tuple[dict[str, Any], Tensor, Tensor, ShardSpec]] = []
    for group, p, grad in items:
        st = states[p]
        index = param_index[id(p)]
        if not st:
            init_param_state(p, group, st, seed=seed, index=index)
        spec = shard_spec(p)
        _check_replicas(spec, replicate_group)
        if group["algorithm"] != "dion":
            scalars.append((group, p, local(grad).float(), spec))
            continue
        G = to_shard_major(local(grad).float(), spec.shard_dim)
        mats.append(_Mat(p, G, group, st, spec, index, long=long_sharded(spec)))
    if grad_sync and replicate_group is not None:
        by_fmt: dict[str, list[Tensor]] = {}
        for group, _, grad, _ in scalars:
            fmt = "fp32" if group["comm_dtype"] == "fp32" else "bf16"
            by_fmt.setdefault(fmt, []).append(grad)
        for fmt, grads in by_fmt.items():
            quantized_mean_(grads, fmt, replicate_group, stats)
    for group, p, grad, _ in scalars:
        scalar_step_(p, grad, group, states[p])
    partitions: dict[tuple[int, ...], list[_Mat]] = {}
    for mat in mats:
        key = tuple(dist.get_process_group_ranks(mat.spec.shard_group))
        partitions.setdefault(key, []).append(mat)
    for part in partitions.values():
        _dion_partition_(part, stats, seed, replicate_group)


def _check_replicas(spec: ShardSpec, replicate_group: Any) -> None:
    """Raise ``ValueError`` unless ``replicate_group`` can be the replicas of this sharded param."""
    if replicate_group is None:
        return
    if spec.replicate_group is not None:
        raise ValueError(
            "Invalid process_group: the parameters use native FSDP2 HSDP (a replicate x shard "
            "mesh), whose gradients FSDP already averages over the replicas; leave "
            "process_group=None, or fully_shard over the 1-D shard mesh and pass the replicate "
            "group so that Dion averages compressed factors instead"
        )
    shard = set(dist.get_process_group_ranks(spec.shard_group))
    replicas = set(dist.get_process_group_ranks(replicate_group))
    if shard & replicas != {dist.get_rank()}:
        raise ValueError(
            "Invalid process_group for sharded parameters: it must hold one rank per replica "
            f"(this rank and no other rank of its shard group {sorted(shard)}), got ranks "
            f"{sorted(replicas)}; for plain FSDP leave process_group=None"
        )


def synchronize_momenta_(
    param_groups: list[dict[str, Any]],
    states: dict[Tensor, dict[str, Any]],
    replicate_group: Any,
    stats: CommStats,
) -> None:
    """Replace the Dion momenta of sharded params by their mean over ``replicate_group``.

    Each replica keeps its own momentum (only means enter the updates); DCP saves
    one replica's copy, so call this (through ``Dion.synchronize_for_checkpoint``)
    before saving. Plain FSDP and native HSDP states are single global momenta
    already (``replicate_group`` None): nothing is sent.
    """
    if replicate_group is None:
        return
    entries: list[tuple[dict[str, Any], Tensor]] = []
    for group in param_groups:
        if group["algorithm"] != "dion":
            continue
        for p in group["params"]:
            st = states.get(p)
            if st and is_sharded(p):
                entries.append((st, read_buffer(st, "momentum").clone()))
    quantized_mean_([M for _, M in entries], "fp32", replicate_group, stats)
    for st, M in entries:
        write_buffer(st, "momentum", M, stochastic=False, generator=None)


def step_bytes(
    matrices: Sequence[tuple[int, int, int]],
    shard_size: int,
    comm_dtype: str,
    rank_fraction: float,
    rank_multiple_of: int = 1,
) -> dict[str, int]:
    """Wire bytes one rank sends per step for sharded Dion matrices (bus-bandwidth convention).

    Exactly what :func:`sharded_step_` records in ``comm_stats()`` for matrices that
    share one shard group of ``shard_size`` ranks, without replicas and without the
    third orthonormalization pass (taken only for ill-conditioned P). The
    optimizer's per-step agreement on non-finite gradients is not included.

    Args:
        matrices: ``(m, n, shard_dim)`` of each matrix.
        shard_size: N.
        comm_dtype: wire format of the factors.
        rank_fraction, rank_multiple_of: as in :class:`dion_lp.Dion`.

    Returns:
        ``{"factors": P and R bytes, "gram": Gram-matrix bytes, "norms": column-norm
        bytes, "total": their sum}``.
    """
    N = shard_size
    if N == 1:
        return {"factors": 0, "gram": 0, "norms": 0, "total": 0}
    long_sr, short_lr, triangles, short_r = 0, 0, 0, 0
    for m, n, shard_dim in matrices:
        r = dion_rank(m, n, rank_fraction, rank_multiple_of)
        triangles += r * (r + 1) // 2  # the upper triangle of each r x r Gram matrix
        if shard_dim == (1 if m < n else 0):  # long dim sharded: R (S x r) summed
            long_sr += min(m, n) * r
        else:  # short dim sharded: P (L x r) reduce-scattered and all-gathered by row blocks
            short_lr += -(-max(m, n) // N) * r
            short_r += r
    factors = mean_bytes(long_sr, comm_dtype, N)
    if short_lr:
        row = _wire_layout(short_lr, comm_dtype)[2]
        factors += collective_bytes("all_to_all", N * row, N)
        factors += collective_bytes("all_gather", N * row, N)
    gram = 2 * mean_bytes(triangles, "fp32", N)
    norms = mean_bytes(short_r, "fp32", N)
    return {"factors": factors, "gram": gram, "norms": norms, "total": factors + gram + norms}
