"""examples/ddp_train.py end to end: 2 gloo ranks launched by torchrun, fresh processes.

- resume: N steps straight vs N/2, then (new processes) ``--resume`` to N: the
  final model files are equal bit for bit, and so are the logged steps after N/2;
- crash safety: the whole job (torchrun and both workers) is SIGKILL'ed once a
  complete checkpoint is on disk; an incomplete step directory (no marker,
  truncated files, a stray temp file) and a corrupted one (marker present, a file
  truncated) are planted; ``--resume`` skips both, continues from the newest
  complete checkpoint, and ends with the uninterrupted run's parameters;
- bytes: each logged step's bytes are the optimizer's plus the hook's, their sums
  are the counters' totals, the hook's share is the documented quantized-mean
  size of the non-Dion gradients, the optimizer's is the factors' plus at most the
  per-step non-finite agreement.

Each launch is ``python -m torch.distributed.run --standalone`` (rendezvous on a
free port chosen by the OS: works offline, no port to race for), in its own
session with a timeout; on any failure every process of the job is SIGKILL'ed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _jobs import descendants, kill_job

import dion_lp
from benchmarks.model import GPT, GPTConfig
from dion_lp.dist.accounting import collective_bytes, mean_bytes
from dion_lp.options import dion_rank

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
WORLD = 2
STEPS, EVERY = 16, 4
MODEL = dict(d_model=64, n_layer=2, n_head=4, seq_len=64)
RUN_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()]
RUN_ARGS += ["--batch-size=8", "--comm-dtype=fp8_e4m3", "--hook-dtype=bf16"]
RUN_ARGS += ["--momentum-dtype=int8", "--rank-fraction=0.25", f"--ckpt-every={EVERY}"]
RUN_ARGS += ["--warmup=12"]  # every resume point is mid warm-up: the lr must be the step's
# the hook sends the embeddings and head as rank-8 factors: their warm starts and
# residuals must survive a restart too
LOWRANK = 8
RUN_ARGS += [f"--hook-lowrank={LOWRANK}"]
LAUNCH_TIMEOUT = 120.0  # seconds per phase of launches (one takes ~15 s on 2 busy cores)
MARKER = "COMPLETE"

# The kill reads /proc to find torchrun's workers (each runs in a session of its own).
pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="needs Linux /proc to kill torchrun's workers"
)

STEP_RE = re.compile(
    r"step\s+(\d+) \| loss ([\d.]+) \| bytes/step (\d+) = optimizer (\d+) \+ hook (\d+)"
)
TOTALS_RE = re.compile(r"comm totals \| optimizer (\d+) B in (\d+) steps \| hook (\d+) B in (\d+)")
SHA_RE = re.compile(r"params sha256 ([0-9a-f]{64}) \(identical on (\d+) ranks\)")


# ----------------------------------------------------------------------------- processes
def _launch(ckpt_dir: Path, *extra: str) -> subprocess.Popen[str]:
    """Start torchrun (2 ranks) in a new session, stdout and stderr merged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={WORLD}", str(SCRIPT), *RUN_ARGS, f"--ckpt-dir={ckpt_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


@contextlib.contextmanager
def _job(ckpt_dir: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """A launched job that is killed, whole, if the block exits with it still running."""
    proc = _launch(ckpt_dir, *extra)
    try:
        yield proc
    finally:
        if proc.poll() is None or descendants(proc.pid):
            kill_job(proc)


def _wait(proc: subprocess.Popen[str], deadline: float) -> str:
    """Wait for a launched job until ``deadline``, require success; returns its output."""
    out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    assert proc.returncode == 0, f"ddp_train.py failed ({proc.returncode}):\n{out}"
    return out


# ----------------------------------------------------------------------------- parsing
def _steps(out: str) -> dict[int, tuple[str, int, int, int]]:
    """step -> (loss text, bytes/step, optimizer bytes, hook bytes) of every logged step."""
    rows = {}
    for m in STEP_RE.finditer(out):
        rows[int(m[1])] = (m[2], int(m[3]), int(m[4]), int(m[5]))
    return rows


def _sha(out: str) -> str:
    m = SHA_RE.search(out)
    assert m is not None and int(m[2]) == WORLD, f"no parameter checksum in:\n{out}"
    return m[1]


def _assert_same_params(a: Path, b: Path) -> None:
    """Two saved model states: same names, dtypes, shapes and bytes."""
    sa = torch.load(a, weights_only=True)
    sb = torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for name in sa:
        x, y = sa[name].contiguous(), sb[name].contiguous()
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name


def _complete_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in ckpt_dir.glob(f"step_*/{MARKER}"))


def _step_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}"


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Runs:
    """What the five launches printed and left on disk (see :func:`runs`)."""

    ref_out: str  # uninterrupted run of STEPS steps
    ref_final: Path  # its final model state
    half_out: str  # a run that stops at STEPS / 2 ...
    half_ckpt: Path  # ... and its checkpoints, which the resumed run extends
    resume_out: str  # STEPS / 2 -> STEPS, fresh processes
    resume_final: Path
    crash_ckpt: Path  # a run SIGKILL'ed after its first complete checkpoint, then resumed
    crash_rc: int | None  # torchrun's exit status after the kill
    crash_complete: list[int]  # complete checkpoints right after the kill
    partial: Path  # planted: an interrupted checkpoint (no marker, truncated files)
    corrupt: Path  # planted: a marker whose files do not match
    crash_resume_out: str
    crash_final: Path


def _kill_after_first_checkpoint(proc: subprocess.Popen[str], ckpt: Path, deadline: float) -> None:
    """Wait until ``ckpt`` holds a complete checkpoint, then SIGKILL the whole job."""
    # The one bounded wait on the filesystem: poll for the marker, then kill at once.
    while not _complete_steps(ckpt):
        assert proc.poll() is None, f"run ended before any checkpoint:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no complete checkpoint in time"
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed"
    kill_job(proc)


def _plant_bad_checkpoints(ckpt: Path, latest: int) -> tuple[Path, Path]:
    """An interrupted checkpoint after ``latest`` and a corrupted one past the end."""
    partial = _step_dir(ckpt, latest + EVERY)  # truncated files, a stray temp file, no marker
    partial.mkdir(exist_ok=True)
    for name in ("model.pt", "rank0.pt"):
        data = (_step_dir(ckpt, latest) / name).read_bytes()
        (partial / name).write_bytes(data[: len(data) // 2])
    (partial / ".rank1.pt.x1y2.tmp").write_bytes(b"half a file")
    (partial / MARKER).unlink(missing_ok=True)
    # Marker present, one file truncated: were it loaded, the run would stop ("past --steps").
    corrupt = _step_dir(ckpt, STEPS + 100)
    shutil.copytree(_step_dir(ckpt, latest), corrupt)
    manifest = json.loads((corrupt / MARKER).read_text())
    (corrupt / MARKER).write_text(json.dumps({**manifest, "step": STEPS + 100}))
    data = (corrupt / "rank1.pt").read_bytes()
    (corrupt / "rank1.pt").write_bytes(data[:-100])
    return partial, corrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Five launches in two phases of side-by-side jobs.

    Phase 1: uninterrupted (STEPS), stopping at STEPS / 2, and killed after its
    first complete checkpoint. Phase 2: both interrupted runs ``--resume`` to STEPS.
    A launch spends most of its ~15 s importing torch in three processes, so jobs
    side by side take little more than one.
    """
    ref, half, crash = (tmp_path_factory.mktemp(n) for n in ("reference", "half", "crash"))
    with contextlib.ExitStack() as stack:
        ref_job = stack.enter_context(
            _job(ref / "ckpt", f"--steps={STEPS}", f"--save-final={ref / 'final.pt'}")
        )
        half_job = stack.enter_context(_job(half / "ckpt", f"--steps={STEPS // 2}"))
        crash_job = stack.enter_context(_job(crash / "ckpt", f"--steps={STEPS}"))
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        _kill_after_first_checkpoint(crash_job, crash / "ckpt", deadline)
        ref_out, half_out = (_wait(job, deadline) for job in (ref_job, half_job))
    complete = _complete_steps(crash / "ckpt")
    assert complete, "the killed run left no complete checkpoint"
    partial, corrupt = _plant_bad_checkpoints(crash / "ckpt", complete[-1])

    resume = [f"--steps={STEPS}", "--resume"]
    with contextlib.ExitStack() as stack:
        jobs = [
            stack.enter_context(_job(d / "ckpt", *resume, f"--save-final={d / 'final.pt'}"))
            for d in (half, crash)
        ]
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        resume_out, crash_resume_out = (_wait(job, deadline) for job in jobs)
    return Runs(
        ref_out=ref_out,
        ref_final=ref / "final.pt",
        half_out=half_out,
        half_ckpt=half / "ckpt",
        resume_out=resume_out,
        resume_final=half / "final.pt",
        crash_ckpt=crash / "ckpt",
        crash_rc=crash_job.returncode,
        crash_complete=complete,
        partial=partial,
        corrupt=corrupt,
        crash_resume_out=crash_resume_out,
        crash_final=crash / "final.pt",
    )


# ----------------------------------------------------------------------------- tests
def test_resume_is_bitwise(runs: Runs) -> None:
    step = STEPS // 2
    assert f"resumed from {_step_dir(runs.half_ckpt, step)} (step {step})" in runs.resume_out
    _assert_same_params(runs.ref_final, runs.resume_final)
    assert _sha(runs.resume_out) == _sha(runs.ref_out)
    rows = {**_steps(runs.half_out), **_steps(runs.resume_out)}
    assert sorted(rows) == list(range(1, STEPS + 1))
    # same losses and bytes at every step, before and after the restart
    assert rows == _steps(runs.ref_out)


def test_sigkill_then_resume(runs: Runs) -> None:
    assert runs.crash_rc == -signal.SIGKILL
    assert runs.crash_complete[-1] < STEPS, f"not interrupted mid-run: {runs.crash_complete}"
    latest = runs.crash_complete[-1]
    out = runs.crash_resume_out
    assert f"resumed from {_step_dir(runs.crash_ckpt, latest)} (step {latest})" in out, out
    _assert_same_params(runs.ref_final, runs.crash_final)
    assert _sha(out) == _sha(runs.ref_out)


def test_incomplete_checkpoints_are_ignored(runs: Runs) -> None:
    out, ckpt = runs.crash_resume_out, runs.crash_ckpt
    partial_step = runs.crash_complete[-1] + EVERY
    assert f"skipping checkpoint {runs.corrupt.name} (step {STEPS + 100}): rank1.pt" in out, out
    assert f"skipping checkpoint {runs.partial.name} (step {partial_step}): no {MARKER}" in out
    # The partial directory was replaced by a whole checkpoint, then pruned with the other
    # old ones (--keep 2); the corrupted one, past this run's steps, is left alone.
    left = sorted(p.name for p in ckpt.iterdir())
    assert left == [_step_dir(ckpt, s).name for s in (STEPS - EVERY, STEPS, STEPS + 100)]
    assert _complete_steps(ckpt) == [STEPS - EVERY, STEPS, STEPS + 100]
    assert not list(ckpt.glob("step_*/.*.tmp")), "temp files left behind"


def test_bytes_per_step(runs: Runs) -> None:
    out = runs.ref_out
    rows = _steps(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, (_, total, opt_bytes, hook_bytes) in rows.items():
        assert total == opt_bytes + hook_bytes > 0, step
    totals = TOTALS_RE.search(out)
    assert totals is not None, out
    assert int(totals[2]) == int(totals[4]) == STEPS
    assert sum(r[2] for r in rows.values()) == int(totals[1])
    assert sum(r[3] for r in rows.values()) == int(totals[3])

    # Independent sizes: the same model's groups, dion_lp's documented byte formula.
    model = GPT(GPTConfig(**MODEL))
    groups = dion_lp.param_groups(model, scalar_algorithm="lion")
    dion = [p for g in groups if g["algorithm"] == "dion" for p in g["params"]]
    other = sum(p.numel() for g in groups if g["algorithm"] != "dion" for p in g["params"])
    n_params = sum(len(g["params"]) for g in groups)
    tall = short = 0
    for p in dion:
        m, n = max(p.shape), min(p.shape)
        r = dion_rank(m, n, 0.25, 1)
        assert (m + n) * r < m * n  # every matrix exchanges factors in this configuration
        tall, short = tall + m * r, short + n * r
    factors = mean_bytes(tall, "fp8_e4m3", WORLD) + mean_bytes(short, "fp8_e4m3", WORLD)
    whole = ps = qs = 0  # the hook: rank-r factors where (n + m) r * 2 <= n m, else whole
    for g in groups:
        for p in g["params"] if g["algorithm"] != "dion" else ():
            n, m = p.shape[0], p[0].numel()
            if p.dim() >= 2 and (n + m) * LOWRANK * 2 <= n * m:
                ps, qs = ps + n * LOWRANK, qs + m * LOWRANK
            else:
                whole += p.numel()
    assert ps > 0 and whole < other
    n_other = sum(len(g["params"]) for g in groups if g["algorithm"] != "dion")
    hook = sum(mean_bytes(k, "bf16", WORLD) for k in (whole, ps, qs))
    hook += collective_bytes("all_reduce", n_other, WORLD)  # a uint8 non-finite flag each
    for step, (_, _, opt_bytes, hook_bytes) in rows.items():
        assert hook_bytes == hook, step
        # + the per-step agreement on non-finite gradients: 2 uint8 flags per parameter
        assert factors <= opt_bytes <= factors + 2 * n_params, step
