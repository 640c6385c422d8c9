"""Optimizer step time per format, as ratios measured side by side in one run.

Every configuration steps the same matrices with the same gradients; the
timings are interleaved (round-robin over configurations, repeated) and the
median per configuration is reported, so machine noise hits all rows alike.
Ratios are to Dion fp32 and to torch's AdamW (foreach) on the same shapes.

    python -m benchmarks.step_time --shapes 768x768,768x3072 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import dion_lp

CONFIGS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "adamw (torch)": lambda ps, rf: torch.optim.AdamW(ps, lr=1e-3),
    "dion fp32": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf),
    "dion bf16 mom": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf, momentum_dtype="bf16"),
    "dion int8 mom": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf, momentum_dtype="int8"),
    "dion fp8 mom": lambda ps, rf: dion_lp.Dion(ps, rank_fraction=rf, momentum_dtype="fp8_e4m3"),
    "dion int8 mom, nearest": lambda ps, rf: dion_lp.Dion(
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


def main(argv: list[str] | None = None) -> None:
    """Print step time per config, per million parameters, and as ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="256x256,768x768,768x3072")
    parser.add_argument("--rank-fractions", default="1.0,0.25,0.0625")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
