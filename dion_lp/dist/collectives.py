"""Quantized collectives: mean, sum, reduce-scatter and all-gather by rows, flag agreement.

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

Row collectives (:func:`reduce_scatter_rows`, :func:`all_gather_rows`) split
``(L, r)`` tensors into ``torch.chunk`` row blocks (``ceil(L / N)`` rows per rank)
and use the same wire row and the same fp32 sums in rank order. Every call adds
its bytes (:mod:`dion_lp.dist.accounting`) to the :class:`CommStats` it is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..quant import codecs
from .accounting import DEFAULT_BLOCK_SIZE, CommStats, WireRow, check_wire_format, wire_row

__all__ = [
    "CollectiveError",
    "agree_flags",
    "all_gather_rows",
    "check_member",
    "collective",
    "quantized_mean_",
    "reduce_scatter_rows",
    "sum_",
]


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



def _row_views(row: Tensor, fmt: str, layout: WireRow) -> tuple[Tensor, Tensor | None]:
    """(codes, scales) views into one uint8 row of ``layout.nbytes`` bytes."""
    codes = row[layout.scale_nbytes :]
    scales = row[: layout.scale_nbytes].view(torch.float32) if layout.scale_count else None
    return codes, scales


def _encode_row(x: Tensor, row: Tensor, fmt: str, layout: WireRow, block_size: int) -> None:
    """Quantize one fp32 chunk ``x`` (layout.numel,) into the uint8 ``row`` (nearest rounding)."""
    codes, scales = _row_views(row, fmt, layout)
    codecs.encode_(x, codes, scales, fmt, block_size, False, None)


def _decode_row(row: Tensor, fmt: str, layout: WireRow, block_size: int) -> Tensor:
    """fp32 (layout.numel,) chunk held in the uint8 ``row`` (a new tensor)."""
    codes, scales = _row_views(row, fmt, layout)
    out = torch.empty(layout.numel, dtype=torch.float32, device=row.device)
    return codecs.decode(codes, scales, fmt, block_size, layout.numel, out=out)


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


def _all_gather(output: Tensor, input: Tensor, group: Any, what: str) -> None:
    # all_gather_single is the new name (torch >= 2.13); all_gather_into_tensor is deprecated.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with collective(f"all_gather of {what}", group):
        gather(output, input, group=group)


def _send_rows(
    flat: Tensor, fmt: str, layout: WireRow, block_size: int, group: Any, stats: Any, what: str
) -> tuple[Tensor, Tensor]:
    """Phase 1: row j of ``flat`` (N, layout.numel), quantized, to rank j (all-to-all).

    Returns:
        (send, received): (N, nbytes) uint8 each; row i of ``received`` is this rank's
        chunk as rank i encoded it. This rank's own row is not encoded (reduced exactly).
    """
    N, rank = flat.shape[0], dist.get_rank(group)
    send = torch.empty(N, layout.nbytes, dtype=torch.uint8, device=flat.device)
    for j in range(N):
        if j != rank:
            _encode_row(flat[j], send[j], fmt, layout, block_size)
    received = torch.empty_like(send)
    with collective(f"all_to_all of {what}", group):
        dist.all_to_all_single(received, send, group=group)
    if stats is not None:
        stats.record_collective("all_to_all", N * layout.nbytes, N)
    return send, received


def _sum_received(
    received: Tensor, own: Tensor, rank: int, fmt: str, layout: WireRow, block_size: int
) -> Tensor:
    """fp32 sum of the N versions of this rank's chunk, in rank order (its own exact)."""
    total = torch.zeros_like(own)
    for i in range(received.shape[0]):
        total += own if i == rank else _decode_row(received[i], fmt, layout, block_size)
    return total


def _gather_row(
    row: Tensor, fmt: str, layout: WireRow, block_size: int, group: Any, stats: Any, what: str
) -> Tensor:
    """Phase 2: every rank's ``row`` gathered and decoded: (N, layout.numel) fp32, same bytes."""
    N = dist.get_world_size(group)
    gathered = torch.empty(N * layout.nbytes, dtype=torch.uint8, device=row.device)
    _all_gather(gathered, row, group, what)  # gloo: the concatenated form
    if stats is not None:
        stats.record_collective("all_gather", N * layout.nbytes, N)
    rows = gathered.view(N, layout.nbytes)
    return torch.stack([_decode_row(rows[j], fmt, layout, block_size) for j in range(N)])


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
    check_wire_format(fmt)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"Invalid block_size: {block_size!r}; expected an integer >= 1")
    tensors = list(tensors)
    _check_tensors(tensors)
    errors = _check_errors(errors, tensors)
    numel = sum(t.numel() for t in tensors)
    N = _group_world_size(group)
    if N == 1 or numel == 0:
        for e in errors or ():
            e.zero_()
        return
    rank = dist.get_rank(group)
    layout = wire_row(-(-numel // N), fmt, block_size)
    flat = _flatten(tensors, N, layout.numel)
    what = "a quantized mean"
    send, received = _send_rows(flat, fmt, layout, block_size, group, stats, what)
    err = torch.zeros_like(flat) if errors is not None else None
    if err is not None:  # phase-1 rounding of the chunks this rank sent
        for j in range(N):
            if j != rank:
                err[j] = flat[j] - _decode_row(send[j], fmt, layout, block_size)
    # phase 2: mean of chunk `rank` in fp32, re-quantized, gathered by everyone
    mean = _sum_received(received, flat[rank], rank, fmt, layout, block_size).div_(N)
    mean_row = torch.empty(layout.nbytes, dtype=torch.uint8, device=flat.device)
    _encode_row(mean, mean_row, fmt, layout, block_size)
    if err is not None:  # every rank applies the re-quantized mean of this chunk
        err[rank] = (mean - _decode_row(mean_row, fmt, layout, block_size)).mul_(N)
    flat.copy_(_gather_row(mean_row, fmt, layout, block_size, group, stats, what))
    _unflatten_(flat, tensors)
    if err is not None:
        _unflatten_(err, errors)


def sum_(tensors: list[Tensor], fmt: str, group: Any, stats: CommStats | None) -> None:
    """Replace each fp32 tensor by its sum over ``group`` (a quantized mean times N), in place."""
    N = _group_world_size(group)
    if N == 1 or not tensors:
        return
    quantized_mean_(tensors, fmt, group, stats)
    for t in tensors:
        t.mul_(N)


def _own_rows(L: int, N: int, rank: int) -> int:
    """Rows of ``rank``'s block of an L-row tensor split like torch.chunk (ceil(L / N) each)."""
    c = -(-L // N)
    return max(0, min(c, L - rank * c))


def reduce_scatter_rows(
    tensors: Sequence[Tensor], fmt: str, group: Any, stats: CommStats | None
) -> list[Tensor]:
    """Sum each (L_t x r_t) tensor over ``group``; return this rank's block of rows of each sum.

    One all-to-all for all tensors: rank i sends block j, quantized in ``fmt``, to
    rank j, which decodes and sums the N blocks in fp32 in rank order (its own
    block unquantized). Never sums in 8 bits.

    Returns:
        fp32 tensors, ``(rows of this rank, r_t)`` each.
    """
    N = _group_world_size(group)
    if N == 1:
        return [t.float().clone() for t in tensors]
    rank = dist.get_rank(group)
    sizes = [(-(-t.shape[0] // N)) * t.shape[1] for t in tensors]
    layout = wire_row(sum(sizes), fmt)
    flat = torch.zeros(N, layout.numel, dtype=torch.float32, device=tensors[0].device)
    offset = 0
    for t, size in zip(tensors, sizes, strict=True):
        padded = t.new_zeros(N * size // t.shape[1], t.shape[1])  # (N c, r): block j for rank j
        padded[: t.shape[0]].copy_(t)
        flat[:, offset : offset + size].copy_(padded.view(N, size))
        offset += size
    what = "a sharded reduce-scatter"
    _, received = _send_rows(flat, fmt, layout, DEFAULT_BLOCK_SIZE, group, stats, what)
    total = _sum_received(received, flat[rank], rank, fmt, layout, DEFAULT_BLOCK_SIZE)
    out, offset = [], 0
    for t, size in zip(tensors, sizes, strict=True):
        own = _own_rows(t.shape[0], N, rank)
        out.append(total[offset : offset + size].view(-1, t.shape[1])[:own].clone())
        offset += size
    return out


def all_gather_rows(
    blocks: Sequence[Tensor], rows: Sequence[int], fmt: str, group: Any, stats: CommStats | None
) -> list[Tensor]:
    """Inverse of :func:`reduce_scatter_rows`: every rank's row blocks joined, sent in ``fmt``.

    Args:
        blocks: this rank's blocks, ``(own rows, r_t)`` fp32 each.
        rows: L_t, the full row count of each tensor.

    Returns:
        ``(L_t, r_t)`` fp32 tensors, bitwise identical on every rank (each rank,
        itself included, decodes the same bytes).
    """
    N = _group_world_size(group)
    if N == 1:
        return [b.clone() for b in blocks]
    sizes = [(-(-L // N)) * b.shape[1] for b, L in zip(blocks, rows, strict=True)]
    layout = wire_row(sum(sizes), fmt)
    flat = torch.zeros(layout.numel, dtype=torch.float32, device=blocks[0].device)
    offset = 0
    for b, size in zip(blocks, sizes, strict=True):
        flat[offset : offset + b.numel()].copy_(b.reshape(-1))
        offset += size
    row = torch.zeros(layout.nbytes, dtype=torch.uint8, device=flat.device)
    _encode_row(flat, row, fmt, layout, DEFAULT_BLOCK_SIZE)
    what = "a sharded all-gather"
    decoded = _gather_row(row, fmt, layout, DEFAULT_BLOCK_SIZE, group, stats, what)
    out, offset = [], 0
    for b, L, size in zip(blocks, rows, sizes, strict=True):
        out.append(decoded[:, offset : offset + size].reshape(-1, b.shape[1])[:L].contiguous())
        offset += size
    return out


def agree_flags(flags: Tensor, group: Any, stats: CommStats | None, what: str) -> None:
    """Element-wise maximum of a uint8 flag tensor over ``group``, in place (every rank agrees).

    Used so that every rank sees the same "has a gradient" / "non-finite" flags and
    takes the same branches.
    """
    N = _group_world_size(group)
    if N == 1:
        return
    with collective(f"all_reduce of {what}", group):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    if stats is not None:
        stats.record_collective("all_reduce", flags.numel() * flags.element_size(), N)


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
