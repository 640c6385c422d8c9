"""Random bits of stochastic rounding: a fresh generator per buffer write, keyed by position.

Every write of a quantized buffer with stochastic rounding draws from a
generator seeded from ``(seed, parameter index, step, buffer, shard rank)``
through SplitMix64's finaliser, so the draws are a pure function of where the
write happens in training: nothing to save in a checkpoint, and a resumed run
rounds exactly as the uninterrupted one. Sharded buffers add the shard rank, so
on another mesh size stochastic rounding is equal in distribution, not bitwise.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

__all__ = ["rounding_generator", "rounding_key"]

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of 64-bit words."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def rounding_key(seed: int, index: int, step: int, buffer: str, shard_rank: int = 0) -> int:
    """63-bit seed of one buffer write (see the module docstring)."""
    key = _mix64(seed & _MASK64)
    for word in (index, step, zlib.crc32(buffer.encode()), shard_rank):
        key = _mix64(key ^ (word & _MASK64))
    return key >> 1


def rounding_generator(
    seed: int, index: int, step: int, buffer: str, shard_rank: int = 0, device: Any = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`rounding_key`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(rounding_key(seed, index, step, buffer, shard_rank))
    return gen
