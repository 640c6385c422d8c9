"""dion_lp.hooks.compress_hook and compress_wrapper on 2 and 3 gloo ranks, each with its own data.

Independent expectations: exact fp64 means of the inputs (the parent regenerates
every rank's data), the rounding bound of each wire format, torch's own hooks
(allreduce, PowerSGD) wrapped, and collectives recorded from torch.distributed.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _collectives import recorded_collectives
from _dist import spawn_fixture
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

from dion_lp import hooks
from dion_lp.dist.accounting import collective_bytes
from dion_lp.dist.collectives import quantized_mean_

dist_results = spawn_fixture(__name__, world_sizes=(2, 3))

# Relative rounding error of round-to-nearest: 2^-(mantissa bits + 1).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}
EF_STEPS, EF_CHECKPOINTS, VEC = 100, (1, 10, 50, 100), 1000


def _assert_identical_across_ranks(per_rank):
    for other in per_rank[1:]:
        for a, b in zip(per_rank[0], other, strict=True):
            assert torch.equal(a, b)


class Vec(nn.Module):
    """One vector parameter whose gradient is exactly the input: ``grad = x``."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


def _vec_data(rank: int, step: int) -> torch.Tensor:
    """A fixed per-rank gradient (rounding errors are systematic) plus small noise."""
    base = torch.randn(VEC, generator=torch.Generator().manual_seed(rank)) * (1 + rank)
    noise = torch.randn(VEC, generator=torch.Generator().manual_seed(1000 + 100 * rank + step))
    return base + 1e-3 * noise


def _run_vec(rank, state, hook, steps):
    """Applied means of ``steps`` DDP backward passes: (first, {checkpoint: fp64 running sum})."""
    ddp = DDP(Vec(VEC))
    ddp.register_comm_hook(state, hook)
    total, first, sums = torch.zeros(VEC, dtype=torch.float64), None, {}
    for step in range(steps):
        ddp(_vec_data(rank, step)).backward()
        grad = ddp.module.w.grad
        first = grad.clone() if first is None else first
        total += grad.double()
        ddp.module.w.grad = None
        if step + 1 in EF_CHECKPOINTS:
            sums[step + 1] = total.clone()
    return first, sums


def case_compress(rank, world_size):
    out = {}
    for fmt in ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2"):
        for ef in (True, False) if fmt != "fp32" else (True,):
            state = hooks.CompressState(comm_dtype=fmt, error_feedback=ef)
            steps = EF_STEPS if fmt != "fp32" else 1  # fp32: nothing to feed back
            out[fmt, ef] = _run_vec(rank, state, hooks.compress_hook, steps)
    return out


def case_warmup(rank, world_size):
    state = hooks.CompressState(comm_dtype="fp8_e4m3", warmup_steps=2)
    ddp = DDP(Vec(VEC))
    ddp.register_comm_hook(state, hooks.compress_hook)
    steps = []
    for step in range(4):
        with recorded_collectives() as log:
            ddp(_vec_data(rank, step)).backward()
        steps.append((ddp.module.w.grad.clone(), [kind for kind, _, _ in log]))
        ddp.module.w.grad = None
    return steps, state.comm_stats()


def case_wrapper(rank, world_size):
    """compress_wrapper around torch's allreduce_hook and powerSGD_hook."""
    seen = []

    def spy_allreduce(process_group, bucket):
        seen.append(bucket.buffer().dtype)
        return default_hooks.allreduce_hook(process_group, bucket)

    state = hooks.CompressState(comm_dtype="bf16")
    first, _ = _run_vec(rank, state, hooks.compress_wrapper(spy_allreduce), 3)
    residual = state.residual_norm()  # what the casts lost, kept for the next step
    # PowerSGD, rank 1, on a rank-1 mean: exact up to bf16
    psgd = powerSGD_hook.PowerSGDState(
        None, matrix_approximation_rank=1, start_powerSGD_iter=1,
        use_error_feedback=False, warm_start=False,
    )  # fmt: skip
    ddp = DDP(Vec(24, 16))
    ddp.register_comm_hook(
        hooks.CompressState(comm_dtype="bf16", inner_state=psgd),
        hooks.compress_wrapper(powerSGD_hook.powerSGD_hook),
    )
    grads = []
    for step in range(2):  # step 0: PowerSGD's vanilla all-reduce; step 1: compressed
        ddp(_lowrank(rank, step)).backward()
        grads.append(ddp.module.w.grad.clone())
        ddp.module.w.grad = None
    return first, residual, seen, grads


def _lowrank(rank: int, step: int) -> torch.Tensor:
    """Rank 1, the same direction on every rank, another scale: the mean is rank 1."""
    gen = torch.Generator().manual_seed(50 + step)
    return torch.outer(torch.randn(24, generator=gen), torch.randn(16, generator=gen)) * (1 + rank)


def case_errors_invariant(rank, world_size):
    """quantized_mean_(errors=...): mean over ranks of the errors = mean(x) - result."""
    out = {}
    for fmt in ("bf16", "fp8_e4m3", "fp8_e5m2", "fp32"):
        x = _vec_data(rank, 7)[:777] * 3
        result, errors = x.clone(), torch.empty(777)
        quantized_mean_([result], fmt, errors=[errors])
        error_mean = errors.clone()
        dist.all_reduce(error_mean)
        out[fmt] = (result, error_mean / world_size)
    return out


def _true_mean(world_size: int, step: int) -> torch.Tensor:
    return sum(_vec_data(r, step).double() for r in range(world_size)) / world_size


def _true_sum(world_size: int, steps: int) -> torch.Tensor:
    return sum(_true_mean(world_size, s) for s in range(steps))


def _max_abs(world_size: int) -> float:
    return max(_vec_data(r, 0).abs().max().item() for r in range(world_size)) * 1.1


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_compress_hook_first_step_within_rounding_of_the_true_mean(dist_results, fmt):
    """Tolerance: phase 1 rounds each rank's value, phase 2 the mean: |err| <= 2 u max|x|."""
    N = dist_results.world_size
    results = dist_results["case_compress"]
    _assert_identical_across_ranks([[r[fmt, True][0]] for r in results])
    err = (results[0][fmt, True][0].double() - _true_mean(N, 0)).abs().max().item()
    tol = 2 * UNIT_ROUNDOFF[fmt] * _max_abs(N) + 1e-6
    assert err <= tol
    if fmt != "fp32":
        assert err > UNIT_ROUNDOFF[fmt] * _max_abs(N) / 64  # it did round


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "fp8_e5m2"])
def test_error_feedback_keeps_the_accumulated_error_bounded(dist_results, fmt):
    N = dist_results.world_size
    sums_ef = dist_results["case_compress"][0][fmt, True][1]
    sums_plain = dist_results["case_compress"][0][fmt, False][1]
    err_ef = {t: (s - _true_sum(N, t)).abs().max().item() for t, s in sums_ef.items()}
    err_plain = {t: (s - _true_sum(N, t)).abs().max().item() for t, s in sums_plain.items()}
    one_step = 2 * UNIT_ROUNDOFF[fmt] * _max_abs(N)
    # with error feedback: within one step's rounding bound, after 1 or 100 steps
    assert max(err_ef.values()) <= one_step
    assert err_ef[100] <= 4 * err_ef[1] + one_step / 4
    # without: the systematic rounding error adds up step after step
    assert err_plain[100] >= 5 * err_plain[10]  # ~10x: linear growth
    assert err_plain[100] >= 10 * err_ef[100]


def test_compress_hook_warmup_uses_plain_all_reduce(dist_results):
    N = dist_results.world_size
    for steps, stats in dist_results["case_warmup"]:
        for step, (grad, kinds) in enumerate(steps):
            exact = (grad.double() - _true_mean(N, step)).abs().max().item() <= 1e-5
            if step < 2:
                assert kinds == ["all_reduce"] and exact
            else:
                assert kinds == ["all_reduce", "all_to_all", "all_gather"] and not exact
        flags = collective_bytes("all_reduce", 1, N)  # one uint8 flag: the one gradient
        assert (
            stats["by_kind"]["all_reduce"]
            == 2 * collective_bytes("all_reduce", 4 * VEC, N) + 2 * flags
        )
        assert stats["steps"] == 4


def test_compress_wrapper_composes_with_torch_hooks(dist_results):
    N = dist_results.world_size
    for first, residual, seen, grads in dist_results["case_wrapper"]:
        assert seen == [torch.bfloat16] * 3  # the wrapped hook saw the bf16 bucket
        bf16 = UNIT_ROUNDOFF["bf16"]
        tol = (N + 1) * bf16 * _max_abs(N)  # the cast, then N - 1 bf16 additions
        assert (first.double() - _true_mean(N, 0)).abs().max().item() <= tol
        assert 0 < residual < bf16 * _max_abs(N) * VEC**0.5
        for step, grad in enumerate(grads):
            mean = sum(_lowrank(r, step) for r in range(N)) / N
            assert grad.dtype == torch.float32
            assert ((grad - mean).norm() / mean.norm()).item() < 2e-2


def test_quantized_mean_errors_are_exactly_what_the_mean_missed(dist_results):
    N = dist_results.world_size
    per_rank = dist_results["case_errors_invariant"]
    for fmt in ("bf16", "fp8_e4m3", "fp8_e5m2", "fp32"):
        result, error_mean = per_rank[0][fmt]
        true = sum(_vec_data(r, 7)[:777] * 3 for r in range(N)).double() / N
        missed = true - result.double()
        torch.testing.assert_close(error_mean.double(), missed, rtol=0, atol=1e-5)
        if fmt == "fp32":
            assert error_mean.abs().max().item() == 0
