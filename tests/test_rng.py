"""dion_lp.quant.rng: counter-based random bits, tested as a generator of bits.

The bits of element i of a write are hash32(key, i). They must be uniform,
independent of the neighbouring element's and of the same element's at the next
step, and a pure function of (key, global index): identical for a tensor written
whole or as row shards with their global offsets.
"""

from __future__ import annotations

import math

import pytest
import torch

from dion_lp.quant.buffer import QuantizedBuffer
from dion_lp.quant.rng import element_bits, hash32, key_tensor, stream_key

N = 1 << 20


def _uniform(key: int, n: int = N, base: int = 0) -> torch.Tensor:
    """u in [0, 1) from the 32 bits of n consecutive indices, float64."""
    bits = hash32(torch.arange(base, base + n, dtype=torch.int64), key_tensor(key))
    return bits.double() / 2.0**32


def test_bits_are_in_range_and_deterministic() -> None:
    key = key_tensor(stream_key(3, 7, 11, "momentum"), base=5)
    a = element_bits((64, 33), key)
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < 2**32
    assert torch.equal(a, element_bits((64, 33), key))
    # element (i, j) is global index base + 33 i + j
    flat = hash32(torch.arange(5, 5 + 64 * 33, dtype=torch.int64), key)
    assert torch.equal(a.view(-1), flat)


def test_each_bit_is_balanced() -> None:
    bits = hash32(torch.arange(N, dtype=torch.int64), key_tensor(stream_key(0, 0, 0, "m")))
    ones = torch.stack([((bits >> b) & 1).double().mean() for b in range(32)])
    z = (ones - 0.5).abs() / math.sqrt(0.25 / N)
    assert float(z.max()) < 5.0, z  # 32 bits at 5 sigma


def test_bytes_are_uniform_chi_square() -> None:
    bits = hash32(torch.arange(N, dtype=torch.int64), key_tensor(stream_key(1, 2, 3, "m")))
    counts = torch.bincount((bits & 0xFF).view(-1), minlength=256).double()
    expected = N / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd 22.6; 5 sd either side
    assert 255 - 5 * 22.6 < chi2 < 255 + 5 * 22.6, chi2


@pytest.mark.parametrize("lag", [1, 2, 256])
def test_neighbouring_elements_are_uncorrelated(lag: int) -> None:
    u = _uniform(stream_key(0, 1, 2, "momentum"))
    r = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(N), r


def test_consecutive_steps_and_parameters_are_uncorrelated() -> None:
    u0 = _uniform(stream_key(0, 1, 10, "momentum"))
    for other in (stream_key(0, 1, 11, "momentum"), stream_key(0, 2, 10, "momentum")):
        u1 = _uniform(other)
        r = torch.corrcoef(torch.stack([u0, u1]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(N), r
        assert float((u0 == u1).double().mean()) < 1e-3


def test_stream_keys_differ_in_every_argument() -> None:
    base = stream_key(0, 0, 0, "momentum")
    others = [
        stream_key(1, 0, 0, "momentum"),
        stream_key(0, 1, 0, "momentum"),
        stream_key(0, 0, 1, "momentum"),
        stream_key(0, 0, 0, "exp_avg"),
    ]
    assert len({base, *others}) == 5 and all(0 <= k < 2**64 for k in others)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8_e4m3", "dynamic8"])
def test_whole_and_row_shards_round_identically(fmt: str) -> None:
    """Stochastic rounding of a tensor whole, or of its row shards at their global
    offsets (what FSDP2 ranks do), gives the same codes."""
    rows, row_numel = 40, 301  # padded row blocks for the scaled formats
    x = torch.randn(rows, row_numel, generator=torch.Generator().manual_seed(0))
    key = stream_key(5, 3, 8, "momentum")

    def make(local_rows: int) -> tuple[dict, QuantizedBuffer]:
        state: dict = {}
        return state, QuantizedBuffer.create(
            state,
            "m",
            rows=rows,
            row_numel=row_numel,
            local_rows=local_rows,
            fmt=fmt,
            block_size=128,
            device="cpu",
        )

    whole, buf = make(rows)
    buf.write(x, stochastic=True, key=key)
    for start, stop in ((0, 7), (7, 21), (21, 40)):
        part, pbuf = make(stop - start)
        pbuf.write(x[start:stop], stochastic=True, key=key, row0=start)
        assert torch.equal(part["m_codes"], whole["m_codes"][start:stop])
    # and the rounding did use the bits: another key changes some codes
    other, obuf = make(rows)
    obuf.write(x, stochastic=True, key=key + 1)
    assert not torch.equal(other["m_codes"], whole["m_codes"])
