"""dion_lp.quant.buffer: quantized state buffers in row blocks, in a plain, saveable dict."""

from __future__ import annotations

import io
import math

import pytest
import torch

from dion_lp import quant
from dion_lp.quant.buffer import (
    BUFFER_VERSION,
    MIN_QUANT_NUMEL,
    MIN_ROW_NUMEL,
    QuantizedBuffer,
    buffer_nbytes,
    row_blocks,
    storage_format,
)
from dion_lp.quant.formats import format_info
from dion_lp.quant.rng import key_tensor

LIKE_SHAPE = (96, 64)  # 6144 elements: quantized (>= MIN_QUANT_NUMEL), rows of 64
SCALED = ("int8", "fp8_e4m3", "fp8_e5m2", "dynamic8", "udynamic8", "int4", "fp4_e2m1")


def create(state: dict, name: str, shape: tuple[int, ...], fmt: str, block_size: int = 256):
    rows = shape[0] if shape else 1
    return QuantizedBuffer.create(
        state,
        name,
        rows=rows,
        row_numel=math.prod(shape) // rows,
        local_rows=rows,
        fmt=fmt,
        block_size=block_size,
        device="cpu",
    )


def values(fmt: str, shape=LIKE_SHAPE, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.abs() if fmt == "udynamic8" else x


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_create_makes_zero_buffer_in_row_blocks(fmt: str) -> None:
    state: dict = {}
    buf = create(state, "exp_avg", LIKE_SHAPE, fmt)
    codes = state["exp_avg_codes"]
    assert codes.shape == (96, format_info(fmt).code_count(64))  # int4: two codes a byte
    assert codes.dtype == quant.code_dtype(fmt)
    assert state["exp_avg_format"] == {
        "fmt": fmt,
        "block_size": 256,
        "row_block": 64,  # a row of 64 is one block
        "row_numel": 64,
        "version": BUFFER_VERSION,
    }
    if fmt in SCALED:
        assert state["exp_avg_scales"].dtype == torch.float32
        assert state["exp_avg_scales"].shape == (96, 1)
    else:
        assert "exp_avg_scales" not in state
    back = buf.read()
    assert back.dtype == torch.float32 and back.shape == LIKE_SHAPE
    assert (back == 0).all()  # also for dynamic8, whose zero is not code 0


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_write_read_equals_quantize_of_each_row_block(fmt: str, stochastic: bool) -> None:
    """Rows of 300 with block_size 128 are 3 blocks of 100: quantize(x, block 100) is the oracle."""
    shape = (24, 300)
    state: dict = {}
    x = values(fmt, shape)
    buf = create(state, "m", shape, fmt, block_size=128)
    codes_before = state["m_codes"]
    buf.write(x, stochastic=stochastic, key=3)
    assert state["m_codes"] is codes_before  # written in place
    # the flat codec with the same stream key: element (i, j) is global index 300 i + j
    codes = torch.empty(format_info(fmt).code_count(x.numel()), dtype=quant.code_dtype(fmt))
    scales = torch.empty(quant.scale_count(x.numel(), 100, fmt)) if fmt in SCALED else None
    key = key_tensor(3) if stochastic else None
    quant.encode_(x, codes, scales, fmt, 100, stochastic, key=key)
    oracle = quant.decode(codes, scales, fmt, 100, x.numel(), out=torch.empty(x.numel()))
    assert torch.equal(buf.read(), oracle.view(shape))
    if fmt == "int8":  # an independent error bound: block absmax / 127 per element
        scale = x.reshape(-1, 100).abs().amax(1, keepdim=True) / 127
        err = (buf.read() - x).reshape(-1, 100).abs()
        assert (err <= scale * (1.0 if stochastic else 0.5) * (1 + 1e-5)).all()


def test_padded_rows_and_whole_vs_row_shards_give_the_same_codes() -> None:
    """Rows of 301 in blocks of 101 (padded to 303); split rows over "ranks": same codes."""
    shape, block = (40, 301), 128
    assert row_blocks(301, block) == (3, 101)
    x = values("int8", shape)
    whole: dict = {}
    create(whole, "m", shape, "int8", block).write(x, stochastic=False)
    assert whole["m_codes"].shape == (40, 303) and whole["m_scales"].shape == (40, 3)
    for start, stop in ((0, 13), (13, 27), (27, 40)):
        part: dict = {}
        buf = QuantizedBuffer.create(
            part,
            "m",
            rows=40,
            row_numel=301,
            local_rows=stop - start,
            fmt="int8",
            block_size=block,
            device="cpu",
        )
        buf.write(x[start:stop], stochastic=False)
        assert torch.equal(part["m_codes"], whole["m_codes"][start:stop])
        assert torch.equal(part["m_scales"], whole["m_scales"][start:stop])
    err = (QuantizedBuffer(whole, "m").read() - x).abs()
    assert (err <= x.abs().amax(1, keepdim=True) / 127).all()


def test_fp32_buffer_is_the_state_tensor() -> None:
    state: dict = {}
    buf = create(state, "momentum", LIKE_SHAPE, "fp32")
    M = buf.read()
    M.add_(2.0)  # callers update fp32 state in place
    assert (state["momentum_codes"] == 2.0).all()
    buf.write(M, stochastic=True, key=1)  # a no-op
    buf.write(torch.full(LIKE_SHAPE, 5.0), stochastic=False)
    assert buf.read() is state["momentum_codes"]
    assert (state["momentum_codes"] == 5.0).all()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8_e4m3", "dynamic8"])
def test_small_buffers_and_short_rows_stay_fp32(fmt: str) -> None:
    assert (MIN_QUANT_NUMEL, MIN_ROW_NUMEL) == (4096, 32)
    state: dict = {}
    create(state, "small", (MIN_QUANT_NUMEL - 1, 1), fmt)
    create(state, "big", (64, MIN_QUANT_NUMEL // 64), fmt)
    create(state, "vector", (MIN_QUANT_NUMEL * 2,), fmt)  # 1-D: rows of one element
    assert state["small_format"]["fmt"] == "fp32"
    assert state["small_codes"].dtype == torch.float32 and "small_scales" not in state
    assert state["big_format"]["fmt"] == fmt
    scaled = fmt in SCALED
    assert state["vector_format"]["fmt"] == ("fp32" if scaled else fmt)
    assert storage_format(fmt, 4095, 1) == "fp32" and storage_format(fmt, 128, 32) == fmt
    assert storage_format(fmt, 4096, 31) == ("fp32" if scaled else fmt)
    x = torch.randn(MIN_QUANT_NUMEL - 1, 1)
    QuantizedBuffer(state, "small").write(x, stochastic=True, key=1)
    assert torch.equal(QuantizedBuffer(state, "small").read(), x)  # exact: nothing rounded


@pytest.mark.parametrize(
    ("fmt", "shape", "expected"),
    [
        ("fp32", LIKE_SHAPE, 6144 * 4),
        ("bf16", LIKE_SHAPE, 6144 * 2),
        ("int8", LIKE_SHAPE, 6144 + 96 * 4),  # one scale per row of 64
        ("fp8_e5m2", (24, 512), 24 * 512 + 24 * 2 * 4),  # two blocks of 256 per row
        ("udynamic8", (40, 301), 40 * 303 + 40 * 3 * 4),  # padded to 3 blocks of 101
    ],
)
def test_nbytes_exact_and_closed_form(fmt: str, shape: tuple[int, int], expected: int) -> None:
    state: dict = {}
    buf = create(state, "b", shape, fmt, block_size=256 if shape != (40, 301) else 128)
    assert buf.nbytes == expected
    assert buffer_nbytes(shape, fmt, 256 if shape != (40, 301) else 128) == expected


def test_check_accepts_matching_state() -> None:
    state: dict = {}
    create(state, "m", LIKE_SHAPE, "int8", block_size=128)
    create(state, "small", (10, 1), "int8", block_size=128)
    create(state, "half", LIKE_SHAPE, "bf16", block_size=128)
    QuantizedBuffer(state, "m").check("int8", 128)
    QuantizedBuffer(state, "small").check("int8", 128)  # stored as fp32 by the threshold rule
    QuantizedBuffer(state, "small").check("fp8_e4m3", 64)  # any format: fp32 either way
    QuantizedBuffer(state, "half").check("bf16", 256)  # no blocks in bf16: block_size is moot


@pytest.mark.parametrize(
    ("change", "fmt", "block_size", "message"),
    [
        (None, "bf16", 32, r"saved with fmt 'int8', but this run uses fmt 'bf16'"),
        (None, "int8", 16, r"saved with block_size 32, but this run uses block_size 16"),
        ({"version": 1}, "int8", 32, r"format version 1.*upgrade_state_dict"),
        ("cast", "int8", 32, r"codes torch.float32 \(96, 64\) do not match fmt 'int8'"),
        ("scales", "int8", 32, r"do not match fmt 'int8'"),
    ],
)
def test_check_rejects_mismatch(change, fmt: str, block_size: int, message: str) -> None:
    state: dict = {}
    create(state, "m", LIKE_SHAPE, "int8", block_size=32)
    if isinstance(change, dict):
        state["m_format"].update(change)
    elif change == "cast":  # what torch.optim's load_state_dict does to floating state
        state["m_codes"] = state["m_codes"].float()
    elif change == "scales":
        state["m_scales"] = state["m_scales"][:, :-1]
    with pytest.raises(ValueError, match=message):
        QuantizedBuffer(state, "m").check(fmt, block_size)


def test_invalid_use_raises() -> None:
    state: dict = {}
    with pytest.raises(ValueError, match="Invalid fmt"):
        create(state, "m", (3, 1), "fp16")
    with pytest.raises(ValueError, match="block_size"):
        create(state, "m", (3, 1), "int8", block_size=0)
    with pytest.raises(ValueError, match="no buffer 'm'"):
        QuantizedBuffer(state, "m")
    buf = create(state, "m", LIKE_SHAPE, "udynamic8")
    with pytest.raises(ValueError, match=r"shape \(64, 96\), expected \(96, 64\)"):
        buf.write(torch.zeros(64, 96), stochastic=False)
    with pytest.raises(ValueError, match="non-negative"):
        buf.write(-torch.ones(LIKE_SHAPE), stochastic=False)
    bad = torch.ones(LIKE_SHAPE)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        buf.write(bad, stochastic=False)


def test_save_and_load_weights_only() -> None:
    """A state dict of every format survives torch.save / torch.load(weights_only=True)."""
    state: dict = {"step": 7}
    for i, fmt in enumerate(quant.FORMATS):
        buf = create(state, fmt, LIKE_SHAPE, fmt, block_size=32)
        buf.write(values(fmt, seed=i), stochastic=True, key=i)
    create(state, "tiny", (5, 1), "int8")
    stream = io.BytesIO()
    torch.save(state, stream)
    stream.seek(0)
    loaded = torch.load(stream, weights_only=True)
    assert loaded.keys() == state.keys() and loaded["step"] == 7
    for fmt in [*quant.FORMATS, "tiny"]:
        assert loaded[f"{fmt}_format"] == state[f"{fmt}_format"]
        assert loaded[f"{fmt}_codes"].dtype == state[f"{fmt}_codes"].dtype
        assert torch.equal(QuantizedBuffer(loaded, fmt).read(), QuantizedBuffer(state, fmt).read())
        QuantizedBuffer(loaded, fmt).check(state[f"{fmt}_format"]["fmt"], 32)
    for name in ("int8", "dynamic8"):  # the loaded buffers keep working: same write, same codes
        x = values(name, seed=11)
        for st in (state, loaded):
            QuantizedBuffer(st, name).write(x, stochastic=True, key=5)
        assert torch.equal(loaded[f"{name}_codes"], state[f"{name}_codes"])
