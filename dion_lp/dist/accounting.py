"""Wire bytes: the counter every collective adds to, and the closed forms benchmarks use.

Byte convention (nccl-tests "bus bandwidth"): a rank is charged, per collective,

    all_reduce                              2 (N-1)/N * S
    all_gather, reduce_scatter, all_to_all  (N-1)/N * S

where S is the byte size of the whole collective buffer: the all-reduce buffer,
the all-gather output, the reduce-scatter input, the all-to-all send buffer (all
N rows, scales included). Every buffer :mod:`dion_lp.dist.collectives` sends is
N equal rows of P bytes, so the charge is exact: (N-1) P, the bytes the rank
sends to the other ranks. :func:`collective_bytes` rounds up for the rare caller
whose buffer does not split into N equal parts.

A wire row (:func:`wire_row`) is ``[scales: float32 | codes]`` in one uint8 row;
its element count is rounded up so that its byte size is a multiple of 4, and
the scales of every row of an ``(N, P)`` buffer are 4-byte aligned views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..options import dion_rank
from ..quant.codecs import bytes_per_element, scale_count
from ..quant.formats import SCALE_NBYTES, WIRE_FORMATS

__all__ = [
    "COLLECTIVE_KINDS",
    "DEFAULT_BLOCK_SIZE",
    "CommStats",
    "WireRow",
    "collective_bytes",
    "mean_bytes",
    "rows_bytes",
    "sharded_step_bytes",
    "wire_row",
]

COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")

# Elements per scale of the fp8 wire formats. Small enough that an outlier only
# coarsens its own 128 neighbours (the rest keep their 2^-4 / 2^-3 relative
# precision), large enough that the fp32 scales cost 4/128 = 3.1% of the fp8 payload.
DEFAULT_BLOCK_SIZE = 128


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {minimum}")


def check_wire_format(fmt: Any) -> None:
    """Raise ``ValueError`` unless ``fmt`` is a wire format of the registry."""
    if not isinstance(fmt, str) or fmt not in WIRE_FORMATS:
        raise ValueError(f"Invalid fmt: {fmt!r}; expected one of {', '.join(WIRE_FORMATS)}")


@dataclass(frozen=True)
class WireRow:
    """One uint8 row on the wire: ``numel`` codes (padded) behind ``scale_count`` scales."""

    numel: int
    scale_count: int
    nbytes: int

    @property
    def scale_nbytes(self) -> int:
        return SCALE_NBYTES * self.scale_count


def wire_row(numel: int, fmt: str, block_size: int = DEFAULT_BLOCK_SIZE) -> WireRow:
    """The :class:`WireRow` carrying ``numel`` elements in ``fmt``."""
    element = bytes_per_element(fmt)
    align = max(1, SCALE_NBYTES // element)
    padded = -(-numel // align) * align
    count = scale_count(padded, block_size, fmt)
    return WireRow(padded, count, SCALE_NBYTES * count + element * padded)


def collective_bytes(kind: str, buffer_nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in one collective over a buffer of S bytes among N ranks.

    Returns:
        ``2 (N-1) S / N`` for ``"all_reduce"``, ``(N-1) S / N`` otherwise; exact
        when N divides S (always, for the buffers of dion_lp), else rounded up.
    """
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}")
    _check_int("world_size", world_size, 1)
    _check_int("buffer_nbytes", buffer_nbytes, 0)
    factor = 2 if kind == "all_reduce" else 1
    return -(-factor * (world_size - 1) * buffer_nbytes // world_size)


def mean_bytes(numel: int, fmt: str, world_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Exact bytes one rank sends in a quantized mean of ``numel`` elements in total.

    ``2 (N-1) P``: an all-to-all and an all-gather of N rows of P bytes, the
    :func:`wire_row` of ``ceil(numel / N)`` elements. Zero when N = 1 or numel = 0.
    """
    check_wire_format(fmt)
    _check_int("block_size", block_size, 1)
    _check_int("world_size", world_size, 1)
    _check_int("numel", numel, 0)
    if world_size == 1 or numel == 0:
        return 0
    return 2 * (world_size - 1) * wire_row(-(-numel // world_size), fmt, block_size).nbytes


def rows_bytes(shapes: Sequence[tuple[int, int]], fmt: str, world_size: int) -> int:
    """Bytes one rank sends reduce-scattering and then all-gathering ``(L, r)`` tensors by rows."""
    N = world_size
    if N == 1 or not shapes:
        return 0
    row = wire_row(sum(-(-L // N) * r for L, r in shapes), fmt)
    return collective_bytes("all_to_all", N * row.nbytes, N) + collective_bytes(
        "all_gather", N * row.nbytes, N
    )


class CommStats:
    """Wire bytes this rank sent, by collective kind and by optimizer step.

    Counts follow :func:`collective_bytes`, so they are integers and exactly
    reproducible. ``end_step()`` closes a step: ``last_step`` is what it sent.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self.bytes_sent = 0
        self.steps = 0
        self.last_step = 0
        self.step_bytes = 0  # recorded since the last end_step()
        self.by_kind: dict[str, int] = dict.fromkeys(COLLECTIVE_KINDS, 0)

    def record(self, kind: str, nbytes: int) -> None:
        """Add ``nbytes`` (already in the convention) to ``kind``."""
        if kind not in COLLECTIVE_KINDS:
            raise ValueError(
                f"Invalid kind: {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}"
            )
        _check_int("nbytes", nbytes, 0)
        self.bytes_sent += nbytes
        self.step_bytes += nbytes
        self.by_kind[kind] += nbytes

    def record_collective(self, kind: str, buffer_nbytes: int, world_size: int) -> None:
        """Record one collective over a buffer of ``buffer_nbytes`` bytes (S) among N ranks."""
        self.record(kind, collective_bytes(kind, buffer_nbytes, world_size))

    def end_step(self) -> None:
        """Close the current optimizer step."""
        self.last_step = self.step_bytes
        self.step_bytes = 0
        self.steps += 1

    def as_dict(self) -> dict[str, Any]:
        """``{"bytes_sent": int, "steps": int, "last_step": int, "by_kind": {kind: int}}``."""
        return {
            "bytes_sent": self.bytes_sent,
            "steps": self.steps,
            "last_step": self.last_step,
            "by_kind": dict(self.by_kind),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and a dict of ints (loads with ``torch.load(weights_only=True)``)."""
        return {**self.as_dict(), "step_bytes": self.step_bytes}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore counters saved by :meth:`state_dict`."""
        missing = {"bytes_sent", "steps", "last_step", "by_kind"} - set(state_dict)
        if missing:
            raise ValueError(f"Invalid state_dict: missing {sorted(missing)}")
        unknown = set(state_dict["by_kind"]) - set(COLLECTIVE_KINDS)
        if unknown:
            raise ValueError(f"Invalid state_dict: unknown collective kinds {sorted(unknown)}")
        self.bytes_sent = int(state_dict["bytes_sent"])
        self.steps = int(state_dict["steps"])
        self.last_step = int(state_dict["last_step"])
        self.step_bytes = int(state_dict.get("step_bytes", 0))
        self.by_kind = dict.fromkeys(COLLECTIVE_KINDS, 0)
        self.by_kind.update({k: int(v) for k, v in state_dict["by_kind"].items()})


def sharded_step_bytes(
    matrices: Sequence[tuple[int, int, int]],
    shard_size: int,
    comm_dtype: str,
    rank_fraction: float,
    rank_multiple_of: int = 1,
) -> dict[str, int]:
    """Wire bytes one rank sends per step for sharded Dion matrices of one shard group.

    Exactly what the sharded layout records in ``comm_stats()`` without replicas and
    without the third orthonormalization pass (taken only for ill-conditioned P);
    the per-step agreement on non-finite gradients is not included.

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
    long_sr, short, triangles, short_r = 0, [], 0, 0
    for m, n, shard_dim in matrices:
        r = dion_rank(m, n, rank_fraction, rank_multiple_of)
        triangles += r * (r + 1) // 2  # the upper triangle of each r x r Gram matrix
        if shard_dim == (1 if m < n else 0):  # long dim sharded: R (S x r) summed
            long_sr += min(m, n) * r
        else:  # short dim sharded: P (L x r) reduce-scattered and all-gathered by row blocks
            short.append((max(m, n), r))
            short_r += r
    factors = mean_bytes(long_sr, comm_dtype, N) + rows_bytes(short, comm_dtype, N)
    gram = 2 * mean_bytes(triangles, "fp32", N)
    norms = mean_bytes(short_r, "fp32", N)
    return {"factors": factors, "gram": gram, "norms": norms, "total": factors + gram + norms}
