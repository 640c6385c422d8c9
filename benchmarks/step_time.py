"""Optimizer step time per format, as ratios measured side by side in one run.

Every configuration steps the same matrices with the same gradients; the
timings are interleaved (round-robin over configurations, repeated) and the
median per configuration is reported, so machine noise hits all rows alike.
Ratios are to Dion fp32 and to torch's AdamW (foreach) on the same shapes.

    python -m benchmarks.step_time --shapes 768x768,768x3072 --repeats 7
    python -m benchmarks.step_time --breakdown          # where quantization time goes
    python -m benchmarks.step_time --world-size 2       # replicated vs single process
    python -m benchmarks.step_time --table issue15 --repeats 9 \
        --old /work/v010 --microsoft-dion /work/msdion --out results/step_table.json

``--breakdown`` times, on one matrix per format, the whole Dion step and the
two state conversions inside it (reading the momentum out to fp32, writing it
back quantized) with the same tensors, so their share of the step is measured,
not inferred. ``--world-size N`` spawns N gloo ranks (one thread each) that step
replicated Dion in every wire format, interleaved, and compares with the same
step in one process (one thread) measured in the same run. ``--table issue15``
prints issue 15's table (:mod:`benchmarks._step_table`): one step over the
eight matrices of two GPT-2-small blocks, 1 thread, dion_lp in five momentum
formats next to another dion_lp version, microsoft/dion's DionReference,
bitsandbytes' AdamW8bit and torch's AdamW, at rank fractions 1/4 and 1/16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import dion_lp
from dion_lp.quant.buffer import QuantizedBuffer

from . import _step_table

CONFIGS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "adamw (torch)": lambda ps, rf: torch.optim.AdamW(ps, lr=1e-3),
    "dion fp32": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf),
    "dion bf16 mom": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf, momentum_dtype="bf16"),
    "dion int8 mom": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf, momentum_dtype="int8"),
    "dion fp8 mom": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf, momentum_dtype="fp8_e4m3"),
    "dion int8 mom nearest": lambda ps, rf: dion_lp.Dion(
        ps, rank_fraction=rf, momentum_dtype="int8", stochastic_rounding=False
    ),
}


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        m, n = item.lower().split("x")
        shapes.append((int(m), int(n)))
    return shapes


def measure(
    shapes: list[tuple[int, int]], rank_fraction: float, repeats: int, configs: list[str]
) -> dict[str, float]:
    """Median seconds per optimizer step for each config over the same parameters.

    Args:
        shapes: matrix shapes (m, n) stepped together.
        rank_fraction: Dion's rank fraction.
        repeats: timed rounds (each round steps every config once).
        configs: names from :data:`CONFIGS`.

    Returns:
        config name -> median seconds per step.
    """
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    setups = {}
    for name in configs:
        params = [nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        try:
            opt = CONFIGS[name](params, rank_fraction)
        except NotImplementedError as err:
            print(f"  {name}: not available ({err})")
            continue
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()  # warm-up: creates state
        setups[name] = opt
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, opt in setups.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def breakdown(shape: tuple[int, int], rank_fraction: float, repeats: int) -> list[dict]:
    """Per momentum format: step time and the read/write conversions' share of it.

    Returns:
        One dict per format: ``fmt``, ``step_ms``, ``read_ms``, ``write_ms``
        (medians), ``share`` = (read + write) / step.
    """
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=gen)
    rows = []
    for fmt in ("fp32", "bf16", "int8", "fp8_e4m3", "dynamic8"):
        X = nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        opt = dion_lp.Dion([X], rank_fraction=rank_fraction, momentum_dtype=fmt)
        X.grad = grad.clone()
        opt.step()
        st = opt.state[X]
        steps, reads, writes = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            M = QuantizedBuffer(st, "momentum").read()
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            if fmt != "fp32":
                QuantizedBuffer(st, "momentum").write(M, stochastic=True, key=1)
            writes.append(time.perf_counter() - start)
        step, read, write = (statistics.median(v) for v in (steps, reads, writes))
        rows.append(
            dict(
                fmt=fmt,
                step_ms=step * 1e3,
                read_ms=read * 1e3,
                write_ms=write * 1e3,
                share=(read + write) / step if fmt != "fp32" else 0.0,
            )
        )
    return rows


def _rank_main(rank: int, world_size: int, store_path: str, args: dict, out: dict) -> None:
    """One replicated rank: median step time per wire format, interleaved."""
    import torch.distributed as dist

    from ._spawn import exit_rank

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        gen = torch.Generator().manual_seed(0)
        shapes, rf = args["shapes"], args["rank_fraction"]
        # every rank joins every singleton group; its own one makes Dion non-replicated
        alone = [dist.new_group([r]) for r in range(world_size)][rank]
        opts = {}
        for fmt in ("single", "fp32", "bf16", "fp8_e4m3", "fp8_e5m2"):
            params = [nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
            if fmt == "single":
                opt = dion_lp.Dion(params, rank_fraction=rf, process_group=alone)
            else:
                opt = dion_lp.Dion(params, rank_fraction=rf, comm_dtype=fmt)
            opts[fmt] = (opt, params)
        grads = [torch.randn(s) * (rank + 1) for s in shapes]
        times: dict[str, list[float]] = {fmt: [] for fmt in opts}
        for i in range(args["repeats"] + 1):
            for fmt, (opt, params) in opts.items():
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.clone()
                dist.barrier()
                start = time.perf_counter()
                opt.step()
                if i:  # the first round creates the state
                    times[fmt].append(time.perf_counter() - start)
        if rank == 0:
            out.update({fmt: statistics.median(ts) for fmt, ts in times.items()})
            out.update({f"{fmt}_bytes": opts[fmt][0].comm_stats()["last_step"] for fmt in opts})
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()


def replicated(
    shapes: list[tuple[int, int]], rank_fraction: float, repeats: int, world_size: int
) -> dict[str, float]:
    """Median replicated step time per wire format on ``world_size`` gloo ranks.

    Returns:
        fmt -> seconds (rank 0), ``f"{fmt}_bytes"`` -> wire bytes per step, and
        ``"single"`` -> the same step not replicated, interleaved in the same ranks.
    """
    import torch.multiprocessing as mp

    args = dict(shapes=shapes, rank_fraction=rank_fraction, repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        ctx = mp.start_processes(
            _rank_main,
            args=(world_size, os.path.join(tmp, "store"), args, out),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 600
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError("replicated step-time ranks did not finish in 600 s")
        return dict(out)


def main(argv: list[str] | None = None) -> None:
    """Print step time per config, per million parameters, and as ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        help="MxN,... (default 256x256,768x768,768x3072; --table: two GPT-2-small blocks)",
    )
    parser.add_argument("--rank-fractions", help="default 1.0,0.25,0.0625")
    parser.add_argument("--repeats", type=int, help="timed steps (default 5; --table: 9)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: default; --table: 1)"
    )
    parser.add_argument("--breakdown", action="store_true", help="state conversion share")
    parser.add_argument("--world-size", type=int, default=0, help="replicated ranks (0: off)")
    parser.add_argument("--table", choices=["issue15"], help="the issue's step-time table")
    parser.add_argument("--old", help="--table: checkout holding another dion_lp/ version")
    parser.add_argument("--microsoft-dion", help="--table: checkout of microsoft/dion")
    parser.add_argument("--out", help="--table: also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.table:
        torch.set_num_threads(args.threads or 1)
        shapes = _parse_shapes(args.shapes) if args.shapes else _step_table.SHAPES
        fractions = args.rank_fractions or _step_table.DEFAULT_FRACTIONS
        _step_table.run(
            shapes,
            [float(x) for x in fractions.split(",")],
            9 if args.repeats is None else args.repeats,
            old=args.old,
            microsoft_dion=args.microsoft_dion,
            out=args.out,
        )
        return
    args.shapes = args.shapes or "256x256,768x768,768x3072"
    args.rank_fractions = args.rank_fractions or "1.0,0.25,0.0625"
    args.repeats = 5 if args.repeats is None else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        _print_breakdown(_parse_shapes(args.shapes), args.rank_fractions, args.repeats)
        return
    if args.world_size:
        _print_replicated(_parse_shapes(args.shapes), args.rank_fractions, args, args.world_size)
        return
    configs = args.configs.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = f"{'shape':>10} {'rank':>6} {'config':<24} {'ms/step':>9} {'us/Mparam':>10}"
    print(header + f" {'vs dion fp32':>12} {'vs adamw':>9}")
    for shape in _parse_shapes(args.shapes):
        numel = shape[0] * shape[1]
        for rf in (float(x) for x in args.rank_fractions.split(",")):
            medians = measure([shape], rf, args.repeats, configs)
            base = medians.get("dion fp32")
            adam = medians.get("adamw (torch)")
            for name, sec in medians.items():
                ratio = f"{sec / base:12.2f}" if base else f"{'-':>12}"
                vs_adam = f"{sec / adam:9.2f}" if adam else f"{'-':>9}"
                label = f"{shape[0]}x{shape[1]}"
                print(
                    f"{label:>10} {rf:>6.4g} {name:<24} {sec * 1e3:9.2f} "
                    f"{sec * 1e6 / (numel / 1e6):10.0f} {ratio} {vs_adam}"
                )


def _print_breakdown(shapes: list[tuple[int, int]], fractions: str, repeats: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats}")
    print(
        f"{'shape':>10} {'rank':>6} {'momentum':<9} {'step ms':>8} {'read ms':>8} "
        f"{'write ms':>9} {'share':>6}"
    )
    for shape in shapes:
        for rf in (float(x) for x in fractions.split(",")):
            for row in breakdown(shape, rf, repeats):
                print(
                    f"{shape[0]}x{shape[1]:<5} {rf:>6.4g} {row['fmt']:<9} {row['step_ms']:8.2f} "
                    f"{row['read_ms']:8.2f} {row['write_ms']:9.2f} {row['share']:6.1%}"
                )


def _print_replicated(
    shapes: list[tuple[int, int]], fractions: str, args: argparse.Namespace, world_size: int
) -> None:
    print(f"{world_size} gloo ranks x 1 thread, replicated vs not, shapes {shapes}")
    print(f"{'rank':>6} {'wire':<9} {'ms/step':>8} {'vs single':>10} {'bytes/step':>11}")
    for rf in (float(x) for x in fractions.split(",")):
        result = replicated(shapes, rf, args.repeats, world_size)
        for fmt in ("single", "fp32", "bf16", "fp8_e4m3", "fp8_e5m2"):
            sec = result[fmt]
            print(
                f"{rf:>6.4g} {fmt:<9} {sec * 1e3:8.2f} {sec / result['single']:10.2f} "
                f"{result[f'{fmt}_bytes']:>11}"
            )


if __name__ == "__main__":
    main()
