"""The step-time table of issue 15: dion_lp next to other optimizers, side by side in one run.

Rows: this repo's dion_lp in five momentum formats; optionally the same five of
another dion_lp version (``--old``, loaded as ``dion_lp_old`` by
:func:`benchmarks.compare_versions.load_old`); optionally microsoft/dion's
``DionReference`` (fp32) from a local checkout (``--microsoft-dion``);
bitsandbytes' AdamW8bit and torch's AdamW (foreach). Every optimizer steps its
own clone of the same parameters with the same gradients (``p.grad`` is reset
before each step, untimed). One warm-up step each is timed on its own (the
"first step" column: state creation and any compile cost), then every round
steps each optimizer once, in an order reversed every other round; medians are
reported, with ratios to dion_lp fp32 at the same rank fraction. A row that
cannot be built or stepped reads "not available: <reason>".
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import dion_lp

from .compare_versions import CONFIGS, SHAPES, _set_grads, load_old

Builder = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]

BASE = "dion_lp fp32"
# row label suffix -> compare_versions.CONFIGS key (the same Dion keyword arguments)
DION_ROWS = {
    "fp32": "fp32",
    "bf16 momentum": "bf16 mom",
    "int8 momentum SR": "int8 mom SR",
    "fp8_e4m3 momentum SR": "fp8_e4m3 mom SR",
    "int8 nearest": "int8 mom nearest",
}
DEFAULT_FRACTIONS = "0.25,0.0625"
__all__ = ["SHAPES", "load_microsoft_dion", "markdown", "measure", "optimizers", "run"]


def _why(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:160]


def _dion_rows(module: ModuleType, prefix: str) -> list[tuple[str, Builder | str]]:
    def build(kwargs: dict[str, Any]) -> Builder:
        return lambda ps, rf: module.Dion(ps, rank_fraction=rf, **kwargs)

    return [(f"{prefix} {label}", build(CONFIGS[key])) for label, key in DION_ROWS.items()]


def load_microsoft_dion(root: str, name: str = "msdion") -> type:
    """``DionReference`` of the microsoft/dion checkout ``root``, its package named ``name``.

    The package is imported whole first; if its ``__init__`` fails (it may
    import Triton-only modules), ``dion/dion_reference.py`` is loaded alone as
    ``{name}.dion_reference`` under an empty package, so its relative imports work.
    """
    pkg = Path(root).resolve() / "dion"
    ref = pkg / "dion_reference.py"
    if not ref.is_file():
        raise ValueError(f"no {ref}")
    spec = importlib.util.spec_from_file_location(
        name, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        return module.DionReference
    except Exception:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    bare = importlib.machinery.ModuleSpec(name, None, is_package=True)
    bare.submodule_search_locations = [str(pkg)]
    package = importlib.util.module_from_spec(bare)
    sys.modules[name] = package
    return importlib.import_module(f"{name}.dion_reference").Dion


def optimizers(old: str | None, microsoft_dion: str | None) -> list[tuple[str, Builder | str]]:
    """(row label, builder or "not available: <reason>") for every row of the table."""
    rows = _dion_rows(dion_lp, "dion_lp")
    if old:
        try:
            module = load_old(old)
        except Exception as err:  # any failure is a row, not a crash
            rows.append(("dion_lp --old", f"not available: {_why(err)}"))
        else:
            version = getattr(module, "__version__", "old")
            same = version == dion_lp.__version__
            rows += _dion_rows(module, f"dion_lp {version}{' (old)' if same else ''}")
    if microsoft_dion:
        label = "microsoft/dion DionReference (fp32)"
        try:
            ref = load_microsoft_dion(microsoft_dion)
        except Exception as err:
            rows.append((label, f"not available: {_why(err)}"))
        else:
            # its defaults are lr 0.01, mu 0.95, weight_decay 0.01; no replicate_mesh: one process
            rows.append(
                (
                    label,
                    lambda ps, rf: ref(ps, rank_fraction=rf, lr=0.01, mu=0.95, weight_decay=0.01),
                )
            )
    try:
        import bitsandbytes as bnb
    except Exception as err:
        rows.append(("bitsandbytes AdamW8bit", f"not available: {_why(err)}"))
    else:
        rows.append(("bitsandbytes AdamW8bit", lambda ps, rf: bnb.optim.AdamW8bit(ps, lr=1e-3)))
    rows.append(
        ("torch AdamW (foreach)", lambda ps, rf: torch.optim.AdamW(ps, lr=1e-3, foreach=True))
    )
    return rows


def measure(
    rows: list[tuple[str, Builder | str]],
    shapes: list[tuple[int, int]],
    rank_fraction: float,
    repeats: int,
) -> list[dict[str, Any]]:
    """First-step time and the interleaved step times of every row at one rank fraction."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    results, setups = [], {}
    for label, build in rows:
        res: dict[str, Any] = dict(optimizer=label, rank_fraction=rank_fraction, times_ms=[])
        results.append(res)
        if isinstance(build, str):
            res["status"] = build
            continue
        try:
            params = [nn.Parameter(x.clone()) for x in init]
            opt = build(params, rank_fraction)
            _set_grads(params, grads)
            start = time.perf_counter()
            opt.step()  # warm-up: creates the state (and compiles, where anything does)
            res["first_ms"] = (time.perf_counter() - start) * 1e3
        except Exception as err:
            res["status"] = f"not available: {_why(err)}"
            continue
        res["status"] = "ok"
        setups[label] = (opt, params, res)
    order = list(setups)
    for i in range(repeats):
        for label in order if i % 2 == 0 else order[::-1]:
            opt, params, res = setups[label]
            if res["status"] != "ok":
                continue
            _set_grads(params, grads)
            try:
                start = time.perf_counter()
                opt.step()
                res["times_ms"].append((time.perf_counter() - start) * 1e3)
            except Exception as err:
                res["status"] = f"not available: {_why(err)}"
    setups.clear()
    for res in results:
        if res["status"] == "ok" and res["times_ms"]:
            res["median_ms"] = statistics.median(res["times_ms"])
    base = next((r.get("median_ms") for r in results if r["optimizer"] == BASE), None)
    for res in results:
        if "median_ms" in res and base:
            res["ratio"] = res["median_ms"] / base
    return results


def _ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _rank_label(rf: float) -> str:
    return str(Fraction(rf).limit_denominator(1024))


def markdown(results: list[dict[str, Any]], fractions: list[float]) -> str:
    """The issue's table: per rank fraction, median ms (ratio) and the first step's ms."""
    head, rule = ["optimizer"], ["---"]
    for rf in fractions:
        head += [f"rank {_rank_label(rf)}", f"first step ms ({_rank_label(rf)})"]
        rule += ["---", "---:"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    labels = list(dict.fromkeys(r["optimizer"] for r in results))
    by_key = {(r["optimizer"], r["rank_fraction"]): r for r in results}
    for label in labels:
        cells = [label]
        for rf in fractions:
            r = by_key.get((label, rf))
            if r is None or "median_ms" not in r:
                reason = r["status"] if r and r["status"] != "ok" else "not available: no steps"
                cells += [reason, _ms(r["first_ms"]) if r and "first_ms" in r else "-"]
                continue
            ratio = f" ({r['ratio']:.2f}x)" if "ratio" in r else ""
            cells += [f"{_ms(r['median_ms'])} ms{ratio}", _ms(r["first_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run(
    shapes: list[tuple[int, int]],
    fractions: list[float],
    repeats: int,
    old: str | None = None,
    microsoft_dion: str | None = None,
    out: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every row at every rank fraction, print the table, optionally write JSON."""
    rows = optimizers(old, microsoft_dion)
    numel = sum(m * n for m, n in shapes)
    head, status = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain")
    dirty = f", {len(status.splitlines())} paths changed" if status else ""
    print(f"dion_lp {dion_lp.__version__} from {os.path.dirname(dion_lp.__file__)}")
    print(f"git HEAD {head}{dirty}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(shapes)} matrices "
        f"({numel / 1e6:.1f}M params), median of {repeats} interleaved steps\n"
    )
    results = []
    for rf in fractions:
        results += measure(rows, shapes, rf, repeats)
    print(markdown(results, fractions))
    if out:
        from torch._dynamo.utils import counters

        report = dict(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            repeats=repeats,
            shapes=shapes,
            params=numel,
            dion_lp=dict(version=dion_lp.__version__, git_head=head, git_status=status),
            old=old,
            microsoft_dion=microsoft_dion,
            dynamo=dict(stats=dict(counters["stats"]), graph_breaks=dict(counters["graph_break"])),
            rows=results,
        )
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {path}")
    return results
