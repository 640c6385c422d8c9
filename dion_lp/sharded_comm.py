"""Row-block collectives of sharded Dion: reduce-scatter and all-gather by row blocks.

Row blocks follow ``torch.chunk`` (``ceil(L / N)`` rows per rank, the last ones
shorter). Payloads travel in any of :data:`dion_lp.comm.COMM_FORMATS` (fp8 as
``uint8`` views, per-block fp32 scales packed in front), sums happen in fp32 in
rank order, never in 8 bits, and every call adds its bytes to a
:class:`dion_lp.comm.CommStats`. Used by :mod:`dion_lp.sharded`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import quant
from .comm import DEFAULT_BLOCK_SIZE, CommStats, _all_gather, collective, quantized_mean_

__all__ = ["all_gather_rows", "reduce_scatter_rows"]


def _wire_layout(numel: int, fmt: str) -> tuple[int, int, int]:
    """(C elements, scale count, row bytes) of one rank's ``numel``-element chunk on the wire."""
    elem = quant.bytes_per_element(fmt)
    align = max(1, 4 // elem)
    C = -(-numel // align) * align
    scales = quant.scale_count(C, DEFAULT_BLOCK_SIZE, fmt)
    return C, scales, 4 * scales + elem * C


def _encode(x: Tensor, row: Tensor, fmt: str, n_scales: int) -> None:
    scales = row[: 4 * n_scales].view(torch.float32) if n_scales else None
    quant.encode_(x, row[4 * n_scales :], scales, fmt, DEFAULT_BLOCK_SIZE)


def _decode(row: Tensor, fmt: str, n_scales: int, C: int) -> Tensor:
    scales = row[: 4 * n_scales].view(torch.float32) if n_scales else None
    return quant.decode(row[4 * n_scales :], scales, fmt, DEFAULT_BLOCK_SIZE, C, out=None).clone()


def _own_rows(L: int, N: int, rank: int) -> tuple[int, int]:
    """(chunk rows c = ceil(L / N), rows of ``rank``): torch.chunk sizes."""
    c = -(-L // N)
    return c, max(0, min(c, L - rank * c))


def reduce_scatter_rows(
    tensors: Sequence[Tensor], fmt: str, group: Any, stats: CommStats | None
) -> list[Tensor]:
    """Sum each (L_t x r_t) tensor over ``group``; return this rank's block of rows of each sum.

    Row blocks follow ``torch.chunk`` (``ceil(L / N)`` rows, the last ones shorter).
    One all-to-all for all tensors: rank i sends block j, quantized in ``fmt``, to
    rank j, which decodes and sums the N blocks in fp32 in rank order (its own
    block unquantized). Never sums in 8 bits.

    Returns:
        fp32 tensors, ``(rows of this rank, r_t)`` each.
    """
    N, rank = dist.get_world_size(group), dist.get_rank(group)
    if N == 1:
        return [t.float().clone() for t in tensors]
    sizes = [(-(-t.shape[0] // N)) * t.shape[1] for t in tensors]
    C, n_scales, P = _wire_layout(sum(sizes), fmt)
    flat = torch.zeros(N, C, dtype=torch.float32, device=tensors[0].device)
    offset = 0
    for t, size in zip(tensors, sizes, strict=True):
        padded = t.new_zeros(N * size // t.shape[1], t.shape[1])  # (N c, r): block j for rank j
        padded[: t.shape[0]].copy_(t)
        flat[:, offset : offset + size].copy_(padded.view(N, size))
        offset += size
    send = torch.zeros(N, P, dtype=torch.uint8, device=flat.device)
    for j in range(N):
        if j != rank:
            _encode(flat[j], send[j], fmt, n_scales)
    received = torch.empty_like(send)
    with collective("all_to_all of a sharded reduce-scatter", group):
        dist.all_to_all_single(received, send, group=group)
    if stats is not None:
        stats.record_collective("all_to_all", N * P, N)
    total = torch.zeros(C, dtype=torch.float32, device=flat.device)
    for i in range(N):
        total += flat[rank] if i == rank else _decode(received[i], fmt, n_scales, C)
    out, offset = [], 0
    for t, size in zip(tensors, sizes, strict=True):
        _, own = _own_rows(t.shape[0], N, rank)
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
    N = dist.get_world_size(group)
    if N == 1:
        return [b.clone() for b in blocks]
    sizes = [(-(-L // N)) * b.shape[1] for b, L in zip(blocks, rows, strict=True)]
    C, n_scales, P = _wire_layout(sum(sizes), fmt)
    flat = torch.zeros(C, dtype=torch.float32, device=blocks[0].device)
    offset = 0
    for b, size in zip(blocks, sizes, strict=True):
        flat[offset : offset + b.numel()].copy_(b.reshape(-1))
        offset += size
    row = torch.zeros(P, dtype=torch.uint8, device=flat.device)
    _encode(flat, row, fmt, n_scales)
    gathered = torch.empty(N * P, dtype=torch.uint8, device=flat.device)
    _all_gather(gathered, row, group)
    if stats is not None:
        stats.record_collective("all_gather", N * P, N)
    decoded = torch.stack([_decode(r, fmt, n_scales, C) for r in gathered.view(N, P)])
    out, offset = [], 0
    for b, L, size in zip(blocks, rows, sizes, strict=True):
        out.append(decoded[:, offset : offset + size].reshape(-1, b.shape[1])[:L].contiguous())
        offset += size
    return out


def _sum_(tensors: list[Tensor], fmt: str, group: Any, stats: CommStats | None) -> None:
    """Replace each fp32 tensor by its sum over ``group`` (a quantized mean times N), in place."""
    N = dist.get_world_size(group)
    if N == 1 or not tensors:
        return
    quantized_mean_(tensors, fmt, group, stats)
    for t in tensors:
        t.mul_(N)
