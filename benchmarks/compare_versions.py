"""Optimizer step time of this dion_lp against another version, side by side in one process.

The repo's ``dion_lp`` is imported as usual and the other version's package as
``dion_lp_old`` from a checkout given with ``--old`` (its imports are relative,
so both live in the same process). Both step the same matrices, the eight of
two GPT-2-small blocks (768x2304, 768x768, 768x3072, 3072x768, twice: 14.2M
parameters), with the same gradients, in every configuration below. Steps are
interleaved: each round steps every (config, version) once, in an order that
is reversed every other round, so machine noise hits both versions alike; the
median per (config, version) and the ratio new / old are reported. Run it with
the other version checked out beside the repo:

    git worktree add --detach /work/v010 07e14e3        # the 0.1.0 release
    python -m benchmarks.compare_versions --old /work/v010 --repeats 9
    python -m benchmarks.compare_versions --old /work/v010 --out results/versions.json

Only the public API is used (``Dion(params, rank_fraction=..., momentum_dtype=...,
stochastic_rounding=...)`` and ``.step()``), so any two versions that have it
can be compared. ``new / old`` is the ratio of the medians; ``paired`` is the
median over rounds of the new / old ratio of the two steps of one round, and
``round ratios`` their range: with the same code on both sides they show the noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import dion_lp

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 2

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": dict(momentum_dtype="fp32"),
    "bf16 mom": dict(momentum_dtype="bf16", stochastic_rounding=True),
    "int8 mom SR": dict(momentum_dtype="int8", stochastic_rounding=True),
    "fp8_e4m3 mom SR": dict(momentum_dtype="fp8_e4m3", stochastic_rounding=True),
    "int8 mom nearest": dict(momentum_dtype="int8", stochastic_rounding=False),
}


def load_old(root: str, name: str = "dion_lp_old") -> ModuleType:
    """Import the ``dion_lp`` package under ``root`` as the module ``name``.

    Raises:
        ValueError: ``root`` holds no ``dion_lp/__init__.py``, or it is the
            package already imported as ``dion_lp``.
    """
    pkg = Path(root).resolve() / "dion_lp"
    init = pkg / "__init__.py"
    if not init.is_file():
        raise ValueError(f"Invalid --old: no {init}")
    if init == Path(dion_lp.__file__).resolve():
        raise ValueError(f"Invalid --old: {root} is the dion_lp imported as the new version")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: its relative imports look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _set_grads(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        if p.grad is None or p.grad.shape != g.shape:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def measure(
    versions: dict[str, ModuleType],
    shapes: list[tuple[int, int]],
    rank_fraction: float,
    repeats: int,
    configs: list[str],
) -> dict[tuple[str, str], list[float]]:
    """Seconds per optimizer step of every (config, version), interleaved.

    Args:
        versions: version label -> dion_lp module.
        shapes: matrix shapes stepped together.
        rank_fraction: Dion's rank fraction.
        repeats: timed rounds; each steps every (config, version) once.
        configs: names from :data:`CONFIGS`.

    Returns:
        (config, version) -> the ``repeats`` step times in seconds, in round order.
    """
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    setups = {}
    for config in configs:
        for label, module in versions.items():
            params = [nn.Parameter(x.clone()) for x in init]
            opt = module.Dion(params, rank_fraction=rank_fraction, **CONFIGS[config])
            _set_grads(params, grads)
            opt.step()  # warm-up: creates the state
            setups[(config, label)] = (opt, params)
    order = list(setups)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in order}
    for i in range(repeats):
        for key in order if i % 2 == 0 else order[::-1]:
            opt, params = setups[key]
            _set_grads(params, grads)
            start = time.perf_counter()
            opt.step()
            times[key].append(time.perf_counter() - start)
    return times


def summarize(
    times: dict[tuple[str, str], list[float]], rank_fraction: float, configs: list[str]
) -> list[dict[str, Any]]:
    """One row per config: median ms per version, ratio new / old, per-round ratios."""
    rows = []
    for config in configs:
        new, old = times[(config, "new")], times[(config, "old")]
        per_round = [n / o for n, o in zip(new, old, strict=True)]
        rows.append(
            dict(
                rank_fraction=rank_fraction,
                config=config,
                old_ms=statistics.median(old) * 1e3,
                new_ms=statistics.median(new) * 1e3,
                ratio=statistics.median(new) / statistics.median(old),
                paired_ratio=statistics.median(per_round),
                round_ratio_min=min(per_round),
                round_ratio_max=max(per_round),
                old_times_ms=[t * 1e3 for t in old],
                new_times_ms=[t * 1e3 for t in new],
            )
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| rank fraction | config | old ms | new ms | new / old | paired | round ratios |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['rank_fraction']:g} | {r['config']} | {r['old_ms']:.1f} | {r['new_ms']:.1f} "
            f"| {r['ratio']:.3f} | {r['paired_ratio']:.3f} "
            f"| {r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the step-time table of the two versions; optionally write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="checkout holding the other dion_lp/")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rank-fractions", default="0.25,0.0625")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="also write the rows and metadata as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = load_old(args.old)
    versions = {"new": dion_lp, "old": old}
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    fractions = [float(x) for x in args.rank_fractions.split(",")]
    numel = sum(m * n for m, n in SHAPES)
    for label, module in versions.items():
        version = getattr(module, "__version__", "?")
        print(f"{label}: dion_lp {version} from {os.path.dirname(module.__file__)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{len(SHAPES)} matrices ({numel / 1e6:.1f}M params), median of {args.repeats}\n"
    )
    rows = []
    for rf in fractions:
        times = measure(versions, SHAPES, rf, args.repeats, configs)
        rows.extend(summarize(times, rf, configs))
    print(markdown(rows))
    if args.out:
        report = dict(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            repeats=args.repeats,
            shapes=SHAPES,
            versions={
                label: dict(
                    version=getattr(module, "__version__", None),
                    path=os.path.dirname(module.__file__),
                )
                for label, module in versions.items()
            },
            rows=rows,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
