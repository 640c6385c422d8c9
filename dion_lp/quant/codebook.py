"""The dynamic-tree codebooks of ``dynamic8`` / ``udynamic8`` and their constant-time lookup.

:func:`dynamic_map` builds the 256-entry codebook (equal to bitsandbytes'
``create_dynamic_map``); :func:`codebook_index` returns, cached per format and
device, the bucket tables :mod:`dion_lp.quant` uses to find the nearest code
(and the two neighbours for stochastic rounding) without a binary search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .rng import element_bits

__all__ = ["CodebookIndex", "codebook_index", "dynamic_map", "encode_dynamic"]


def dynamic_map(signed: bool = True) -> Tensor:
    """The 256-entry dynamic-tree codebook of 8-bit optimizers, sorted ascending (float32, CPU).

    Dettmers (2015), "8-Bit Approximations for Parallelism in Deep Learning", with
    the layout of ``bitsandbytes.functional.create_dynamic_map(signed)`` (7 exponent
    bits, 8 bits in all), to which it is equal. For each decade ``i = 0 .. 6`` the
    interval [0.1, 1] is split into ``k = 2**i`` equal parts (``2**(i+1)`` when
    unsigned: the sign bit becomes a fraction bit) whose midpoints, times
    ``10**(i - 6)``, are the codes of that decade: few, coarse codes near 1e-6
    and many, fine ones near 1. The signed map holds them with both signs; both
    maps add 0 and 1.0 (127 + 127 + 2, or 254 + 2 entries).

    Args:
        signed: the signed map (range [-0.993, 1]) or the unsigned one (range [0, 1]).

    Returns:
        (256,) float32 tensor, sorted ascending.
    """
    parts = [torch.zeros(1), torch.ones(1)]
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        decade = (10.0 ** (i - 6)) * midpoints
        parts += [decade, -decade] if signed else [decade]
    return torch.sort(torch.cat(parts)).values


@dataclass(frozen=True)
class CodebookIndex:
    """Constant-time lookup of a sorted codebook for values ``v`` in [-1, 1].

    A binary search costs 8 dependent steps per element; instead the fp32 bit
    pattern of ``v`` is cut after its top ``32 - shift`` bits (sign, exponent
    and a few mantissa bits) into a bucket, and tables per bucket hold the
    answer at the bucket's lowest value plus the one boundary the bucket may
    contain (buckets are narrower than the codebook's gaps; checked on build).
    Every table entry is computed in float64 from the codebook, so the lookups
    are exact: ``nearest`` is the nearest code with ties to the lower one.
    """

    book: Tensor  # (256,) float32, sorted
    shift: int
    nearest: Tensor  # (buckets,) uint8: nearest code of the bucket's lowest value
    threshold: Tensor  # (buckets,) float32: v > threshold -> nearest + 1; inf if none
    below: Tensor  # (buckets,) int32: last code <= the bucket's lowest value (0 if none)
    next_code: Tensor  # (buckets,) float32: book[below + 1] if inside the bucket, else inf

    def buckets(self, v: Tensor) -> Tensor:
        """Bucket of each float32 ``v`` (int32, same shape)."""
        return (v.view(torch.int32) >> self.shift).bitwise_and_((1 << (32 - self.shift)) - 1)


def _bucket_bounds(shift: int) -> tuple[Tensor, Tensor]:
    """Lowest and highest float64 value of every bucket, clamped to [-1, 1]."""
    first = torch.arange(1 << (32 - shift), dtype=torch.int64) << shift
    ends = []
    for bits in (first, first + (1 << shift) - 1):
        bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
        value = bits.view(torch.float32).double()  # inf and NaN buckets are never used
        ends.append(value.nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp(-1.0, 1.0))
    return torch.minimum(*ends), torch.maximum(*ends)


def _nearest_exact(book: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(nearest code index, midpoint above it) of float64 ``v``; ties go to the lower code."""
    top = book.numel() - 1
    hi = torch.searchsorted(book, v).clamp_(max=top)
    lo = (hi - 1).clamp_(min=0)
    up = (v - book[lo]) > (book[hi] - v)
    idx = torch.where(up, hi, lo)
    return idx, (book[idx] + book[(idx + 1).clamp_(max=top)]) / 2


def _build_index(book32: Tensor) -> CodebookIndex:
    """Bucket tables of ``book32`` (sorted); the widest buckets that hold one boundary at most."""
    book = book32.double()
    top = book.numel() - 1
    for shift in (16, 15, 14, 13, 12):
        v_lo, v_hi = _bucket_bounds(shift)
        nearest, mid = _nearest_exact(book, v_lo)
        below = (torch.searchsorted(book, v_lo, right=True) - 1).clamp_(min=0)
        below_hi = (torch.searchsorted(book, v_hi, right=True) - 1).clamp_(min=0)
        steps = _nearest_exact(book, v_hi)[0] - nearest
        if steps.max() > 1 or (below_hi - below).max() > 1:
            continue
        # largest float32 <= the exact midpoint: v > it  <=>  v > midpoint, for float32 v
        threshold = mid.float()
        threshold = torch.where(
            threshold.double() > mid,
            torch.nextafter(threshold, torch.tensor(-torch.inf)),
            threshold,
        )
        inf = torch.tensor(torch.inf)
        next_code = book32[(below + 1).clamp_(max=top)]
        return CodebookIndex(
            book=book32,
            shift=shift,
            nearest=nearest.to(torch.uint8),
            threshold=torch.where(steps > 0, threshold, inf),
            below=below.to(torch.int32),
            next_code=torch.where(below_hi > below, next_code, inf),
        )
    raise AssertionError("codebook gaps narrower than the finest bucket")


_CODEBOOK_INDEXES: dict[tuple[str, str], CodebookIndex] = {}


def codebook_index(fmt: str, device: torch.device) -> CodebookIndex:
    """Cached :class:`CodebookIndex` of ``dynamic8`` / ``udynamic8`` on ``device``."""
    key = (fmt, str(device))
    index = _CODEBOOK_INDEXES.get(key)
    if index is None:
        index = _build_index(dynamic_map(signed=fmt == "dynamic8"))
        tensors = {k: v.to(device) for k, v in vars(index).items() if isinstance(v, Tensor)}
        index = CodebookIndex(shift=index.shift, **tensors)
        _CODEBOOK_INDEXES[key] = index
    return index


# ------------------------------------------------------------------- encoding
_BELOW_2_31 = 2.0**31 - 2.0**7  # the largest float32 below 2**31


def _lookup(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for an int32 ``index`` of any shape (index_select: the fast gather)."""
    return torch.index_select(table, 0, index.reshape(-1)).view(index.shape)


def _round_up(frac: Tensor, key: Tensor) -> Tensor:
    """Bool tensor (R, C), True with probability ``frac`` (in [0, 1)) per element.

    Compares 31 random bits (:mod:`dion_lp.quant.rng`) with ``floor(frac * 2**31)``,
    an integer comparison: the probability is ``frac`` less under 2^-31. A ``frac``
    that rounding made 1.0 is clamped to the largest float32 below 2**31.
    """
    threshold = frac.mul(2.0**31).clamp_(max=_BELOW_2_31).to(torch.int64)
    return (element_bits(frac.shape, key) & 0x7FFFFFFF) < threshold


def encode_dynamic(
    xb: Tensor,  # (rows, cols) fp32 blocks
    codes: Tensor,  # (rows, cols) uint8, written
    scales: Tensor,  # (rows,) absmax, kept
    index: CodebookIndex,
    stochastic: bool,
    key: Tensor | None,
) -> None:
    """Codes of blocks of ``xb`` in a dynamic codebook (nearest, ties to the lower code,
    or stochastic with the bits of ``key``); ``scales`` hold the blocks' absmax."""
    # v = x * (1 / absmax), clamped to [-1, 1] (as bitsandbytes normalises)
    inv = torch.where(scales > 0, scales, 1.0).reciprocal_()
    v = (xb * inv[:, None]).clamp_(-1.0, 1.0)
    bucket = index.buckets(v)
    if not stochastic:
        # nearest code, ties to the lower one
        up = v > _lookup(index.threshold, bucket)
        codes.copy_(_lookup(index.nearest, bucket).add_(up))
        return
    # book[lo] <= v < book[lo + 1]; round up with probability (v - book[lo]) / gap
    lo = _lookup(index.below, bucket).add_(v >= _lookup(index.next_code, bucket))
    hi = (lo + 1).clamp_(max=index.book.numel() - 1)
    lo_val = _lookup(index.book, lo)
    gap = _lookup(index.book, hi).sub_(lo_val)
    p = (v - lo_val).div_(torch.where(gap > 0, gap, 1.0)).masked_fill_(gap <= 0, 0.0)
    codes.copy_(lo.add_(_round_up(p, key)))
