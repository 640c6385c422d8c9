"""dion_lp.comm: quantized mean over gloo ranks, and its wire-byte accounting.

Ranks are spawned once per world size (2, 3, 4); every ``case_*`` below runs in
each rank and the tests assert on the gathered results. Every rank holds
different data, regenerated here from seeds to build the exact fp64 mean.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from _collectives import KINDS, patched_collectives
from _dist import CaseError, run_cases, spawn_fixture
from torch import Tensor
from torch.nn.functional import max_pool1d

from dion_lp.dist import accounting as comm
from dion_lp.dist.accounting import CommStats, mean_bytes
from dion_lp.dist.collectives import quantized_mean_
from dion_lp.quant.formats import WIRE_FORMATS as COMM_FORMATS

dist_results = spawn_fixture(__name__, world_sizes=(2, 3, 4))

# Shapes of one coalesced call: sizes divisible neither by N nor by the block,
# a 0-d tensor, an empty tensor, and a total of 2,000-odd elements.
SHAPES = [(37, 5), (129,), (3, 4, 7), (), (0, 3), (1,), (41, 40)]
BLOCK_SIZES = {"fp32": 128, "bf16": 128, "fp8_e4m3": 128, "fp8_e5m2": 32}
# Relative rounding error of round-to-nearest: 2^-(mantissa bits + 1).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}
BLOCKWISE = ("fp8_e4m3", "fp8_e5m2")
OUTLIER_INDEX = 1000
OUTLIER = 1e7


def _rank_data(shapes: list[tuple[int, ...]], rank: int, seed: int) -> list[Tensor]:
    """This rank's tensors; magnitudes differ per tensor (0.01 .. 100) and per rank."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    scales = [0.01, 1.0, 100.0]
    return [
        torch.randn(shape, generator=gen) * scales[k % 3] * (1 + rank)
        for k, shape in enumerate(shapes)
    ]


def _formats_data(rank: int) -> list[Tensor]:
    """SHAPES data, the last tensor a transposed (non-contiguous) view: written back through it."""
    tensors = _rank_data(SHAPES, rank, seed=1)
    tensors[-1] = tensors[-1].t()
    return tensors


def _outlier_data(rank: int) -> list[Tensor]:
    x = _rank_data([(4096,)], rank, seed=7)
    if rank == 0:
        x[0][OUTLIER_INDEX] = OUTLIER
    return x


@contextlib.contextmanager
def _recorded_collectives() -> Iterator[list[tuple[str, int, int, torch.dtype]]]:
    """Wrap the torch.distributed collectives; log (name, output bytes, input bytes, dtype)."""
    log: list[tuple[str, int, int, torch.dtype]] = []

    def on_call(name: str, args: tuple) -> None:
        out = args[0]
        inp = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else out
        if isinstance(out, Tensor):
            log.append((name, out.nbytes, inp.nbytes, inp.dtype))
        else:  # list-based collectives: not expected, logged so the test sees them
            log.append((name, -1, -1, None))

    with patched_collectives(KINDS, on_call):
        yield log


def _mean_call(tensors: list[Tensor], fmt: str, block_size: int, group=None) -> dict:
    stats = CommStats()
    with _recorded_collectives() as log:
        quantized_mean_(tensors, fmt, group, stats, block_size=block_size)
    return {"out": tensors, "stats": stats.as_dict(), "log": log}


# ----------------------------------------------------------------------------- rank-side cases


def case_formats(rank: int, world_size: int) -> dict[str, dict]:
    """One coalesced call per format on the SHAPES tensors (a non-contiguous one included)."""
    results = {}
    for fmt in COMM_FORMATS:
        results[fmt] = _mean_call(_formats_data(rank), fmt, BLOCK_SIZES[fmt])
    return results


def case_outlier(rank: int, world_size: int) -> dict[str, dict]:
    """Rank 0 holds one huge element; the blocks away from it must keep their precision."""
    return {fmt: _mean_call(_outlier_data(rank), fmt, 128) for fmt in BLOCKWISE}


def case_small(rank: int, world_size: int) -> dict[str, dict]:
    """Fewer elements than ranks, an empty list, and only empty tensors."""
    gen = torch.Generator().manual_seed(rank)
    return {
        "tiny": _mean_call([torch.randn((), generator=gen)], "fp8_e4m3", 128),
        "empty_list": _mean_call([], "bf16", 128),
        "empty_tensors": _mean_call([torch.empty(0), torch.empty(2, 0)], "fp8_e5m2", 128),
    }


def case_subgroups(rank: int, world_size: int) -> dict[str, dict]:
    """A one-rank group is a no-op; a group of ranks 1.. averages over its members only."""
    singletons = [dist.new_group([r]) for r in range(world_size)]
    members = list(range(1, world_size))
    tail = dist.new_group(members)
    single = _mean_call(_rank_data(SHAPES[:2], rank, seed=3), "fp8_e4m3", 128, singletons[rank])
    out = {"single": single}
    if rank in members and len(members) > 1:
        out["tail"] = _mean_call(_rank_data(SHAPES[:3], rank, seed=4), "bf16", 128, tail)
    return out


# ----------------------------------------------------------------------------- checks


def _exact_mean(per_rank: list[list[Tensor]]) -> list[Tensor]:
    """fp64 mean over ranks, tensor by tensor."""
    return [
        torch.stack([ts[k].double() for ts in per_rank]).mean(0) for k in range(len(per_rank[0]))
    ]


def _window_max(x: Tensor, block_size: int) -> Tensor:
    """max |x| over [i - bs + 1, i + bs - 1]: bounds the absmax of any block holding element i."""
    if x.numel() == 0:
        return x.abs()
    pooled = max_pool1d(x.abs()[None, None], 2 * block_size - 1, 1, block_size - 1)
    return pooled[0, 0]


def _tolerance(per_rank: list[list[Tensor]], fmt: str, block_size: int) -> Tensor:
    """Per-element bound on |quantized mean - exact mean|, flat over the coalesced buffer.

    Each input is rounded once (error <= u |x|, or <= u * block absmax for the
    blockwise fp8 formats) and the mean once more, so
    |err| <= u (mean_i a_i + a_mean), a = |x| or its block absmax, a_mean <= (1 + u) mean_i a_i.
    """
    u = UNIT_ROUNDOFF[fmt]
    flats = [torch.cat([t.double().reshape(-1) for t in ts]) for ts in per_rank]
    if fmt in BLOCKWISE:
        flats = [_window_max(f, block_size) for f in flats]
    magnitude = torch.stack([f.abs() for f in flats]).mean(0)
    fp32_sum = 4 * len(per_rank) * 2.0**-24 * magnitude  # rounding of the fp32 sum itself
    return u * (2 + u) * magnitude * 1.001 + fp32_sum + 1e-30


def _check_close(out: list[Tensor], per_rank: list[list[Tensor]], fmt: str, bs: int) -> None:
    exact = torch.cat([t.reshape(-1) for t in _exact_mean(per_rank)])
    got = torch.cat([t.double().reshape(-1) for t in out])
    err = (got - exact).abs()
    tol = _tolerance(per_rank, fmt, bs)
    worst = int(torch.argmax(err - tol)) if err.numel() else 0
    assert bool((err <= tol).all()), f"{fmt}: element {worst} err {err[worst]} > tol {tol[worst]}"


def _check_identical(outs: list[list[Tensor]]) -> None:
    for rank, out in enumerate(outs[1:], start=1):
        for a, b in zip(outs[0], out, strict=True):
            bits_a, bits_b = (t.contiguous().view(torch.int32) for t in (a, b))
            assert torch.equal(bits_a, bits_b), f"rank {rank} differs from rank 0"


def _convention_bytes(log: list, world_size: int) -> dict[str, int]:
    """Bytes by kind, recomputed from the buffers the collectives were actually given."""
    by_kind = dict.fromkeys(comm.COLLECTIVE_KINDS, 0)
    for name, out_nbytes, in_nbytes, _ in log:
        if name == "all_to_all_single":
            kind, total, factor = "all_to_all", in_nbytes, 1  # S = send buffer
        elif name in ("all_gather_single", "all_gather_into_tensor"):
            kind, total, factor = "all_gather", out_nbytes, 1  # S = gathered output
        elif name == "all_reduce":
            kind, total, factor = "all_reduce", out_nbytes, 2
        else:
            raise AssertionError(f"unexpected collective {name}")
        assert total % world_size == 0, (name, total)
        by_kind[kind] += factor * (world_size - 1) * total // world_size
    return by_kind


def _check_bytes(call: dict, numel: int, fmt: str, block_size: int, world_size: int) -> None:
    recomputed = _convention_bytes(call["log"], world_size)
    stats = call["stats"]
    assert stats["by_kind"] == recomputed
    assert (
        stats["bytes_sent"]
        == sum(recomputed.values())
        == mean_bytes(numel, fmt, world_size, block_size)
    )
    assert stats["steps"] == 0 and stats["last_step"] == 0  # end_step is the caller's


# ----------------------------------------------------------------------------- tests (N ranks)


@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_mean_matches_exact_mean_within_format_precision(dist_results, fmt):
    n = dist_results.world_size
    calls = [r[fmt] for r in dist_results["case_formats"]]
    per_rank = [_formats_data(rank) for rank in range(n)]
    for call in calls:
        assert [t.shape for t in call["out"]] == [t.shape for t in per_rank[0]]
        _check_close(call["out"], per_rank, fmt, BLOCK_SIZES[fmt])


@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_results_bitwise_identical_across_ranks(dist_results, fmt):
    _check_identical([r[fmt]["out"] for r in dist_results["case_formats"]])


@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_bytes_exact_and_one_round_per_phase(dist_results, fmt):
    n = dist_results.world_size
    numel = sum(math.prod(s) for s in SHAPES)
    for call in (r[fmt] for r in dist_results["case_formats"]):
        names = [entry[0] for entry in call["log"]]
        assert len(names) == 2 and names[0] == "all_to_all_single"  # coalesced: one each
        assert names[1] in ("all_gather_single", "all_gather_into_tensor")
        assert all(entry[3] == torch.uint8 for entry in call["log"])  # fp8 travels as bytes
        _check_bytes(call, numel, fmt, BLOCK_SIZES[fmt], n)


@pytest.mark.parametrize("fmt", BLOCKWISE)
def test_outlier_stays_in_its_block(dist_results, fmt):
    n = dist_results.world_size
    per_rank = [_outlier_data(rank) for rank in range(n)]
    for call in (r[fmt] for r in dist_results["case_outlier"]):
        _check_close(call["out"], per_rank, fmt, 128)  # bound uses each block's own absmax
        got, exact = call["out"][0].double(), _exact_mean(per_rank)[0]
        far = (torch.arange(4096) - OUTLIER_INDEX).abs() >= 128  # never in the outlier's block
        # away from the outlier the error is relative to the data there, not to 1e7 / n
        data_max = max(x[0][far].abs().max().item() for x in per_rank)
        assert (got - exact)[far].abs().max() <= 2.01 * UNIT_ROUNDOFF[fmt] * data_max
        assert (got[far] != 0).float().mean() > 0.99  # nothing flushed to zero
        assert abs(got[OUTLIER_INDEX] / exact[OUTLIER_INDEX] - 1) < 2 * UNIT_ROUNDOFF[fmt]
        _check_bytes(call, 4096, fmt, 128, n)


def test_fewer_elements_than_ranks(dist_results):
    n = dist_results.world_size
    calls = [r["tiny"] for r in dist_results["case_small"]]
    values = [torch.randn((), generator=torch.Generator().manual_seed(r)) for r in range(n)]
    for call in calls:
        assert call["out"][0].shape == ()
        _check_close(call["out"], [[v] for v in values], "fp8_e4m3", 128)
        _check_bytes(call, 1, "fp8_e4m3", 128, n)
    _check_identical([c["out"] for c in calls])


@pytest.mark.parametrize("kind", ["empty_list", "empty_tensors"])
def test_nothing_to_send_sends_nothing(dist_results, kind):
    for call in (r[kind] for r in dist_results["case_small"]):
        assert call["log"] == [] and call["stats"]["bytes_sent"] == 0
        assert all(t.numel() == 0 for t in call["out"])


def test_one_rank_group_is_a_no_op(dist_results):
    for rank, result in enumerate(dist_results["case_subgroups"]):
        call = result["single"]
        assert call["log"] == [] and call["stats"]["bytes_sent"] == 0
        for got, want in zip(call["out"], _rank_data(SHAPES[:2], rank, seed=3), strict=True):
            assert torch.equal(got, want)


def test_subgroup_averages_over_its_members(dist_results):
    n = dist_results.world_size
    if n < 3:
        pytest.skip("needs a proper subgroup of at least two ranks")
    members = range(1, n)
    per_rank = [_rank_data(SHAPES[:3], rank, seed=4) for rank in members]
    calls = [dist_results["case_subgroups"][rank]["tail"] for rank in members]
    numel = sum(math.prod(s) for s in SHAPES[:3])
    for call in calls:
        _check_close(call["out"], per_rank, "bf16", 128)
        _check_bytes(call, numel, "bf16", 128, len(per_rank))
    _check_identical([c["out"] for c in calls])


# ----------------------------------------------------------------------------- single process


def test_single_process_is_a_no_op():
    assert not dist.is_initialized()
    tensors = [torch.randn(5, 3), torch.randn(7)]
    before = [t.clone() for t in tensors]
    stats = CommStats()
    quantized_mean_(tensors, "fp8_e4m3", None, stats)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    assert stats.as_dict()["bytes_sent"] == 0


@pytest.mark.parametrize("fmt", ["int8", "fp16", "FP32", None])
def test_unknown_format_is_rejected(fmt):
    with pytest.raises(ValueError, match=rf"fmt: {fmt!r}"):
        quantized_mean_([torch.zeros(3)], fmt)
    with pytest.raises(ValueError, match="fmt"):
        mean_bytes(10, fmt, 2)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="block_size"):
        quantized_mean_([torch.zeros(3)], "bf16", block_size=0)
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        quantized_mean_([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], "bf16")
    with pytest.raises(ValueError, match="kind"):
        CommStats().record("all_to_al", 4)
    with pytest.raises(ValueError, match="world_size"):
        mean_bytes(10, "bf16", 0)


def test_mean_bytes_by_hand():
    # 1000 fp8 elements over 4 ranks: chunks of 250 -> 252 (4-byte rows), 2 scales of
    # 4 bytes per chunk, row = 8 + 252 = 260 bytes; 3 rows out in each of 2 phases.
    assert mean_bytes(1000, "fp8_e4m3", 4, 128) == 2 * 3 * 260
    # bf16: chunks of 250 elements, 500 bytes, no scales
    assert mean_bytes(1000, "bf16", 4) == 2 * 3 * 500
    # fp32 equals a ring all-reduce: 2 (N-1)/N * 4000
    assert mean_bytes(1000, "fp32", 4) == 2 * 3 * 1000
    assert mean_bytes(1000, "fp8_e5m2", 1) == 0 and mean_bytes(0, "fp8_e5m2", 8) == 0
    # a 7B model's worth of fp8 (2^-7 scale overhead at 128) ~ 2 (N-1)/N * numel * 1.03
    numel, n = 7 * 10**9, 64
    assert mean_bytes(numel, "fp8_e4m3", n) == pytest.approx(2 * (n - 1) / n * numel * 1.03125)


def test_collective_bytes_convention():
    assert comm.collective_bytes("all_reduce", 4000, 4) == 6000
    assert comm.collective_bytes("all_gather", 4000, 4) == 3000
    assert comm.collective_bytes("reduce_scatter", 4000, 4) == 3000
    assert comm.collective_bytes("all_to_all", 4000, 1) == 0
    assert comm.collective_bytes("all_to_all", 10, 4) == 8  # 7.5, rounded up


def test_comm_stats_steps_and_state_dict():
    stats = CommStats()
    stats.record("all_to_all", 30)
    stats.record_collective("all_gather", 40, 4)
    stats.end_step()
    stats.record("all_reduce", 5)
    assert stats.as_dict() == {
        "bytes_sent": 65,
        "steps": 1,
        "last_step": 60,
        "by_kind": {"all_reduce": 5, "all_gather": 30, "reduce_scatter": 0, "all_to_all": 30},
    }
    buf = io.BytesIO()
    torch.save(stats.state_dict(), buf)
    buf.seek(0)
    restored = CommStats()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    restored.end_step()
    stats.end_step()
    assert restored.as_dict() == stats.as_dict() and stats.last_step == 5


# ----------------------------------------------------------------------------- the harness


def _harness_fails_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def _harness_runs_after_a_failure(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _harness_rank1_dies(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    t = torch.zeros(1)
    dist.all_reduce(t)  # would block forever: the harness must stop rank 0 at once
    return rank


def test_harness_reports_failures_and_never_hangs():
    cases = [_harness_fails_on_rank1, _harness_runs_after_a_failure, _harness_rank1_dies]
    results = run_cases(2, cases, timeout=60, collective_timeout=60)
    with pytest.raises(CaseError, match="(?s)rank 1:.*deliberate failure on rank 1"):
        results["_harness_fails_on_rank1"]
    assert results["_harness_runs_after_a_failure"] == [1.0, 1.0]
    assert "rank 1 exited without finishing" in results.run_error
    assert "exit codes: [-9, 3]" in results.run_error  # rank 0 killed, not timed out
    with pytest.raises(CaseError, match="rank 1 exited without finishing"):
        results["_harness_rank1_dies"]
