"""The sharded layout: FSDP2 / HSDP DTensor matrices, never rebuilt whole on any rank.

The parameter is split along one tensor dim over the *shard* group (N ranks);
its state rows run along that dim (:mod:`dion_lp.layouts.placement`), so in the
tall orientation T (L x S) a rank holds either a block of T's rows (long dim
sharded) or a block of T's columns (short dim sharded). The products::

    long dim sharded (B_i: k x S rows of T; Q: S x r on every rank)
        P_i = B_i Q                          local rows of P, no communication
        P   = Orthonormalize(P)              Cholesky QR on the row blocks (r x r Gram sums)
        R   = sum_i B_i^T P_i                S x r, summed over the shards in comm_dtype

    short dim sharded (T_i: L x k columns of T; Q_i: k x r rows of Q)
        P   = sum_i T_i Q_i                  L x r: reduce-scattered by row blocks (comm_dtype)
        P   = Orthonormalize(P)              Cholesky QR on the row blocks
        P   = all-gather of the row blocks   L x r (comm_dtype)
        R_i = T_i^T P                        k x r, local; column norms: r squares summed

Each P is orthonormalized once, spread over the shard ranks
(:func:`dion_lp.orthogonalize.orthonormalize_rows_`). Cholesky QR gives P up to
the signs of its columns relative to Householder QR; the signs cancel in
``P R^T`` and ``P Q^T``, so the updates agree with single-process Dion to float
rounding wherever P is well-conditioned. The orientation stays tall whatever the
sharding (unlike microsoft/dion, whose orientation follows it), so results do
not depend on how the model is sharded.

Replicas (HSDP), two ways: ``fully_shard`` over the 1-D shard mesh and
``Dion(..., process_group=<replicate group>)``: replicas keep their own momentum
and average P (or its row blocks) and R in ``comm_dtype`` before
orthonormalizing and normalizing; or native FSDP2 HSDP (a replicate x shard
mesh), whose gradients FSDP has averaged already: every replica runs the
identical sharded step. Every collective moves factors, r x r Gram matrices or
r norms, never an m x n matrix, and is counted in ``Dion.comm_stats()``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor

from ..dist.accounting import CommStats
from ..dist.collectives import all_gather_rows, reduce_scatter_rows, sum_
from ..layouts.placement import Placement
from ..orthogonalize import orthonormalize_rows_
from .local import mean_by_format_

if TYPE_CHECKING:  # the matrices the engine hands over
    from ..algorithms.dion import DionMatrix

__all__ = ["ShardedLayout", "check_replicas"]


class ShardedLayout:
    """Products, orthonormalization and norms of matrices sharing one shard group.

    Args:
        shard_group: the ranks holding the other rows of every matrix given.
        replicas: the optimizer's explicit ``process_group`` (HSDP with Dion's
            compressed exchange), or None.
        stats: where every collective is counted.
    """

    def __init__(self, shard_group: Any, replicas: Any, stats: CommStats) -> None:
        self.shard_group, self.replicas, self.stats = shard_group, replicas, stats

    def _per_format(
        self,
        mats: list[DionMatrix],
        tensors: list[Tensor],
        fn: Callable[[list[Tensor], str, list[DionMatrix]], list[Tensor] | None],
    ) -> list[Tensor]:
        """Apply ``fn`` once per wire format to the tensors of the mats using it; keep the order."""
        out = list(tensors)
        for fmt in dict.fromkeys(mat.group["comm_dtype"] for mat in mats):
            idx = [i for i, mat in enumerate(mats) if mat.group["comm_dtype"] == fmt]
            result = fn([tensors[i] for i in idx], fmt, [mats[i] for i in idx])
            if result is not None:
                for i, t in zip(idx, result, strict=True):
                    out[i] = t
        return out

    def _replica_mean_(self, tensors: list[Tensor], mats: list[DionMatrix]) -> None:
        if self.replicas is not None:
            fmts = [mat.group["comm_dtype"] for mat in mats]
            mean_by_format_(tensors, fmts, self.replicas, self.stats)

    def _shard_sum(self, fmt: str) -> Callable[[list[Tensor]], None]:
        return partial(sum_, fmt=fmt, group=self.shard_group, stats=self.stats)

    def left_(self, mats: list[DionMatrix]) -> None:
        """P = B Q: local rows (long dim sharded) or row blocks of a reduce-scattered sum."""
        shorts = [mat for mat in mats if not mat.rows_long]
        for mat in mats:
            if mat.rows_long:
                mat.P = mat.tall_times(mat.Q)
        partial_sums = [mat.tall_times(mat.Q) for mat in shorts]
        blocks = self._per_format(
            shorts,
            partial_sums,
            lambda ts, f, _: reduce_scatter_rows(ts, f, self.shard_group, self.stats),
        )
        for mat, block in zip(shorts, blocks, strict=True):
            mat.P = block
        self._replica_mean_([mat.P for mat in mats], mats)

    def orthonormalize_(self, mats: list[DionMatrix]) -> None:
        """Cholesky QR of every P on its row blocks; short-sharded P then all-gathered whole."""
        rows = [mat.long_short[0] for mat in mats]
        Ps = orthonormalize_rows_([mat.P for mat in mats], rows, self._shard_sum("fp32"))
        for mat, P in zip(mats, Ps, strict=True):
            mat.P = P
        shorts = [mat for mat in mats if not mat.rows_long]
        full = self._per_format(
            shorts,
            [mat.P for mat in shorts],
            lambda ts, f, ms: all_gather_rows(
                ts, [m.long_short[0] for m in ms], f, self.shard_group, self.stats
            ),
        )
        for mat, P in zip(shorts, full, strict=True):
            mat.P = P

    def right_(self, mats: list[DionMatrix]) -> None:
        """R = B^T P: summed over the shards (long dim sharded) or this rank's rows of R."""
        for mat in mats:
            mat.R = mat.tall_t_times(mat.P)
        longs = [mat for mat in mats if mat.rows_long]
        self._per_format(longs, [mat.R for mat in longs], lambda ts, f, _: self._shard_sum(f)(ts))
        self._replica_mean_([mat.R for mat in mats], mats)

    def column_norms_(self, mats: list[DionMatrix]) -> None:
        """Column norms of R split over the shards: r squared norms summed in fp32."""
        shorts = [mat for mat in mats if not mat.rows_long]
        squares = [mat.R.square().sum(dim=0) for mat in shorts]
        self._shard_sum("fp32")(squares)
        for mat, sq in zip(shorts, squares, strict=True):
            mat.norms = sq.sqrt()


def check_replicas(place: Placement, replicate_group: Any) -> None:
    """Raise ``ValueError`` unless ``replicate_group`` can be the replicas of this sharded param."""
    if replicate_group is None:
        return
    if place.replicate_group is not None:
        raise ValueError(
            "Invalid process_group: the parameters use native FSDP2 HSDP (a replicate x shard "
            "mesh), whose gradients FSDP already averages over the replicas; leave "
            "process_group=None, or fully_shard over the 1-D shard mesh and pass the replicate "
            "group so that Dion averages compressed factors instead"
        )
    shard = set(dist.get_process_group_ranks(place.shard_group))
    replicas = set(dist.get_process_group_ranks(replicate_group))
    if shard & replicas != {dist.get_rank()}:
        raise ValueError(
            "Invalid process_group for sharded parameters: it must hold one rank per replica "
            f"(this rank and no other rank of its shard group {sorted(shard)}), got ranks "
            f"{sorted(replicas)}; for plain FSDP leave process_group=None"
        )
