"""The local layout: whole matrices on each rank, optionally averaged over replicas.

One process, or data-parallel replicas that each hold every matrix and their
own momentum. Replicas average ``P = B Q`` and ``R = B^T P`` (the paper's
compressed exchange) in the group's ``comm_dtype``, every matrix of a phase
coalesced into one quantized mean per wire format; a matrix whose factors would
not be smaller than itself (``(m + n) r >= m n``, e.g. full rank) has its B
averaged instead, and its P and R are computed from that mean, while its
momentum keeps the local B for the error feedback, exactly as with factors.
Orthonormalization is Householder QR in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..dist.accounting import CommStats
from ..dist.collectives import quantized_mean_
from ..orthogonalize import orthonormalize

if TYPE_CHECKING:  # the matrices the engine hands over
    from ..algorithms.dion import DionMatrix

__all__ = ["LocalLayout", "mean_by_format_"]


def mean_by_format_(
    tensors: list[Any], fmts: list[str], group: Any, stats: CommStats | None
) -> None:
    """Average each tensor over ``group`` in place, one coalesced quantized mean per format."""
    by_fmt: dict[str, list[Any]] = {}
    for tensor, fmt in zip(tensors, fmts, strict=True):
        by_fmt.setdefault(fmt, []).append(tensor)
    for fmt, same in by_fmt.items():
        quantized_mean_(same, fmt, group, stats)


class LocalLayout:
    """Products, orthonormalization and norms of whole matrices (see the module docstring).

    Args:
        group: the replicas' process group, or None (one process).
        world_size: ranks in ``group`` (1: nothing is exchanged).
        stats: where the exchanges are counted.
    """

    def __init__(self, group: Any, world_size: int, stats: CommStats) -> None:
        self.group, self.world_size, self.stats = group, world_size, stats

    def exchanges_factors(self, mat: DionMatrix) -> bool:
        """Whether replicas average ``mat``'s factors (else its B, or nothing with one rank)."""
        L, S = mat.long_short
        return self.world_size > 1 and (L + S) * mat.rank < L * S

    def _mean_(self, tensors: list[Any], mats: list[DionMatrix]) -> None:
        if self.world_size > 1 and mats:
            fmts = [mat.group["comm_dtype"] for mat in mats]
            mean_by_format_(tensors, fmts, self.group, self.stats)

    def left_(self, mats: list[DionMatrix]) -> None:
        """P = B Q, averaged over the replicas."""
        whole = [mat for mat in mats if self.world_size > 1 and not self.exchanges_factors(mat)]
        for mat in whole:
            mat.shared = mat.tall_copy()
        self._mean_([mat.shared for mat in whole], whole)
        for mat in mats:
            mat.P = mat.tall_times(mat.Q) if mat.shared is None else mat.shared @ mat.Q
        factors = [mat for mat in mats if self.exchanges_factors(mat)]
        self._mean_([mat.P for mat in factors], factors)

    def orthonormalize_(self, mats: list[DionMatrix]) -> None:
        """P = Orthonormalize(P) by Householder QR (identical on every replica)."""
        for mat in mats:
            mat.P = orthonormalize(mat.P)

    def right_(self, mats: list[DionMatrix]) -> None:
        """R = B^T P, averaged over the replicas."""
        for mat in mats:
            mat.R = mat.tall_t_times(mat.P) if mat.shared is None else mat.shared.T @ mat.P
            mat.shared = None
        factors = [mat for mat in mats if self.exchanges_factors(mat)]
        self._mean_([mat.R for mat in factors], factors)

    def column_norms_(self, mats: list[DionMatrix]) -> None:
        """Nothing: every rank holds the whole R."""
