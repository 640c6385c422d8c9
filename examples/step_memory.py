"""Peak memory of whole training steps, measured in a fresh process per optimizer.

Used by ``examples/finetune_memory_budget.py --memory``. How it is measured on a
CPU (Linux), in a child process started for one optimizer:

1. warm-up: build the model and the optimizer and run two steps (whatever
   compiles, compiles: torchao's step, dion_lp's codecs), then drop them,
   ``gc.collect()`` and glibc's ``malloc_trim(0)``;
2. load the model again in its training dtype: the *loaded-model baseline* is
   the resident memory (``VmRSS`` of ``/proc/self/status``) now; the high-water
   mark is reset (``echo 5 > /proc/self/clear_refs``);
3. run ``steps`` steps with one-example batches of 16 tokens (activations ~0),
   read ``VmHWM``: *above* = what the steps added (gradients, optimizer state,
   the steps' temporaries); then, high-water mark reset, ``steps`` steps with the
   training batch (activations included).

The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation above
64 KiB is its own mapping, unmapped when freed, so the peak RSS is the peak of the
bytes held by live tensors (glibc's default keeps freed heap chunks resident, and
the figure then moves by tens of MiB between identical runs). Each measured peak
is set beside a closed form from the shapes: weights + gradients (all of them;
with the step in backward, the largest parameter's) + the optimizer's state.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from benchmarks._rss import MMAP_THRESHOLD, reset_peak, status_bytes, trim_heap

__all__ = ["MARKER", "probe", "run_probe"]

MARKER = "STEP_MEMORY "


Batch = tuple[Tensor, Tensor, Tensor]
Step = Callable[[nn.Module, Any, Batch], None]


def _steps(model: nn.Module, opt: Any, step: Step, batches: Sequence[Batch]) -> None:
    for batch in batches:
        step(model, opt, batch)


def probe(
    make_model: Callable[[], nn.Module],
    make_opt: Callable[[nn.Module], Any],
    step: Step,
    tiny: Sequence[Batch],
    train: Sequence[Batch],
) -> dict[str, Any]:
    """The child's measurement (see the module docstring); byte counts.

    Args:
        make_model: a fresh model in its training dtype.
        make_opt: the optimizer over it (with the step in backward installed if used).
        step: one training step (forward, backward, and the optimizer's step).
        tiny, train: the batches of the two measurements.
    """
    model = make_model()
    opt = make_opt(model)
    _steps(model, opt, step, train[:2])  # compile whatever compiles
    del model, opt
    gc.collect()
    trim_heap()
    model = make_model()
    gc.collect()
    trim_heap()
    base = status_bytes("VmRSS")
    reset_peak()
    opt = make_opt(model)
    _steps(model, opt, step, tiny)
    above_tiny = status_bytes("VmHWM") - base
    reset_peak()
    _steps(model, opt, step, train)
    above_train = status_bytes("VmHWM") - base
    params = list(model.parameters())
    return {
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        "largest_param_bytes": max(p.numel() * p.element_size() for p in params),
        "above_tiny_bytes": above_tiny,
        "above_train_bytes": above_train,
        "steps": len(tiny),
    }


def run_probe(script: str, argv: Sequence[str], timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run ``python script *argv`` (a child calling :func:`probe`) and parse its result line.

    Returns:
        The child's dict, or ``{"status": "failed: ..."}``.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    cmd = [sys.executable, script, *argv]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timeout after {timeout_s:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARKER)]
    if out.returncode == 0 and lines:
        return {"status": "ok", **json.loads(lines[-1][len(MARKER) :])}
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"failed (exit {out.returncode}): {tail}"[:300]}
