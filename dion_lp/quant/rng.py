"""Counter-based random bits for stochastic rounding: a pure function of where a value is.

The bits of element ``i`` of a buffer write are ``hash32(key, i)``, where ``key``
comes from ``(seed, parameter index, step, buffer name)`` (:func:`stream_key`,
SplitMix64's finaliser, Steele et al. 2014) and ``i`` is the element's *global*
index in the buffer's row-block layout. Consequences:

- nothing to save: a resumed run rounds exactly as the uninterrupted one;
- a tensor quantized whole or as row shards with their global offsets gets the
  same bits, so FSDP2 and single-process runs make the same rounding decisions
  on the same values;
- the bits are tensor ops (integer multiply, shift, xor), so they fuse with the
  rounding under ``torch.compile``.

``hash32`` is Wellons' ``lowbias32`` integer hash (a bijection of 32-bit words
with low avalanche bias) of the index spread by a golden-ratio multiply and
keyed by the two 32-bit halves of the key (tests/test_rng.py checks balance and
correlations of the bits). Arithmetic is on int64 lanes whose products stay
below 2**63: no overflow anywhere, so eager, compiled C++ and Triton give the
same bits.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

__all__ = ["MASK32", "hash32", "key_tensor", "stream_key"]

MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# lowbias32's multipliers; the second is used as c - 2**32 (same low 32 bits of the
# product, and |x * c| < 2**63 for x < 2**32)
_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9 - (1 << 32)  # 2**32 / golden ratio, odd


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit words."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, index: int, step: int, buffer: str) -> int:
    """64-bit key of one buffer write: a hash of (seed, parameter index, step, buffer name)."""
    key = _mix64(seed & _MASK64)
    for word in (index, step, zlib.crc32(buffer.encode())):
        key = _mix64(key ^ (word & _MASK64))
    return key


def key_tensor(key: int, base: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """(3,) int64 ``[key low word, key high word, base index]``: what the kernels take.

    A tensor, not Python ints, so that compiled kernels do not specialise on it.
    """
    return torch.tensor(
        [key & MASK32, (key >> 32) & MASK32, base], dtype=torch.int64, device=device
    )


def _lowbias32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 on int64 lanes holding 32-bit words."""
    x = x ^ (x >> 16)
    x = (x * _C1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _C2) & MASK32
    return x ^ (x >> 16)


def hash32(index: Tensor, key: Tensor) -> Tensor:
    """32 random bits (int64 in [0, 2**32)) per element of the int64 ``index`` under ``key``.

    ``lowbias32(((i * golden) + k0) ^ k1)`` with ``i`` the index folded to 32 bits
    (its high word multiplied in): for a fixed key a bijection of the 32-bit index,
    so a stream never repeats within 2**32 elements.

    Args:
        index: int64 tensor of non-negative global element indices, any shape.
        key: (3,) int64 from :func:`key_tensor` (its base is not added here).
    """
    lo = (index & MASK32) ^ (((index >> 32) * _GOLDEN) & MASK32)
    x = (((lo * _GOLDEN) & MASK32) + key[0]) & MASK32
    return _lowbias32(x ^ key[1])


def element_bits(shape: tuple[int, int], key: Tensor) -> Tensor:
    """Random bits of a ``(rows, cols)`` block of consecutive elements from ``key[2]`` on."""
    rows, cols = shape
    index = torch.arange(rows * cols, device=key.device, dtype=torch.int64).view(rows, cols)
    return hash32(index + key[2], key)
