"""Ablation of precision recipes: Dion's low-precision options against AdamW-type baselines.

A byte-level GPT (:mod:`benchmarks.model`) is trained data-parallel on gloo
ranks over the Python standard library's own source (:mod:`benchmarks.data`),
once per row and seed, with the same init, data order, lr schedule and
evaluation for every row. The ranks are spawned once and run every row.

    python -m benchmarks.ablation                       # default grid: 2.5-4.5 min on 2 cores
    python -m benchmarks.ablation --rows adamw,dion_fp32 --steps 100
    python -m benchmarks.ablation --full --seeds 3      # every row, longer

Writes ``ablation.csv``, ``ablation.json`` and three PNGs under ``--out``, and
prints the table (columns explained in :mod:`benchmarks._report`; rows and
their learning rates in :mod:`benchmarks._rows`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import queue as queue_mod
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_args", "run"]

DEFAULT_STEPS = 120
FULL_STEPS = 600


def _parse_seeds(text: str) -> tuple[int, ...]:
    """Parse ``--seeds``: a count ("3" runs seeds 0, 1, 2) or a list ("4,7")."""
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --seeds {text!r}") from None
    if len(values) == 1:
        if values[0] < 1:
            raise argparse.ArgumentTypeError("--seeds N needs N >= 1")
        return tuple(range(values[0]))
    return tuple(values)


# (flag, default, help) of the integer flags with a default
_INT_FLAGS = (
    ("--world-size", 2, "data-parallel gloo ranks"),
    ("--batch-size", 16, "sequences per rank per step"),
    ("--seq-len", 64, "bytes per sequence"),
    ("--d-model", 128, "model width"),
    ("--n-layer", 2, "transformer blocks"),
    ("--n-head", 4, "attention heads"),
    ("--eval-every", 12, "steps between validation evaluations"),
    ("--eval-windows", 256, "validation windows of seq-len bytes per evaluation"),
    ("--warmup", 12, "linear lr warm-up steps (at most steps / 5)"),
)


def _parser() -> argparse.ArgumentParser:
    from ._rows import DEFAULT_ROWS, DION_COMM_MODES, ROWS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation", description=__doc__.split("\n\n")[0]
    )
    grid, every = ",".join(DEFAULT_ROWS), ",".join(ROWS)
    p.add_argument("--rows", help=f"comma list of rows (default grid: {grid}; all: {every})")
    p.add_argument("--full", action="store_true", help=f"every row, {FULL_STEPS} steps")
    p.add_argument("--steps", type=int, help=f"steps per row (default: {DEFAULT_STEPS})")
    p.add_argument(
        "--seeds",
        type=_parse_seeds,
        default="1",
        help="N runs seeds 0..N-1; a comma list runs those seeds (default: 1)",
    )
    for flag, default, text in _INT_FLAGS:
        p.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")
    p.add_argument("--tied", action="store_true", help="tie the output head to the embedding")
    p.add_argument(
        "--dion-comm",
        choices=DION_COMM_MODES,
        default="auto",
        help="how Dion rows communicate: hook = DDP + dion_lp.hooks; sync = Dion alone "
        "(grad_sync=True); ddp = DDP fp32 all-reduce, Dion non-replicated; auto = the first "
        "of hook, sync, ddp that the library builds (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/ablation"),
        help="output directory (default: %(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, help="seconds for the whole run (default: 120 + 1 per row-step)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (``--help`` lists them); ``row_names`` holds the rows to run."""
    from ._rows import DEFAULT_ROWS, ROWS

    p = _parser()
    args = p.parse_args(argv)
    _validate(p, args, ROWS, DEFAULT_ROWS)
    return args


def _validate(
    p: argparse.ArgumentParser, args: argparse.Namespace, rows: Any, default: Any
) -> None:
    if args.rows:
        names = tuple(n.strip() for n in args.rows.split(",") if n.strip())
    else:
        names = tuple(rows) if args.full else default
    unknown = [n for n in names if n not in rows]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(rows)}")
    args.row_names = names
    if args.steps is None:
        args.steps = FULL_STEPS if args.full else DEFAULT_STEPS
    for flag in ("steps", "world_size", "batch_size", "eval_every", "eval_windows", "warmup"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    from .model import GPTConfig

    try:
        args.model = GPTConfig(
            seq_len=args.seq_len,
            d_model=args.d_model,
            n_layer=args.n_layer,
            n_head=args.n_head,
            tied=args.tied,
        )
    except ValueError as exc:
        p.error(str(exc))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(args: argparse.Namespace) -> Any:
    from ._train import RunConfig

    return RunConfig(
        rows=args.row_names,
        seeds=args.seeds,
        steps=args.steps,
        batch_size=args.batch_size,
        model=args.model,
        world_size=args.world_size,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        warmup=min(args.warmup, max(1, args.steps // 5)),
        dion_comm=args.dion_comm,
    )


def run(cfg: Any, timeout: float, progress: bool = True) -> tuple[list[dict], str | None]:
    """Spawn ``cfg.world_size`` ranks once, run every row, collect rank 0's records.

    Args:
        cfg: a ``benchmarks._train.RunConfig``.
        timeout: seconds before the ranks are killed.
        progress: show a tqdm bar.

    Returns:
        ``(records, error)``: error is None, or why the run stopped early (the
        records collected so far are still returned).
    """
    import torch.multiprocessing as mp

    from ._train import worker

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=worker, args=(r, cfg, port, messages), daemon=True)
        for r in range(cfg.world_size)
    ]
    for proc in procs:
        proc.start()
    total = cfg.steps * len(cfg.rows) * len(cfg.seeds)
    bar = _progress_bar(total, progress)
    records: list[dict] = []
    try:
        error = "interrupted"
        error = _monitor(procs, messages, records, bar, time.monotonic() + timeout)
    finally:
        bar.close()
        _stop(procs, grace=30.0 if error is None else 2.0)
    return records, error


class _NoBar:
    """Stands in for tqdm when it is off or not installed."""

    def update(self, n: int) -> None:
        """Ignore progress."""

    def close(self) -> None:
        """Nothing to close."""


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (tqdm comes with the ``bench`` extra), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm not installed: no progress bar; pip install -e .[bench])", file=sys.stderr)
        return _NoBar()
    return tqdm(total=total, desc="ablation", unit="row-step", mininterval=0.5, file=sys.stderr)


def _monitor(procs: list, messages: Any, records: list, bar: Any, deadline: float) -> str | None:
    """Read the ranks' messages until all are done, one fails, dies, or time runs out."""
    done: set[int] = set()
    while len(done) < len(procs):
        if time.monotonic() > deadline:
            return "timed out (see --timeout)"
        try:
            msg = messages.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                return f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}"
            continue
        kind = msg[0]
        if kind == "progress":
            bar.update(msg[1])
        elif kind == "record":
            records.append(msg[1])
        elif kind == "done":
            done.add(msg[1])
        elif kind == "error":
            return f"rank {msg[1]} failed:\n{msg[2]}"
    return None


def _stop(procs: list, grace: float) -> None:
    """Join the ranks (``grace`` seconds each); terminate, then kill, the ones still running."""
    for proc in procs:
        proc.join(timeout=grace)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist_name in ("torch", "dion_lp", "torchao", "bitsandbytes", "numpy"):
        try:
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    return out


def _title(cfg: Any) -> str:
    m = cfg.model
    return (
        f"byte GPT d={m.d_model} L={m.n_layer} seq={m.seq_len}, {cfg.world_size} ranks x "
        f"batch {cfg.batch_size}, {cfg.steps} steps, seeds {list(cfg.seeds)}"
    )


def _write(args: argparse.Namespace, cfg: Any, records: list, wall: float, error: str | None):
    from dataclasses import asdict

    from . import _report, _rows
    from ._rows import REFERENCE_ROW, ROWS
    from .data import load_corpus, manifest

    twins = {name: ROWS[name].twin for name in cfg.rows if ROWS[name].twin}
    summary = _report.aggregate(records, cfg.rows, REFERENCE_ROW, twins)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["python -m benchmarks.ablation", *args.argv]),
        "config": asdict(cfg),
        "reference": REFERENCE_ROW,
        "hyperparameters": _rows.HYPERPARAMETERS,
        "notes": {name: ROWS[name].note for name in cfg.rows if ROWS[name].note},
        "environment": _versions(),
        "corpus": manifest(load_corpus(cfg.train_bytes, cfg.val_bytes)),
        "wall_time_s": wall,
        "error": error,
        "summary": summary,
        "records": records,
    }
    _report.write_json(report, args.out / "ablation.json")
    _report.write_csv(summary, args.out / "ablation.csv")
    try:
        _report.write_plots(summary, args.out, REFERENCE_ROW, _title(cfg))
    except ImportError:
        print("(matplotlib not installed: no plots; pip install -e .[bench])", file=sys.stderr)
    return _report.format_table(summary, REFERENCE_ROW)


def main(argv: list[str] | None = None) -> int:
    """Run the ablation and write its report; returns the exit code.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 if the run stopped early (partial results are still written).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    cfg = _config(args)
    timeout = args.timeout or 120.0 + cfg.steps * len(cfg.rows) * len(cfg.seeds)
    start = time.monotonic()
    records, error = run(cfg, timeout, progress=not args.no_progress)
    wall = time.monotonic() - start
    table = _write(args, cfg, records, wall, error)
    print(table)
    print(
        f"\n{len(cfg.rows)} rows x {len(cfg.seeds)} seed(s) x {cfg.steps} steps on "
        f"{cfg.world_size} ranks in {wall:.1f} s; wrote {args.out}/ablation.{{csv,json}} "
        "and plots"
    )
    if error:
        print(f"run stopped early: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
