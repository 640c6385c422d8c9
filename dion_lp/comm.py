"""Quantized mean over a process group, and wire-byte accounting.

Never sum in 8 bits. :func:`quantized_mean_` averages a list of fp32 tensors
over a process group in two phases, a reduce-scatter built from an all-to-all
followed by an all-gather:

1. All tensors are flattened into ONE fp32 buffer (so a whole optimizer phase is
   one round of communication, not one per tensor), padded and split into N
   equal chunks (N = world size). Each rank quantizes every chunk with
   per-block scales (blocks never straddle a chunk).
2. All-to-all: rank j receives chunk j from every rank (codes and scales packed
   into one uint8 row per destination; fp8 codes travel as ``uint8`` views
   because gloo has no fp8 type).
3. Rank j decodes the chunks it received, sums them in fp32 in rank order
   (its own chunk enters unquantized: it never left the device), divides by N
   and re-quantizes the mean (round to nearest).
4. All-gather of the re-quantized chunks (one uint8 row per rank); every rank
   decodes the same bytes, so every rank ends with bitwise identical results.

``"fp32"`` takes the same path with an identity codec rather than a plain
``all_reduce``: the summation order is fixed (rank 0, 1, ...), so results are
bitwise identical on every rank whatever algorithm the backend uses, the code
path is the one the low-precision formats use, and the wire volume equals that of
a ring all-reduce, 2 (N-1)/N * S.

Byte convention (nccl-tests "bus bandwidth"): a rank is charged, per collective,

    all_reduce                            2 (N-1)/N * S
    all_gather, reduce_scatter, all_to_all  (N-1)/N * S

where S is the byte size of the whole collective buffer: the all-reduce buffer,
the all-gather output, the reduce-scatter input, the all-to-all send buffer (all
N chunks, scales included). Every buffer this module sends is N equal chunks of P
bytes, so the charge is exact: (N-1) P, the bytes the rank actually sends to the
other ranks (what it "sends" to itself is not counted). :func:`collective_bytes`
rounds up for the rare caller whose buffer does not split into N equal parts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import quant

__all__ = [
    "COLLECTIVE_KINDS",
    "COMM_FORMATS",
    "DEFAULT_BLOCK_SIZE",
    "CollectiveError",
    "CommStats",
    "collective",
    "collective_bytes",
    "mean_bytes",
    "quantized_mean_",
]

COMM_FORMATS = ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2")
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")

# Elements per scale of the fp8 wire formats. Small enough that an outlier only
# coarsens its own 128 neighbours (the rest keep their 2^-4 / 2^-3 relative
# precision), large enough that the fp32 scales cost 4/128 = 3.1% of the fp8 payload.
DEFAULT_BLOCK_SIZE = 128

_SCALE_BYTES = 4  # scales are float32
_CODE_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died, hung past the timeout, or the group broke.

    Raised (from the backend's own error, kept as ``__cause__``) by every
    collective dion_lp issues, on every surviving rank, within the process
    group's timeout. The step that raised did not complete: restart every rank
    from the last checkpoint.
    """


@contextmanager
def collective(what: str, group: Any) -> Iterator[None]:
    """Run one collective; turn a backend failure into a :class:`CollectiveError`.

    Args:
        what: names the collective in the message, e.g. "all_to_all of a quantized mean".
        group: the process group it runs on (None: the default group).
    """
    start = time.monotonic()
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, CollectiveError):
            raise
        elapsed = time.monotonic() - start
        try:
            rank, world = dist.get_rank(group), dist.get_world_size(group)
        except RuntimeError:  # the group itself is gone
            rank, world = "?", "?"
        raise CollectiveError(
            f"dion_lp: {what} failed on rank {rank} of {world} after {elapsed:.1f} s: "
            f"{str(err).strip()} -- a peer rank has probably died or stopped calling "
            "collectives; ranks wait at most the process group's timeout "
            "(init_process_group(timeout=...)). This step did not complete: restart every "
            "rank from the last checkpoint."
        ) from err


def _check_fmt(fmt: Any) -> None:
    if not isinstance(fmt, str) or fmt not in COMM_FORMATS:
        raise ValueError(f"Invalid fmt: {fmt!r}; expected one of {', '.join(COMM_FORMATS)}")


def _check_block_size(block_size: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"Invalid block_size: {block_size!r}; expected an integer >= 1")


def _check_world_size(world_size: Any) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r}; expected an integer >= 1")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def collective_bytes(kind: str, buffer_nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in one collective, by the nccl-tests bus-bandwidth convention.

    Args:
        kind: one of :data:`COLLECTIVE_KINDS`.
        buffer_nbytes: S, the byte size of the whole buffer (all-reduce buffer,
            all-gather output, reduce-scatter input, all-to-all send buffer).
        world_size: N, ranks in the collective.

    Returns:
        ``2 (N-1) S / N`` for ``"all_reduce"``, ``(N-1) S / N`` otherwise; exact
        when N divides S (always, for the buffers of this module), else rounded up.
    """
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}")
    _check_world_size(world_size)
    if isinstance(buffer_nbytes, bool) or not isinstance(buffer_nbytes, int) or buffer_nbytes < 0:
        raise ValueError(f"Invalid buffer_nbytes: {buffer_nbytes!r}; expected an integer >= 0")
    factor = 2 if kind == "all_reduce" else 1
    return _ceil_div(factor * (world_size - 1) * buffer_nbytes, world_size)


class CommStats:
    """Wire bytes this rank sent, by collective kind and by optimizer step.

    Counts follow :func:`collective_bytes` (nccl-tests bus-bandwidth convention,
    scales included), so they are integers and exactly reproducible:
    ``quantized_mean_`` of ``numel`` elements adds :func:`mean_bytes` bytes.
    ``end_step()`` closes a step: ``last_step`` is what the closed step sent.
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
        """Add ``nbytes`` (already in the convention, e.g. from :func:`collective_bytes`).

        Args:
            kind: one of :data:`COLLECTIVE_KINDS`.
            nbytes: integer >= 0.
        """
        if kind not in COLLECTIVE_KINDS:
            raise ValueError(
                f"Invalid kind: {kind!r}; expected one of {', '.join(COLLECTIVE_KINDS)}"
            )
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"Invalid nbytes: {nbytes!r}; expected an integer >= 0")
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


@dataclass(frozen=True)
class _ChunkLayout:
    """How ``numel`` elements split into N chunks and how one chunk is laid out in bytes.

    A chunk travels as one uint8 row of ``row_nbytes`` bytes:
    ``[scales: scale_count float32 | codes: chunk_numel elements of the wire dtype]``.
    ``chunk_numel`` is rounded up so that ``row_nbytes`` is a multiple of 4; the
    scales of every row of an (N, row_nbytes) buffer are then 4-byte aligned and
    readable as float32 views without copies.
    """

    world_size: int
    chunk_numel: int
    scale_count: int
    row_nbytes: int

    @property
    def scale_nbytes(self) -> int:
        return _SCALE_BYTES * self.scale_count


def _chunk_layout(numel: int, fmt: str, world_size: int, block_size: int) -> _ChunkLayout:
    element_nbytes = quant.bytes_per_element(fmt)
    align = max(1, _SCALE_BYTES // element_nbytes)
    chunk_numel = _ceil_div(_ceil_div(numel, world_size), align) * align
    scale_count = quant.scale_count(chunk_numel, block_size, fmt)
    row_nbytes = _SCALE_BYTES * scale_count + element_nbytes * chunk_numel
    return _ChunkLayout(world_size, chunk_numel, scale_count, row_nbytes)


def mean_bytes(numel: int, fmt: str, world_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Exact bytes one rank sends in :func:`quantized_mean_` of ``numel`` elements in total.

    ``2 (N-1) P``: an all-to-all and an all-gather of N rows of P bytes each, where
    ``P = 4 * ceil(C / block_size) + bytes_per_element(fmt) * C`` (no scales for
    fp32/bf16) and ``C`` is ``ceil(numel / N)`` rounded up to a multiple of
    ``4 // bytes_per_element(fmt)``. Zero when N = 1 or numel = 0.

    Args:
        numel: total elements of all the tensors averaged in one call.
        fmt: one of :data:`COMM_FORMATS`.
        world_size: N.
        block_size: elements per scale (fp8 formats).
    """
    _check_fmt(fmt)
    _check_block_size(block_size)
    _check_world_size(world_size)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"Invalid numel: {numel!r}; expected an integer >= 0")
    if world_size == 1 or numel == 0:
        return 0
    layout = _chunk_layout(numel, fmt, world_size, block_size)
    return 2 * (world_size - 1) * layout.row_nbytes


def _row_views(row: Tensor, fmt: str, layout: _ChunkLayout) -> tuple[Tensor, Tensor | None]:
    """(codes, scales) views into one uint8 row of ``layout.row_nbytes`` bytes."""
    codes = row[layout.scale_nbytes :].view(_CODE_DTYPES[fmt])
    scales = row[: layout.scale_nbytes].view(torch.float32) if layout.scale_count else None
    return codes, scales


def _encode_row(x: Tensor, row: Tensor, fmt: str, layout: _ChunkLayout, block_size: int) -> None:
    """Quantize one fp32 chunk ``x`` (chunk_numel,) into the uint8 ``row`` (nearest rounding)."""
    codes, scales = _row_views(row, fmt, layout)
    quant.encode_(x, codes, scales, fmt, block_size, False, None)


def _decode_row(row: Tensor, fmt: str, layout: _ChunkLayout, block_size: int) -> Tensor:
    """fp32 (chunk_numel,) chunk held in the uint8 ``row``."""
    codes, scales = _row_views(row, fmt, layout)
    return quant.decode(codes, scales, fmt, block_size, layout.chunk_numel)


def check_member(group: Any, name: str = "group") -> None:
    """Raise a ValueError naming ``name`` if this rank is not in ``group`` (initialised dist)."""
    if group is dist.GroupMember.NON_GROUP_MEMBER or dist.get_rank(group) < 0:
        raise ValueError(
            f"Invalid {name}: this rank ({dist.get_rank()}) is not a member of it "
            "(torch.distributed.new_group returns GroupMember.NON_GROUP_MEMBER on the "
            "ranks it leaves out)"
        )


def _group_world_size(group: Any) -> int:
    """N for ``group``; 1 when torch.distributed is not initialised and no group is given."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("Invalid group: torch.distributed is not initialised")
        return 1
    check_member(group)
    return dist.get_world_size(group)


def _check_tensors(tensors: Sequence[Tensor]) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"Invalid tensors[{i}]: {got}; expected a float32 tensor")
        if t.device != tensors[0].device:
            raise ValueError(
                f"Invalid tensors[{i}]: on {t.device}, tensors[0] is on {tensors[0].device}"
            )


def _all_gather(output: Tensor, input: Tensor, group: Any) -> None:
    # all_gather_single is the new name (torch >= 2.13); all_gather_into_tensor is deprecated.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with collective("all_gather of a quantized mean", group):
        gather(output, input, group=group)


def _reduce_chunk(
    received: Tensor, own: Tensor, rank: int, fmt: str, layout: _ChunkLayout, block_size: int
) -> Tensor:
    """fp32 mean of the N versions of this rank's chunk, summed in rank order.

    Args:
        received: (N, row_nbytes) uint8, row i = this rank's chunk as rank i encoded it.
        own: (chunk_numel,) fp32, this rank's own chunk, exact.
    """
    total = torch.zeros_like(own)
    for i in range(layout.world_size):
        total += own if i == rank else _decode_row(received[i], fmt, layout, block_size)
    return total.div_(layout.world_size)


def _flatten(tensors: Sequence[Tensor], world_size: int, chunk_numel: int) -> Tensor:
    """(N, C) fp32: the tensors one after another, zero-padded to N chunks of C elements."""
    flat = torch.zeros(world_size, chunk_numel, dtype=torch.float32, device=tensors[0].device)
    flat_1d, offset = flat.view(-1), 0
    for t in tensors:
        flat_1d[offset : offset + t.numel()].view_as(t).copy_(t)
        offset += t.numel()
    return flat


def _unflatten_(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy the (N, C) ``flat`` buffer back into ``tensors`` (inverse of :func:`_flatten`)."""
    flat_1d, offset = flat.view(-1), 0
    for t in tensors:
        t.copy_(flat_1d[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def quantized_mean_(
    tensors: Sequence[Tensor],
    fmt: str,
    group: Any = None,
    stats: CommStats | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    errors: Sequence[Tensor] | None = None,
) -> None:
    """Replace each tensor, in place, by its mean over ``group``, sent in ``fmt``.

    All tensors travel coalesced in one all-to-all and one all-gather (see the
    module docstring); every rank ends with bitwise identical values. With one
    rank, or ``group=None`` and no initialised process group, nothing is sent and
    the tensors are unchanged. Collective: every rank of the group must call it
    with the same shapes, ``fmt`` and ``block_size``.

    Args:
        tensors: float32 tensors of any shapes, all on one device (empty list: no-op).
        fmt: wire format, one of :data:`COMM_FORMATS`.
        group: process group; None: the default group (if initialised).
        stats: adds :func:`mean_bytes` bytes, split between ``"all_to_all"`` and
            ``"all_gather"``. ``end_step`` is left to the caller.
        block_size: elements per float32 scale for the fp8 formats.
        errors: optional float32 tensors shaped like ``tensors`` (error feedback).
            They receive this rank's share of the rounding error, so that their
            mean over the ranks equals (mean of the inputs) - (result), up to
            fp32 rounding: what rounding this rank's outgoing chunks lost
            (phase 1), plus N times what re-quantizing the mean of its own chunk
            lost (phase 2). Zero for ``"fp32"`` and with one rank.
    """
    _check_fmt(fmt)
    _check_block_size(block_size)
    tensors = list(tensors)
    _check_tensors(tensors)
    errors = _check_errors(errors, tensors)
    numel = sum(t.numel() for t in tensors)
    world_size = _group_world_size(group)
    if world_size == 1 or numel == 0:
        for e in errors or ():
            e.zero_()
        return
    rank = dist.get_rank(group)
    layout = _chunk_layout(numel, fmt, world_size, block_size)
    P, N = layout.row_nbytes, world_size
    device = tensors[0].device

    flat = _flatten(tensors, N, layout.chunk_numel)

    # phase 1: rank i sends chunk j, quantized, to rank j
    send = torch.empty(N, P, dtype=torch.uint8, device=device)
    for j in range(N):
        if j != rank:  # this rank's own chunk is reduced unquantized
            _encode_row(flat[j], send[j], fmt, layout, block_size)
    err = torch.zeros_like(flat) if errors is not None else None
    if err is not None:  # phase-1 rounding of the chunks this rank sends
        for j in range(N):
            if j != rank:
                err[j] = flat[j] - _decode_row(send[j], fmt, layout, block_size)
    received = torch.empty_like(send)
    with collective("all_to_all of a quantized mean", group):
        dist.all_to_all_single(received, send, group=group)
    if stats is not None:
        stats.record_collective("all_to_all", N * P, N)

    # phase 2: mean of chunk `rank` in fp32, re-quantized, gathered by everyone
    mean_row = torch.empty(P, dtype=torch.uint8, device=device)
    mean = _reduce_chunk(received, flat[rank], rank, fmt, layout, block_size)
    _encode_row(mean, mean_row, fmt, layout, block_size)
    if err is not None:  # phase 2: every rank applies the re-quantized mean of this chunk
        err[rank] = (mean - _decode_row(mean_row, fmt, layout, block_size)).mul_(N)
    gathered = torch.empty(N * P, dtype=torch.uint8, device=device)  # gloo: concatenated form
    _all_gather(gathered, mean_row, group)
    gathered = gathered.view(N, P)
    if stats is not None:
        stats.record_collective("all_gather", N * P, N)

    for j in range(N):
        flat[j].copy_(_decode_row(gathered[j], fmt, layout, block_size))
    _unflatten_(flat, tensors)
    if err is not None:
        _unflatten_(err, errors)


def _check_errors(errors: Sequence[Tensor] | None, tensors: list[Tensor]) -> list[Tensor] | None:
    """``errors`` as a list, checked to be float32 tensors shaped like ``tensors``."""
    if errors is None:
        return None
    errors = list(errors)
    if len(errors) != len(tensors):
        raise ValueError(f"Invalid errors: {len(errors)} tensors for {len(tensors)} tensors")
    for i, (e, t) in enumerate(zip(errors, tensors, strict=True)):
        if not isinstance(e, Tensor) or e.dtype != torch.float32 or e.shape != t.shape:
            got = (e.dtype, tuple(e.shape)) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"Invalid errors[{i}]: {got}; expected float32 {tuple(t.shape)}")
    return errors
