"""Transient peak memory of one optimizer step, each configuration in a fresh process.

One fp32 parameter (4096 x 4096, 64 MiB; ``--shape M N``) with a random fp32
gradient; the figure is the process's peak resident memory above its baseline
during the *first* ``step()``, so the optimizer state (created lazily in that
step) is included, as are every temporary the step allocates.

Method, in a child process per configuration and repeat (``python -m
benchmarks.transient --child <json config>``, one intra-op thread):

1. warm up whatever compiles: one step of the same optimizer configuration on a
   separate parameter, then drop that optimizer and parameter. dion_lp compiles
   its quantization kernels on first use with the block count dynamic and the
   block length static, so a small 64 x N parameter (same row length) reaches
   the same graphs; torchao's AdamW8bit compiles its update with
   ``dynamic=False`` (a graph per shape), so it is warmed up on a parameter of
   the measured shape. The child reports the graphs dynamo compiled *during*
   the measured step (``new graphs``, expected 0): compiler memory is not counted;
2. build the measured parameter, its gradient and the optimizer;
3. ``gc.collect()``, then ``malloc_trim(0)`` (glibc) so free heap pages left by
   the warm-up are not resident and cannot hide allocations of the step;
4. baseline = ``VmRSS`` of ``/proc/self/status``; reset the high-water mark by
   writing "5" to ``/proc/self/clear_refs``;
5. ``opt.step()`` once; peak = ``VmHWM - baseline``, retained = ``VmRSS - baseline``
   (what the process holds after the step, free heap pages included), live = the
   same after another ``gc.collect()`` + ``malloc_trim(0)`` (about the state).

Every configuration runs twice: with glibc's default allocator (``peak``: what a
user sees, but it jumps by 10-20 MiB between identical runs) and with
``MALLOC_MMAP_THRESHOLD_=65536`` (``live-tensor peak``: reproducible to 1 MiB);
:mod:`benchmarks._rss` says why.

State bytes after the step: ``opt.state_bytes()`` for dion_lp, every tensor of
``opt.state`` for the others (tensor subclasses flattened, shared storages once:
``benchmarks._rows.state_bytes``). Closed forms: Dion's from
``benchmarks.memory.dion_state_bytes`` (momentum buffer + Q of ``min(m, n) x r``,
fp32 with fp32 momentum else bf16); the element-wise rules' from
``dion_lp.quant.buffer.buffer_nbytes`` of each buffer; the baselines' from
``benchmarks.memory.baseline_state_bytes``. A dion_lp child fails if its state
differs from the closed form. Each configuration runs ``--repeats`` times (a
fresh process each); the table shows the median peak. ``issue`` is the peak the
issue reported for the default shape and rank (an earlier dion_lp version).

    python -m benchmarks.transient                       # default grid, 4096 x 4096, rank 1/4
    python -m benchmarks.transient --quick --repeats 3   # 512 x 1024
    python -m benchmarks.transient --rows dion/int8/sr,torch-adamw --shape 2048 8192
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dion_lp.algorithms.elementwise import ELEMENTWISE_STATE, state_format
from dion_lp.quant.buffer import buffer_nbytes

from ._rows import state_bytes
from ._rss import MMAP_THRESHOLD, reset_peak, status_bytes, trim_heap
from ._tables import Column, environment, format_table, write_results
from .memory import BLOCK_SIZE, DionConfig, _eager_torchao, baseline_state_bytes, dion_state_bytes
from .shapes import ParamSpec

__all__ = [
    "Config",
    "child_row",
    "closed_form",
    "default_grid",
    "main",
    "run_config",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPE = (4096, 4096)
QUICK_SHAPE = (512, 1024)
WARMUP_ROWS = 64
MARKER = "TRANSIENT_ROW "
MIB = 2**20
# baseline key -> (its closed form in benchmarks.memory.BASELINE_FORMS, its state format)
BASELINES = {
    "torch-adamw": ("adamw (torch)", "fp32"),
    "torchao-adamw8bit": ("adamw8bit (torchao)", "8-bit blockwise"),
    "bnb-adamw8bit": ("adamw8bit (bitsandbytes)", "8-bit blockwise"),
}
# issue: 4096 x 4096, rank 1/4, an earlier dion_lp (MiB above the baseline)
ISSUE_PEAK_MIB = {
    "dion/fp32/sr": 165, "dion/int8/sr": 300, "dion/fp8_e4m3/sr": 364,
    "dion/dynamic8/sr": 703, "dion/int8/rn": 180, "adamw/fp32/sr": 262,
    "adamw/int8/sr": 764, "lion/fp32/sr": 133, "lion/int8/sr": 280,
    "torch-adamw": 259, "torchao-adamw8bit": 241, "bnb-adamw8bit": 354,
}  # fmt: skip


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        optimizer: "dion_lp" or one of :data:`BASELINES`.
        rule: dion_lp's ``algorithm`` ("dion", "adamw", "lion"); "adamw" for baselines.
        fmt: dion_lp's ``momentum_dtype``.
        stochastic_rounding: dion_lp's rounding of the low-precision state.
        shape: the parameter's shape.
        rank_fraction: Dion's rank fraction.
        torchao_compile: run torchao's compiled step (else ``torch.compile`` -> identity).
    """

    optimizer: str
    rule: str = "dion"
    fmt: str = "fp32"
    stochastic_rounding: bool = True
    shape: tuple[int, int] = DEFAULT_SHAPE
    rank_fraction: float = 0.25
    torchao_compile: bool = True

    @property
    def key(self) -> str:
        """``rule/format/sr|rn`` for dion_lp, the baseline's name otherwise."""
        if self.optimizer != "dion_lp":
            return self.optimizer
        return f"{self.rule}/{self.fmt}/{'sr' if self.stochastic_rounding else 'rn'}"

    def labels(self) -> dict[str, str]:
        """The table's rule, format and rounding cells."""
        if self.optimizer == "dion_lp":
            rule = "dion" if self.rule == "dion" else f"{self.rule} (dion_lp)"
            rounding = "SR" if self.stochastic_rounding else "nearest"
            return {"rule": rule, "format": self.fmt, "rounding": rounding}
        rule, fmt = BASELINES[self.optimizer]
        if self.optimizer == "torchao-adamw8bit":
            rule = rule[:-1] + (", compiled)" if self.torchao_compile else ", eager)")
        return {"rule": rule, "format": fmt, "rounding": "-"}


def default_grid(
    shape: tuple[int, int], rank_fraction: float, torchao_compile: bool
) -> list[Config]:
    """Dion in six formats (SR; nearest for the 8-bit ones), AdamW and Lion rules, baselines."""
    base = Config("dion_lp", shape=shape, rank_fraction=rank_fraction)
    formats = ("fp32", "int8", "fp8_e4m3", "dynamic8", "int4", "fp4_e2m1")
    dion = [replace(base, fmt=f) for f in formats]
    dion += [
        replace(base, fmt=f, stochastic_rounding=False) for f in ("int8", "fp8_e4m3", "dynamic8")
    ]
    rules = [replace(base, rule=r, fmt=f) for r in ("adamw", "lion") for f in ("fp32", "int8")]
    rules.append(replace(base, rule="lion", fmt="int4"))
    baselines = [
        replace(base, optimizer=b, rule="adamw", torchao_compile=torchao_compile) for b in BASELINES
    ]
    return dion + rules + baselines


def closed_form(cfg: Config) -> int:
    """Closed form of the state bytes after one step (see the module docstring)."""
    spec = ParamSpec("weight", cfg.shape, "dion-matrix")
    if cfg.optimizer != "dion_lp":
        return baseline_state_bytes([spec], BASELINES[cfg.optimizer][0])
    if cfg.rule == "dion":
        return dion_state_bytes([spec], DionConfig(cfg.fmt, cfg.rank_fraction))
    return sum(
        buffer_nbytes(cfg.shape, state_format(cfg.fmt, unsigned=unsigned), BLOCK_SIZE)
        for unsigned in ELEMENTWISE_STATE[cfg.rule].values()
    )


# ----------------------------------------------------------------------------- child
def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> Any:
    """The optimizer of ``cfg`` over ``params`` (ImportError if a baseline is missing)."""
    if cfg.optimizer == "dion_lp":
        dion_lp = importlib.import_module("dion_lp")
        group = {"params": params, "algorithm": cfg.rule, "rank_fraction": cfg.rank_fraction}
        return dion_lp.Dion(
            [group], momentum_dtype=cfg.fmt, stochastic_rounding=cfg.stochastic_rounding
        )
    if cfg.optimizer == "torch-adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    module = "torchao.optim" if cfg.optimizer == "torchao-adamw8bit" else "bitsandbytes.optim"
    return importlib.import_module(module).AdamW8bit(params, lr=1e-3)


def _warm_up(cfg: Config, shape: tuple[int, int]) -> None:
    """One step of ``cfg``'s optimizer on a parameter of ``shape``, all dropped on return."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    p.grad = torch.randn(shape, generator=gen)
    build_optimizer(cfg, [p]).step()


def _measure(cfg: Config) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; the measured figures."""
    counters = torch._dynamo.utils.counters["stats"]
    warm_rows = cfg.shape[0] if cfg.optimizer == "torchao-adamw8bit" else WARMUP_ROWS
    _warm_up(cfg, (min(warm_rows, cfg.shape[0]), cfg.shape[1]))
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(cfg.shape, generator=gen))
    p.grad = torch.randn(cfg.shape, generator=gen)
    opt = build_optimizer(cfg, [p])
    gc.collect()
    trim_heap()
    graphs = counters["unique_graphs"]
    baseline = status_bytes("VmRSS")
    reset_peak()
    start = time.perf_counter()
    opt.step()
    step_s = time.perf_counter() - start
    peak, retained = status_bytes("VmHWM") - baseline, status_bytes("VmRSS") - baseline
    gc.collect()
    trim_heap()
    return {
        "peak_bytes": peak,
        "retained_bytes": retained,
        "live_bytes": status_bytes("VmRSS") - baseline,
        "state_bytes": state_bytes(opt),
        "new_graphs": counters["unique_graphs"] - graphs,
        "step_s": step_s,
        "baseline_rss_bytes": baseline,
    }


def child_row(cfg: Config) -> dict[str, Any]:
    """Measure ``cfg`` in this process; a missing baseline library gives an "unavailable" row.

    Raises:
        AssertionError: a dion_lp row whose state bytes differ from :func:`closed_form`.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    row: dict[str, Any] = {"key": cfg.key, **cfg.labels()}
    eager = cfg.optimizer == "torchao-adamw8bit" and not cfg.torchao_compile
    try:
        with _eager_torchao(not eager):
            row.update(_measure(cfg))
    except ImportError as exc:
        if cfg.optimizer == "dion_lp":
            raise
        return {**row, "status": f"unavailable: {type(exc).__name__}: {exc}"[:200]}
    closed = closed_form(cfg)
    row.update(closed_form_bytes=closed, closed_form_equal=row["state_bytes"] == closed)
    if cfg.optimizer == "dion_lp" and not row["closed_form_equal"]:
        raise AssertionError(f"{cfg.key}: state {row['state_bytes']} B != closed form {closed} B")
    return {**row, "status": "ok"}


def _child_main(text: str) -> int:
    """``--child``: measure the JSON config ``text``, print the row after :data:`MARKER`."""
    data = json.loads(text)
    cfg = Config(**{**data, "shape": tuple(data["shape"])})
    print(MARKER + json.dumps(child_row(cfg)), flush=True)
    return 0


# ----------------------------------------------------------------------------- parent
def run_config(cfg: Config, timeout_s: float = 900.0, mmap: bool = False) -> dict[str, Any]:
    """:func:`child_row` of ``cfg`` in a fresh interpreter (a "failed" row if it dies).

    ``mmap``: glibc maps every allocation above 64 KiB on its own and unmaps it when
    freed (``MALLOC_MMAP_THRESHOLD_``), so the peak is that of the live tensors.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    if mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [sys.executable, "-m", "benchmarks.transient", "--child", json.dumps(asdict(cfg))]
    try:
        out = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"key": cfg.key, **cfg.labels(), "status": f"failed: timeout after {timeout_s} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARKER)]
    if out.returncode == 0 and lines:
        return json.loads(lines[-1][len(MARKER) :])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {
        "key": cfg.key,
        **cfg.labels(),
        "status": f"failed (exit {out.returncode}): {tail}"[:300],
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeats of a configuration: median peak, min and max, every run ok."""
    ok = [r for r in runs if r["status"] == "ok"]
    if len(ok) < len(runs):
        return next(r for r in runs if r["status"] != "ok")
    peaks = [r["peak_bytes"] for r in ok]
    row = {**ok[0], "repeats": len(ok)}
    row.update(
        peak_bytes=statistics.median(peaks),
        peak_min_bytes=min(peaks),
        peak_max_bytes=max(peaks),
        retained_bytes=statistics.median(r["retained_bytes"] for r in ok),
        live_bytes=statistics.median(r["live_bytes"] for r in ok),
        step_s=statistics.median(r["step_s"] for r in ok),
        new_graphs=max(r["new_graphs"] for r in ok),
    )
    if len({r["state_bytes"] for r in ok}) > 1:
        row["status"] = "state bytes differ between repeats"
    return row


def _add_ratios(rows: list[dict[str, Any]], issue: bool) -> None:
    """MiB columns, the ratio to Dion fp32 SR's peak and the issue's figure."""
    ref = next((r for r in rows if r["key"] == "dion/fp32/sr" and r["status"] == "ok"), None)
    for r in rows:
        for name in ("peak", "tensor_peak", "retained", "live", "state", "closed_form"):
            value = r.get(f"{name}_bytes")
            r[f"{name}_mib"] = None if value is None else value / MIB
        ok = ref is not None and r["status"] == "ok"
        r["peak_vs_dion_fp32"] = r["peak_bytes"] / ref["peak_bytes"] if ok else None
        r["issue_peak_mib"] = ISSUE_PEAK_MIB.get(r["key"]) if issue else None


COLUMNS = [
    Column("rule", "rule"),
    Column("format", "format"),
    Column("rounding", "rounding"),
    Column("peak_mib", "peak MiB", ".1f"),
    Column("tensor_peak_mib", "live-tensor peak MiB", ".1f"),
    Column("state_mib", "state MiB", ".2f"),
    Column("closed_form_mib", "closed form MiB", ".2f"),
    Column("peak_vs_dion_fp32", "peak / dion fp32", ".2f"),
    Column("live_mib", "live after MiB", ".1f"),
    Column("issue_peak_mib", "issue MiB"),
    Column("new_graphs", "new graphs"),
    Column("status", "status"),
]


def _parser() -> argparse.ArgumentParser:
    """Command-line options (``--child`` is internal: the parent's per-row call)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.transient", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--shape", type=int, nargs=2, metavar=("M", "N"), default=list(DEFAULT_SHAPE))
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPE[0]} x {QUICK_SHAPE[1]}")
    p.add_argument("--rank-fraction", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration")
    p.add_argument("--rows", default="", help="comma list of row keys (default: the whole grid)")
    p.add_argument("--torchao-eager", action="store_true", help="torch.compile -> identity")
    p.add_argument("--glibc-only", action="store_true", help="skip the live-tensor runs")
    p.add_argument("--out", type=Path, default=Path("results/transient"))
    p.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the grid (one fresh process per configuration and repeat), print, write CSV + JSON.

    Returns:
        0, or 1 if a row failed (a baseline whose import fails is "unavailable", not a
        failure); a dion_lp row fails if its state differs from the closed form.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.child is not None:
        return _child_main(args.child)
    shape = QUICK_SHAPE if args.quick else tuple(args.shape)
    grid = default_grid(shape, args.rank_fraction, not args.torchao_eager)
    wanted = [k for k in args.rows.split(",") if k]
    unknown = set(wanted) - {c.key for c in grid}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {[c.key for c in grid]}")
    configs = [c for c in grid if not wanted or c.key in wanted]
    rows = []
    for cfg in configs:
        row = aggregate([run_config(cfg) for _ in range(args.repeats)])
        if not args.glibc_only:
            live = aggregate([run_config(cfg, mmap=True) for _ in range(args.repeats)])
            row["tensor_peak_bytes"] = live.get("peak_bytes")
        rows.append(row)
        print(f"  {cfg.key}: {rows[-1]['status']}", file=sys.stderr, flush=True)
    _add_ratios(rows, issue=shape == DEFAULT_SHAPE and args.rank_fraction == 0.25)
    print(f"transient peak of one step, {shape[0]} x {shape[1]} fp32, rank {args.rank_fraction:g},")
    print(f"median of {args.repeats} fresh process(es) per row; MiB above the pre-step RSS")
    print(format_table(rows, COLUMNS))
    meta = {
        "command": " ".join(["python -m benchmarks.transient", *argv]),
        "environment": environment(),
        "shape": list(shape),
        "rank_fraction": args.rank_fraction,
        "repeats": args.repeats,
        "issue_peak_mib": ISSUE_PEAK_MIB,
        "notes": __doc__,
    }
    write_results(args.out, "transient", rows, meta)
    print(f"\nwrote {args.out}/transient.{{csv,json}}")
    failed = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("unavailable")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
