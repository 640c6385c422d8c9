"""examples/fsdp_train.py end to end: FSDP2 + sharded Dion + DCP, launched by torchrun.

Recipe ``fp32`` (fp32 momentum and factors, nearest rounding), three launches in
two waves:

1. N steps straight on 2 ranks, checkpointing at N/2 and N;
2. side by side, fresh processes, each in a new directory holding only the N/2
   checkpoint (as if the run had stopped there), ``--resume`` to N: on 2 ranks
   (with an interrupted and a corrupted newer checkpoint planted next to it), and
   on 1 rank (DCP reshards the 2-rank checkpoint).

Asserted:

- same world size: the resumed run's final parameters equal the straight run's
  bit for bit, and so do the logged loss and bytes of every step after the restart;
  the planted checkpoints are skipped, each with its reason;
- 2 ranks -> 1 rank: the run resumes from the same step and ends within
  ``RESHARD_ATOL`` (max abs) of the straight run's parameters, the key part of the
  QKV biases aside (see the test), its losses within 1e-3;
- bytes: every logged ``bytes/step`` is > 0 on 2 ranks (0 on 1 rank, where nothing
  is sent), the logged steps sum to ``comm_stats()["bytes_sent"]`` as printed at
  the end (also across a restart: the counters are checkpointed), and each step's
  bytes equal dion_lp's own accounting (``dion_lp.dist.accounting.sharded_step_bytes`` plus the
  non-finite-gradient agreement) plus one r x r Gram all-reduce for each P that
  needed a third Cholesky QR pass (an ill-conditioned P: always some in the first
  steps, where the momentum is nearly rank one, and now and then later).

``-m slow`` adds the script's default recipe ``lowp`` (int8 momentum, stochastic
rounding, fp8_e4m3 factors): its resume is bitwise as well (sharded stochastic
rounding is re-seeded each step from (seed, parameter, step, shard rank), so there
is no generator state to lose), and its bytes match the accounting.

Each launch is ``python -m torch.distributed.run --standalone`` (rendezvous on a
free local port chosen by the OS: works offline), in its own session with a
timeout; on any failure every process of the job, workers included, is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _jobs import descendants, kill_job

import dion_lp
from benchmarks.model import GPT, GPTConfig
from dion_lp.dist.accounting import collective_bytes, mean_bytes
from dion_lp.dist.accounting import sharded_step_bytes as step_bytes
from dion_lp.options import dion_rank

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fsdp_train.py"
STEPS = 10
HALF = STEPS // 2
SCALAR_LR = 3e-3  # the script's default --scalar-lr
MODEL = dict(d_model=64, n_layer=2, n_head=4, seq_len=64)
COMMON = [f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()]
COMMON += ["--global-batch=16", "--rank-fraction=0.25", f"--ckpt-every={HALF}"]
COMMON += ["--warmup=8"]  # the resume point is mid warm-up: the lr must be the step's
RECIPES = {
    "lowp": ["--momentum-dtype=int8", "--rounding=stochastic", "--comm-dtype=fp8_e4m3"],
    "fp32": ["--momentum-dtype=fp32", "--rounding=nearest", "--comm-dtype=fp32"],
}
RESHARD_ATOL = 1e-5  # fp32, 2 -> 1 ranks, 5 more steps: measured <= 2e-7 (see the test)
WAVE_TIMEOUT = 150.0  # seconds for one wave of concurrent launches (2 busy cores)

STEP_RE = re.compile(r"step\s+(\d+) \| loss ([\d.]+) \| bytes/step (\d+) \|")
TOTALS_RE = re.compile(r"comm totals \| optimizer (\d+) B in (\d+) steps")
FINAL_RE = re.compile(r"final \| step (\d+) \| val loss ([\d.]+) \| params sha256 ([0-9a-f]{64})")
RESUMED_RE = re.compile(r"resumed from (\S+) \(step (\d+), saved on (\d+) ranks, ([^)]+)\)")

Job = tuple[int, Path, list[str]]  # (ranks, checkpoint dir, extra flags)


# ----------------------------------------------------------------------------- processes
def _log_path(ckpt_dir: Path) -> Path:
    """Where a job's merged stdout/stderr goes (a file: no pipe for a quiet parent to drain)."""
    return ckpt_dir.parent / f"{ckpt_dir.name}.log"


def _launch(nproc: int, ckpt_dir: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    """Start torchrun in a new session, stdout and stderr merged into the job's log file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(SCRIPT), *COMMON, f"--ckpt-dir={ckpt_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(_log_path(ckpt_dir), "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


@contextlib.contextmanager
def _job(nproc: int, ckpt_dir: Path, extra: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A launched job that is killed, whole, if the block exits with it still running."""
    proc = _launch(nproc, ckpt_dir, extra)
    try:
        yield proc
    finally:
        if proc.poll() is None or descendants(proc.pid):
            kill_job(proc)


def _run_wave(jobs: dict[str, Job]) -> dict[str, str]:
    """Launch every job at once, wait (bounded, no polling), require success; name -> output."""
    outs = {}
    with contextlib.ExitStack() as stack:
        procs = {name: stack.enter_context(_job(*job)) for name, job in jobs.items()}
        deadline = time.monotonic() + WAVE_TIMEOUT
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: fsdp_train.py did not finish within {WAVE_TIMEOUT} s")
            out = _log_path(jobs[name][1]).read_text(errors="replace")
            assert proc.returncode == 0, f"{name}: fsdp_train.py failed ({proc.returncode}):\n{out}"
            outs[name] = out
    return outs


# ----------------------------------------------------------------------------- parsing
def _steps(out: str) -> dict[int, tuple[str, int]]:
    """step -> (loss text, bytes/step) of every logged step."""
    return {int(m[1]): (m[2], int(m[3])) for m in STEP_RE.finditer(out)}


def _final(out: str) -> tuple[int, float, str]:
    """(step, val loss, params sha256) of the final line."""
    m = FINAL_RE.search(out)
    assert m is not None, f"no final line in:\n{out}"
    return int(m[1]), float(m[2]), m[3]


def _totals(out: str) -> tuple[int, int]:
    """(bytes_sent, steps) of comm_stats() as printed at the end."""
    m = TOTALS_RE.search(out)
    assert m is not None, f"no comm totals in:\n{out}"
    return int(m[1]), int(m[2])


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_bitwise(a: Path, b: Path) -> None:
    """Two saved full model states: same names, dtypes, shapes and bytes."""
    sa, sb = _load(a), _load(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        x, y = sa[name], sb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name


# ----------------------------------------------------------------------------- fixtures
def _straight_then_resume(
    root: Path, recipe: str, resumes: dict[str, int], plant: str | None = None
) -> dict[str, tuple[str, Path]]:
    """Two waves of launches; name -> (output, final weights file) of each.

    Wave 1: ``<recipe>_straight``, N steps on 2 ranks, checkpoints at N/2 and N.
    Wave 2, fresh processes side by side, each in a new directory holding only the
    straight run's N/2 checkpoint (as if the run had stopped there): for each
    ``name: ranks`` of ``resumes``, ``--resume`` to N on that many ranks. The
    directory of ``plant`` also gets the bad checkpoints of :func:`_plant_bad_checkpoints`.
    """
    flags = RECIPES[recipe]
    straight = f"{recipe}_straight"
    final = {name: root / f"{name}.pt" for name in (straight, *resumes)}
    extra = [*flags, f"--steps={STEPS}", f"--save-final={final[straight]}"]
    outs = _run_wave({straight: (2, root / straight, extra)})
    saved = root / straight / f"step_{HALF:08d}"
    assert (saved / "COMPLETE").is_file(), f"no complete checkpoint at step {HALF}"
    wave2: dict[str, Job] = {}
    for name, nproc in resumes.items():
        shutil.copytree(saved, root / name / saved.name)
        if name == plant:
            _plant_bad_checkpoints(root / name, saved)
        extra = [*flags, f"--steps={STEPS}", "--resume", f"--save-final={final[name]}"]
        wave2[name] = (nproc, root / name, extra)
    outs.update(_run_wave(wave2))
    return {name: (out, final[name]) for name, out in outs.items()}


def _plant_bad_checkpoints(ckpt_dir: Path, good: Path) -> None:
    """Newer than ``good``: one interrupted (no marker), one with a truncated data file."""
    interrupted = ckpt_dir / f"step_{HALF + 1:08d}"
    shutil.copytree(good, interrupted)
    (interrupted / "COMPLETE").unlink()
    corrupt = ckpt_dir / f"step_{HALF + 2:08d}"
    shutil.copytree(good, corrupt)
    manifest = json.loads((corrupt / "COMPLETE").read_text())
    (corrupt / "COMPLETE").write_text(json.dumps({**manifest, "step": HALF + 2}))
    data = (corrupt / "__1_0.distcp").read_bytes()
    (corrupt / "__1_0.distcp").write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """fp32 recipe: straight; resumed on 2 ranks (bad checkpoints planted); resumed on 1."""
    root = tmp_path_factory.mktemp("fsdp_fp32")
    return _straight_then_resume(
        root, "fp32", {"fp32_resumed": 2, "fp32_reshard": 1}, plant="fp32_resumed"
    )


@pytest.fixture(scope="module")
def lowp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """The script's default recipe (int8 momentum, stochastic rounding, fp8 factors)."""
    root = tmp_path_factory.mktemp("fsdp_lowp")
    return _straight_then_resume(root, "lowp", {"lowp_resumed": 2})


def _key_bias(name: str, d_model: int) -> slice | None:
    """The key part of a fused QKV bias, or None."""
    return slice(d_model, 2 * d_model) if name.endswith("attn.qkv.bias") else None


# ----------------------------------------------------------------------------- tests
def _check_bitwise_resume(runs: dict[str, tuple[str, Path]], recipe: str) -> None:
    """The 2-rank resumed run ends bit for bit where the straight run ends."""
    ref_out, ref_final = runs[f"{recipe}_straight"]
    out, resumed_final = runs[f"{recipe}_resumed"]
    m = RESUMED_RE.search(out)
    assert m is not None, out
    assert (int(m[2]), int(m[3]), m[4]) == (HALF, 2, "same world size"), m[0]
    _assert_bitwise(ref_final, resumed_final)
    assert _final(out) == _final(ref_out)
    ref_rows, rows = _steps(ref_out), _steps(out)
    assert sorted(ref_rows) == list(range(1, STEPS + 1))
    assert sorted(rows) == list(range(HALF + 1, STEPS + 1))
    assert rows == {s: ref_rows[s] for s in rows}  # same loss and bytes at every step


def test_resume_same_world_size_is_bitwise(runs: dict[str, tuple[str, Path]]) -> None:
    _check_bitwise_resume(runs, "fp32")


def test_resume_skips_incomplete_checkpoints(runs: dict[str, tuple[str, Path]]) -> None:
    out, _ = runs["fp32_resumed"]
    corrupt, interrupted = f"step_{HALF + 2:08d}", f"step_{HALF + 1:08d}"
    assert f"skipping checkpoint {corrupt} (step {HALF + 2}): __1_0.distcp is missing or" in out
    assert f"skipping checkpoint {interrupted} (step {HALF + 1}): no COMPLETE marker" in out
    m = RESUMED_RE.search(out)
    assert m is not None and m[1].endswith(f"step_{HALF:08d}") and int(m[2]) == HALF, out


def test_resume_on_another_world_size(runs: dict[str, tuple[str, Path]]) -> None:
    """2 ranks -> 1 rank: close, not bitwise (float sums in another order).

    Dion's matrices and every Lion param agree to float rounding, except the key
    part of the fused QKV biases: softmax is invariant to it, so its exact gradient
    is zero and what the backward pass returns is rounding noise, whose sign Lion
    follows (a step of +-scalar_lr either way). Those entries are bounded by
    2 * scalar_lr per step instead.
    """
    (ref_out, ref_final), (out, final) = runs["fp32_straight"], runs["fp32_reshard"]
    m = RESUMED_RE.search(out)
    assert m is not None, out
    assert (int(m[2]), int(m[3]), m[4]) == (HALF, 2, "resharded by DCP"), m[0]
    assert "batch 16 x 1 ranks" in out
    ref, got = _load(ref_final), _load(final)
    assert ref.keys() == got.keys()
    worst, noise = 0.0, 0.0
    for name, want in ref.items():
        diff = (got[name] - want).abs()
        key = _key_bias(name, MODEL["d_model"])
        if key is not None:
            noise = max(noise, diff[key].max().item())
            diff[key] = 0
        worst = max(worst, diff.max().item())
    print(f"2 -> 1 ranks: max |param - straight| = {worst:.3g} (key biases {noise:.3g})")
    assert worst <= RESHARD_ATOL
    assert noise <= 2 * SCALAR_LR * (STEPS - HALF) + 1e-6
    (_, ref_val, _), (_, val, _) = _final(ref_out), _final(out)
    assert abs(val - ref_val) <= 1e-3
    ref_rows, rows = _steps(ref_out), _steps(out)
    assert sorted(rows) == list(range(HALF + 1, STEPS + 1))
    for step, (loss, nbytes) in rows.items():
        assert abs(float(loss) - float(ref_rows[step][0])) <= 1e-3, step
        assert nbytes == 0, step  # one rank: the optimizer sends nothing


def _accounting(comm_dtype: str) -> tuple[int, int]:
    """(bytes of one step by dion_lp's accounting, bytes of one extra Gram pass of one P)."""
    groups = dion_lp.param_groups(GPT(GPTConfig(**MODEL)), scalar_algorithm="lion")
    mats = [tuple(p.shape) for g in groups if g["algorithm"] == "dion" for p in g["params"]]
    ranks = {dion_rank(m, n, 0.25, 1) for m, n in mats}
    assert len(ranks) == 1  # every matrix of this model has the same r: one extra-pass size
    r = ranks.pop()
    n_params = sum(len(g["params"]) for g in groups)
    base = step_bytes([(m, n, 0) for m, n in mats], 2, comm_dtype, 0.25)["total"]
    base += collective_bytes("all_reduce", 2 * n_params, 2)  # agreement on non-finite grads
    return base, r * (r + 1) // 2


def _check_bytes(runs: dict[str, tuple[str, Path]], recipe: str) -> None:
    """Logged bytes/step: > 0, summing to comm_stats()'s total, equal to the accounting."""
    comm_dtype = RECIPES[recipe][2].split("=")[1]
    base, triangle = _accounting(comm_dtype)
    extra_pass = {mean_bytes(k * triangle, "fp32", 2): k for k in range(0, 3 * 8 + 1)}
    out, _ = runs[f"{recipe}_straight"]
    rows = _steps(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(nbytes > 0 for _, nbytes in rows.values())
    assert _totals(out) == (sum(nbytes for _, nbytes in rows.values()), STEPS)
    for step, (_, nbytes) in rows.items():
        assert nbytes - base in extra_pass, (step, nbytes, base)
    assert min(nbytes for _, nbytes in rows.values()) == base  # steps without a third pass
    # across a restart: the resumed run's totals include the checkpointed counters
    resumed = runs[f"{recipe}_resumed"][0]
    before = sum(nbytes for step, (_, nbytes) in rows.items() if step <= HALF)
    after = sum(nbytes for _, nbytes in _steps(resumed).values())
    assert _totals(resumed) == (before + after, STEPS)


def test_bytes_per_step(runs: dict[str, tuple[str, Path]]) -> None:
    _check_bytes(runs, "fp32")


@pytest.mark.slow
def test_default_recipe_resume_and_bytes(lowp_runs: dict[str, tuple[str, Path]]) -> None:
    """int8 momentum with stochastic rounding, fp8 factors: bitwise too (4 more launches)."""
    _check_bitwise_resume(lowp_runs, "lowp")
    _check_bytes(lowp_runs, "lowp")
