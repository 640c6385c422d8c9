"""Where a parameter's rows live: one plain tensor on this rank, or an FSDP2 DTensor's shard.

Every state buffer of a parameter is kept in rows along the parameter's *row
dim* (:mod:`dion_lp.quant.buffer`): dim 0 for a plain tensor, the sharded dim
for a DTensor, so each rank holds whole rows. A :class:`Placement` says which
rows this rank holds and how to wrap a local state tensor so that
``torch.distributed.checkpoint`` sees it sharded like the parameter (a plain
tensor needs no wrapping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..dist.dtensor import is_sharded, local

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["Placement", "placement"]


@dataclass(frozen=True)
class Placement:
    """Which rows of a parameter this rank holds.

    Attributes:
        global_shape: the parameter's full shape.
        row_dim: the dim its state rows run along (0, or the FSDP2 sharded dim).
        start, length: this rank's first global row and row count.
        mesh, shard_mesh_dim: the DeviceMesh and its sharded dim (None for a plain tensor).
        shard_group, shard_size, shard_rank: the ranks holding the other rows.
        replicate_group, replicate_size: native HSDP's replicate mesh dim (None, 1 if none).
    """

    global_shape: tuple[int, ...]
    row_dim: int
    start: int
    length: int
    mesh: Any = None
    shard_mesh_dim: int = 0
    shard_group: Any = None
    shard_size: int = 1
    shard_rank: int = 0
    replicate_group: Any = None
    replicate_size: int = 1

    @property
    def sharded(self) -> bool:
        """Whether the parameter is a DTensor (its state is kept as DTensors)."""
        return self.mesh is not None

    @property
    def rows(self) -> int:
        """Global rows: the extent of ``row_dim``."""
        return self.global_shape[self.row_dim] if self.global_shape else 1

    @property
    def row_numel(self) -> int:
        """Elements per row (product of the other dims)."""
        return math.prod(self.global_shape) // max(self.rows, 1)

    def wrap(self, x: Tensor, global_shape: tuple[int, int], sharded: bool = True) -> Any:
        """A local 2-D state tensor as stored: a DTensor of ``global_shape`` (rows split like
        the parameter's when ``sharded``, else replicated) for a DTensor parameter, else ``x``."""
        if not self.sharded:
            return x
        placements: list[Any] = [Replicate()] * self.mesh.ndim
        if sharded:
            placements[self.shard_mesh_dim] = Shard(0)
        return DTensor.from_local(
            x,
            self.mesh,
            tuple(placements),
            run_check=False,
            shape=torch.Size(global_shape),
            stride=(global_shape[1], 1),
        )

    def to_rows(self, x: Tensor) -> Tensor:
        """This rank's part of a tensor shaped like the parameter, as ``(length, row_numel)``
        rows along ``row_dim`` (a view when possible)."""
        x = local(x)
        if x.ndim == 0:
            return x.reshape(1, 1)
        if x.ndim == 2:
            return x if self.row_dim == 0 else x.T
        return x.movedim(self.row_dim, 0).reshape(x.shape[self.row_dim], -1)

    def from_rows(self, y: Tensor, local_shape: torch.Size) -> Tensor:
        """Inverse of :meth:`to_rows`: ``(length, row_numel)`` rows shaped ``local_shape``."""
        if len(local_shape) == 2:
            return y if self.row_dim == 0 else y.T
        if len(local_shape) < 2:
            return y.reshape(local_shape)
        d = self.row_dim
        moved = (local_shape[d], *[s for i, s in enumerate(local_shape) if i != d])
        return y.reshape(moved).movedim(0, d)


def placement(p: Tensor) -> Placement:
    """The :class:`Placement` of parameter ``p`` (plain tensor or FSDP2 DTensor).

    Raises:
        NotImplementedError: a DTensor placement sharded Dion does not support.
    """
    if not is_sharded(p):
        shape = tuple(p.shape)
        return Placement(global_shape=shape, row_dim=0, start=0, length=shape[0] if shape else 1)
    return _sharded_placement(p)


def _sharded_placement(p: Any) -> Placement:
    """The :class:`Placement` of a DTensor parameter.

    Supported placements: exactly one ``Shard(d)`` mesh dimension (FSDP2), plus at
    most one ``Replicate()`` mesh dimension (HSDP).

    Raises:
        NotImplementedError: any other placement (FSDP + TP, strided or partial
            placements, several replicate dimensions), naming what is supported.
    """
    placements = tuple(p.placements)
    shards = [i for i, pl in enumerate(placements) if pl.is_shard()]
    others = [i for i, pl in enumerate(placements) if not pl.is_shard()]
    plain = all(type(placements[i]) is Shard for i in shards)
    if len(shards) != 1 or not plain or any(not placements[i].is_replicate() for i in others):
        raise NotImplementedError(
            f"sharded Dion supports a parameter sharded along one tensor dimension over one "
            f"mesh dimension (FSDP2 Shard(0) or Shard(1)), optionally replicated over one "
            f"more (HSDP); got placements {placements}"
        )
    if len(others) > 1:
        raise NotImplementedError(
            f"sharded Dion supports at most one replicate mesh dimension (HSDP); got {placements}"
        )
    mesh, mesh_dim = p.device_mesh, shards[0]
    shard_dim = placements[mesh_dim].dim
    group = mesh.get_group(mesh_dim)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = p.shape[shard_dim]
    chunk = -(-rows // size)
    start = min(rank * chunk, rows)
    length = max(0, min(chunk, rows - start))
    if p.to_local().shape[shard_dim] != length:
        raise NotImplementedError(
            f"sharded Dion expects torch.chunk-style shards ({length} of {rows} rows on shard "
            f"rank {rank}), got a local shard of shape {tuple(p.to_local().shape)}"
        )
    rep_group = mesh.get_group(others[0]) if others else None
    return Placement(
        mesh=mesh,
        shard_mesh_dim=mesh_dim,
        row_dim=shard_dim,
        shard_group=group,
        shard_size=size,
        shard_rank=rank,
        replicate_group=rep_group,
        replicate_size=dist.get_world_size(rep_group) if others else 1,
        global_shape=tuple(p.shape),
        start=start,
        length=length,
    )
