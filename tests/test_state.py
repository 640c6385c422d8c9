"""dion_lp.state: quantized optimizer buffers in a plain, saveable dict."""

from __future__ import annotations

import io

import pytest
import torch

from dion_lp import quant
from dion_lp.state import (
    MIN_QUANT_NUMEL,
    STATE_FORMAT_VERSION,
    buffer_nbytes,
    check_buffer,
    init_buffer,
    read_buffer,
    storage_format,
    write_buffer,
)

LIKE_SHAPE = (96, 64)  # 6144 elements: quantized (>= MIN_QUANT_NUMEL), 24 blocks of 256
CODE_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "dynamic8": torch.uint8,
    "udynamic8": torch.uint8,
}
SCALED = ("int8", "fp8_e4m3", "fp8_e5m2", "dynamic8", "udynamic8")


def values(fmt: str, seed: int = 0) -> torch.Tensor:
    x = torch.randn(LIKE_SHAPE, generator=torch.Generator().manual_seed(seed))
    return x.abs() if fmt == "udynamic8" else x


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_init_creates_plain_zero_buffer(fmt: str) -> None:
    state: dict = {}
    like = torch.ones(LIKE_SHAPE)
    init_buffer(state, "exp_avg", like, fmt, block_size=256)
    codes = state["exp_avg_codes"]
    assert codes.shape == LIKE_SHAPE and codes.dtype == CODE_DTYPES[fmt]
    assert state["exp_avg_format"] == {
        "fmt": fmt,
        "block_size": 256,
        "version": STATE_FORMAT_VERSION,
    }
    if fmt in SCALED:
        assert state["exp_avg_scales"].dtype == torch.float32
        assert state["exp_avg_scales"].shape == (6144 // 256,)
    else:
        assert "exp_avg_scales" not in state
    back = read_buffer(state, "exp_avg")
    assert back.dtype == torch.float32 and back.shape == LIKE_SHAPE
    assert (back == 0).all()  # also for dynamic8, whose zero is not code 0


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_write_read_round_trip_equals_quantize(fmt: str, stochastic: bool) -> None:
    state: dict = {}
    x = values(fmt)
    init_buffer(state, "m", x, fmt, block_size=128)
    codes_before = state["m_codes"]
    write_buffer(state, "m", x, stochastic=stochastic, generator=torch.Generator().manual_seed(3))
    assert state["m_codes"] is codes_before  # written in place
    q = quant.quantize(
        x, fmt, block_size=128, stochastic=stochastic, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(read_buffer(state, "m"), quant.dequantize(q))
    # an independent error bound: block absmax / 127 per element for int8
    if fmt == "int8":
        scale = x.reshape(-1, 128).abs().amax(1, keepdim=True) / 127
        err = (read_buffer(state, "m") - x).reshape(-1, 128).abs()
        assert (err <= scale * (1.0 if stochastic else 0.5) * (1 + 1e-5)).all()


def test_fp32_buffer_is_the_state_tensor() -> None:
    state: dict = {}
    init_buffer(state, "momentum", torch.zeros(LIKE_SHAPE), "fp32")
    buf = read_buffer(state, "momentum")
    buf.add_(2.0)  # callers update fp32 state in place
    assert (state["momentum_codes"] == 2.0).all()
    write_buffer(state, "momentum", buf, stochastic=True, generator=None)  # a no-op
    write_buffer(state, "momentum", torch.full(LIKE_SHAPE, 5.0), stochastic=False, generator=None)
    assert read_buffer(state, "momentum") is state["momentum_codes"]
    assert (state["momentum_codes"] == 5.0).all()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8_e4m3", "dynamic8"])
def test_small_tensors_stay_fp32(fmt: str) -> None:
    assert MIN_QUANT_NUMEL == 4096
    state: dict = {}
    init_buffer(state, "small", torch.zeros(MIN_QUANT_NUMEL - 1), fmt)
    init_buffer(state, "big", torch.zeros(64, MIN_QUANT_NUMEL // 64), fmt)
    assert state["small_format"]["fmt"] == "fp32"
    assert state["small_codes"].dtype == torch.float32 and "small_scales" not in state
    assert state["big_format"]["fmt"] == fmt
    assert storage_format(fmt, 4095) == "fp32" and storage_format(fmt, 4096) == fmt
    x = torch.randn(MIN_QUANT_NUMEL - 1)
    write_buffer(state, "small", x, stochastic=True, generator=None)
    assert torch.equal(read_buffer(state, "small"), x)  # exact: nothing was rounded


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("fp32", 6144 * 4),
        ("bf16", 6144 * 2),
        ("int8", 6144 + 24 * 4),
        ("fp8_e5m2", 6144 + 24 * 4),
        ("udynamic8", 6144 + 24 * 4),
    ],
)
def test_buffer_nbytes_exact(fmt: str, expected: int) -> None:
    state: dict = {}
    init_buffer(state, "b", torch.zeros(LIKE_SHAPE), fmt, block_size=256)
    assert buffer_nbytes(state, "b") == expected
    assert buffer_nbytes(state, "b") == quant.encoded_nbytes(6144, fmt, 256)


def test_short_last_block() -> None:
    state: dict = {}
    like = torch.zeros(4100)  # 16 blocks of 256 and one of 4
    init_buffer(state, "b", like, "int8", block_size=256)
    assert state["b_scales"].numel() == 17
    assert buffer_nbytes(state, "b") == 4100 + 17 * 4
    x = torch.randn(4100)
    write_buffer(state, "b", x, stochastic=False, generator=None)
    assert (read_buffer(state, "b") - x).abs().max() <= x.abs().max() / 127


def test_check_buffer_accepts_matching_state() -> None:
    state: dict = {}
    init_buffer(state, "m", torch.zeros(LIKE_SHAPE), "int8", block_size=128)
    init_buffer(state, "small", torch.zeros(10), "int8", block_size=128)
    init_buffer(state, "half", torch.zeros(LIKE_SHAPE), "bf16", block_size=128)
    check_buffer(state, "m", "int8", 128)
    check_buffer(state, "small", "int8", 128)  # stored as fp32 by the threshold rule
    check_buffer(state, "small", "fp8_e4m3", 64)  # any format: fp32 either way
    check_buffer(state, "half", "bf16", 256)  # no blocks in bf16: block_size is moot


@pytest.mark.parametrize(
    ("change", "fmt", "block_size", "message"),
    [
        (None, "bf16", 128, r"saved with fmt 'int8', but this run uses fmt 'bf16'"),
        (None, "int8", 256, r"saved with block_size 128, but this run uses block_size 256"),
        ({"version": 99}, "int8", 128, r"format version 99.*reads version 1"),
        ("cast", "int8", 128, r"codes of dtype torch.float32, fmt 'int8' stores torch.int8"),
        ("scales", "int8", 128, r"47 scales, fmt 'int8' with block_size 128 needs 48"),
        ("missing", "int8", 128, r"no buffer 'm'"),
    ],
)
def test_check_buffer_rejects_mismatch(change, fmt: str, block_size: int, message: str) -> None:
    state: dict = {}
    init_buffer(state, "m", torch.zeros(LIKE_SHAPE), "int8", block_size=128)
    if isinstance(change, dict):
        state["m_format"].update(change)
    elif change == "cast":  # what torch.optim's load_state_dict does to floating state
        state["m_codes"] = state["m_codes"].float()
    elif change == "scales":
        state["m_scales"] = state["m_scales"][:-1]
    elif change == "missing":
        del state["m_format"]
    with pytest.raises(ValueError, match=message):
        check_buffer(state, "m", fmt, block_size)


def test_invalid_use_raises() -> None:
    state: dict = {}
    with pytest.raises(ValueError, match="Invalid fmt"):
        init_buffer(state, "m", torch.zeros(3), "fp16")
    with pytest.raises(ValueError, match="block_size"):
        init_buffer(state, "m", torch.zeros(3), "int8", block_size=0)
    with pytest.raises(ValueError, match="no buffer 'm'"):
        read_buffer(state, "m")
    init_buffer(state, "m", torch.zeros(LIKE_SHAPE), "udynamic8")
    with pytest.raises(ValueError, match=r"shape \(64, 96\), expected \(96, 64\)"):
        write_buffer(state, "m", torch.zeros(64, 96), stochastic=False, generator=None)
    with pytest.raises(ValueError, match="non-negative"):
        write_buffer(state, "m", -torch.ones(LIKE_SHAPE), stochastic=False, generator=None)
    bad = torch.ones(LIKE_SHAPE)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        write_buffer(state, "m", bad, stochastic=False, generator=None)


def test_save_and_load_weights_only() -> None:
    """A state dict of every format survives torch.save / torch.load(weights_only=True)."""
    state: dict = {"step": 7}
    for i, fmt in enumerate(quant.FORMATS):
        init_buffer(state, fmt, torch.zeros(LIKE_SHAPE), fmt, block_size=64)
        write_buffer(state, fmt, values(fmt, seed=i), stochastic=True, generator=None)
    init_buffer(state, "tiny", torch.zeros(5), "int8")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded.keys() == state.keys() and loaded["step"] == 7
    for fmt in [*quant.FORMATS, "tiny"]:
        assert loaded[f"{fmt}_format"] == state[f"{fmt}_format"]
        assert loaded[f"{fmt}_codes"].dtype == state[f"{fmt}_codes"].dtype
        assert torch.equal(read_buffer(loaded, fmt), read_buffer(state, fmt))
        check_buffer(loaded, fmt, state[f"{fmt}_format"]["fmt"], 64)
    # the loaded buffers keep working: the same write gives the same codes
    for name in ("int8", "dynamic8"):
        x = values(name, seed=11)
        for st in (state, loaded):
            write_buffer(st, name, x, stochastic=True, generator=torch.Generator().manual_seed(5))
        assert torch.equal(loaded[f"{name}_codes"], state[f"{name}_codes"])
