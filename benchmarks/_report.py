"""Turn the ablation's per-seed records into the table, CSV, JSON and plots.

Columns (all measured in the same run):

- ``val loss``: final validation loss, mean ± std over seeds (nats per byte).
- ``lost``: share of fp32 Dion's loss reduction lost,
  (L_row - L_dion32) / (L_init - L_dion32), computed per seed then averaged;
  0 = as good as Dion fp32, 1 = no better than the untrained model, < 0 = better.
- ``vs twin``: the same share against the row's fp32 twin (the same algorithm
  and rank in fp32, e.g. ``dion_rank1_4`` for the rank-1/4 precision rows): what
  the row's low precision alone costs. Blank for rows without a twin.
- ``wire/step``: bytes one rank sends per training step (nccl-tests bus-bandwidth
  convention: an all-reduce of S bytes over N ranks counts 2 (N-1)/N * S).
- ``state B/param``: bytes of all optimizer-state tensors / number of parameters.
- ``step time``: median wall time of one training step (forward, backward,
  communication, optimizer) as a ratio to Dion fp32's in the same run.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CSV_FIELDS", "aggregate", "format_table", "write_csv", "write_json", "write_plots"]

CSV_FIELDS = (
    "row",
    "status",
    "final_val_loss_mean",
    "final_val_loss_std",
    "share_lost_mean",
    "share_lost_std",
    "twin",
    "share_lost_twin_mean",
    "share_lost_twin_std",
    "loss_gap_mean",
    "loss_gap_std",
    "wire_bytes_per_step",
    "state_bytes_per_param",
    "step_time_ratio",
    "step_time_s",
    "init_val_loss",
    "n_seeds",
    "comm",
    "note",
)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def _paired(records: list[dict[str, Any]], ref: dict[int, dict[str, Any]], fn: Any) -> list[float]:
    """fn(record, reference record of the same seed) for every seed with an ok reference."""
    return [fn(r, ref[r["seed"]]) for r in records if r["seed"] in ref]


def _share_lost(r: dict[str, Any], ref: dict[str, Any]) -> float:
    reduction = ref["init_loss"] - ref["final_loss"]
    return (r["final_loss"] - ref["final_loss"]) / reduction if reduction > 0 else math.nan


def _mean_curve(records: list[dict[str, Any]]) -> list[list[float]]:
    """[step, mean val loss, mean cumulative bytes] over seeds (steps common to all)."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        for step, loss, sent in r["evals"]:
            by_step.setdefault(step, []).append((loss, sent))
    return [
        [step, statistics.fmean(v[0] for v in vals), statistics.fmean(v[1] for v in vals)]
        for step, vals in sorted(by_step.items())
        if len(vals) == len(records)
    ]


def aggregate(
    records: list[dict[str, Any]],
    rows: Sequence[str],
    reference: str,
    twins: dict[str, str] | None = None,
) -> list[dict]:
    """One summary per row (in ``rows`` order) from the per-seed records.

    Args:
        records: per (row, seed) records from ``benchmarks._train.run_row``.
        rows: row names in display order.
        reference: the row the loss gap and step time are relative to.
        twins: row -> its fp32 twin (the ``vs twin`` column), where it has one.

    Returns:
        Dicts with the :data:`CSV_FIELDS` keys plus ``curve`` (mean validation
        curve: [step, loss, cumulative bytes]) and ``seeds``.
    """
    ref = {r["seed"]: r for r in records if r["row"] == reference and r["status"] == "ok"}
    out = []
    for name in rows:
        recs = [r for r in records if r["row"] == name]
        if not recs:
            continue
        bad = [r["status"] for r in recs if r["status"] != "ok"]
        ok = [r for r in recs if r["status"] == "ok"]
        loss = _mean_std([r["final_loss"] for r in ok])
        lost = _mean_std(_paired(ok, ref, _share_lost))
        twin = (twins or {}).get(name, "")
        twin_ref = {r["seed"]: r for r in records if r["row"] == twin and r["status"] == "ok"}
        lost_twin = _mean_std(_paired(ok, twin_ref, _share_lost))
        gap = _mean_std(_paired(ok, ref, lambda r, f: r["final_loss"] - f["final_loss"]))
        ratio = _mean_std(_paired(ok, ref, lambda r, f: r["step_time"] / f["step_time"]))
        out.append(
            {
                "row": name,
                "status": bad[0] if bad else "ok",
                "final_val_loss_mean": loss[0],
                "final_val_loss_std": loss[1],
                "share_lost_mean": lost[0],
                "share_lost_std": lost[1],
                "twin": twin,
                "share_lost_twin_mean": lost_twin[0],
                "share_lost_twin_std": lost_twin[1],
                "loss_gap_mean": gap[0],
                "loss_gap_std": gap[1],
                "wire_bytes_per_step": _mean_std([r["bytes_per_step"] for r in ok])[0],
                "state_bytes_per_param": _mean_std([r["state_bytes_per_param"] for r in ok])[0],
                "step_time_ratio": ratio[0],
                "step_time_s": _mean_std([r["step_time"] for r in ok])[0],
                "init_val_loss": _mean_std([r.get("init_loss") for r in recs])[0],
                "n_seeds": len(ok),
                "comm": recs[0].get("comm", ""),
                "note": recs[0].get("note", ""),
                "seeds": [r["seed"] for r in recs],
                "curve": _mean_curve(ok) if ok else [],
            }
        )
    return out


# ----------------------------------------------------------------------------- table
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.0f} B"


def _pm(mean: float | None, std: float | None, spec: str, n: int) -> str:
    """ "mean ± std" over seeds, or just the mean for one seed."""
    if n > 1 and std is not None and mean is not None:
        return f"{_fmt(mean, spec)} ± {_fmt(std, spec.lstrip('+'))}"
    return _fmt(mean, spec)


def format_table(summary: list[dict[str, Any]], reference: str) -> str:
    """The terminal table: one line per row; unavailable rows say why; a legend below."""
    head = ("row", "val loss", "lost", "vs twin", "wire/step", "state B/param", "step time", "comm")
    n = max((s["n_seeds"] for s in summary), default=1)
    lost_w = 16 if n > 1 else 7
    widths = (24, 17 if n > 1 else 8, lost_w, lost_w, 11, 13, 9, 0)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("-" * (sum(widths) + 2 * (len(widths) - 1) + 26))
    for s in summary:
        if s["status"] != "ok":
            lines.append(f"{s['row']:<24}  {s['status']}")
            continue
        k = s["n_seeds"]
        cells = (
            s["row"],
            _pm(s["final_val_loss_mean"], s["final_val_loss_std"], ".4f", k),
            _pm(s["share_lost_mean"], s["share_lost_std"], "+.3f", k),
            _pm(s["share_lost_twin_mean"], s["share_lost_twin_std"], "+.3f", k)
            if s.get("twin")
            else "",
            _bytes(s["wire_bytes_per_step"]),
            _fmt(s["state_bytes_per_param"], ".2f"),
            _fmt(s["step_time_ratio"], ".2f", "x"),
            s["comm"],
        )
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    if not any(s["row"] == reference and s["status"] == "ok" for s in summary):
        lines.append(f"({reference} did not run: 'lost' and 'step time' are n/a)")
    lines.append(
        f"val loss: nats/byte{' (mean ± std over seeds)' if n > 1 else ''}; "
        f"lost = (L_row - L_{reference}) / (L_init - L_{reference}); "
        "vs twin: the same against the row's fp32 twin (same algorithm and rank);\n"
        "wire/step: bytes one rank sends per step (all-reduce of S bytes = 2(N-1)/N S); "
        f"step time: median, relative to {reference} in this run"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files
def write_csv(summary: list[dict[str, Any]], path: Path) -> None:
    """One line per row with the :data:`CSV_FIELDS` columns (empty = not measured)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for s in summary:
            writer.writerow({k: ("" if s.get(k) is None else s.get(k)) for k in CSV_FIELDS})


def _json_safe(value: Any) -> Any:
    """NaN and inf become None so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: Path) -> None:
    """The whole report (config, corpus, environment, summary, per-seed records)."""
    path.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n")


def write_plots(
    summary: list[dict[str, Any]], out: Path, reference: str, title: str = ""
) -> list[Path]:
    """Validation loss vs step, vs cumulative bytes sent, and the loss-gap bar chart.

    Args:
        summary: from :func:`aggregate`.
        out: directory.
        reference: the row the gaps are relative to.
        title: the setup, shown above each plot.

    Returns:
        The PNG paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in summary if s["status"] == "ok" and s["curve"]]
    paths = [
        _curve_plot(plt, ok, out / "val_loss_vs_step.png", title, reference, bytes_axis=False),
        _curve_plot(plt, ok, out / "val_loss_vs_bytes.png", title, reference, bytes_axis=True),
        _gap_plot(plt, ok, out / "loss_gap.png", reference, title),
    ]
    return paths


def _curve_plot(
    plt: Any, ok: list[dict[str, Any]], path: Path, title: str, reference: str, bytes_axis: bool
) -> Path:
    """One line per row: baselines dashed, Dion rows solid, the reference thick black; the
    untrained point is left out (its loss is in the title) so the differences stay visible."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    tail = []
    for i, s in enumerate(ok):
        pts = [(p[2] / 1e6 if bytes_axis else p[0], p[1]) for p in s["curve"]]
        # the untrained point (step 0, no bytes yet) is in the title, not on the axes
        pts = [p for p in pts if p[0] > 0]
        if not pts:
            continue
        style = "-" if s["row"].startswith("dion") else "--"
        ref = s["row"] == reference
        ax.plot(
            *zip(*pts, strict=True),
            style,
            marker=".",
            color="black" if ref else colors[i % 20],
            linewidth=2.5 if ref else 1.5,
            zorder=3 if ref else 2,
            label=s["row"],
        )
        tail += [loss for _, loss in pts]
    if tail:
        low, high = min(tail), max(tail)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    init = ok[0]["init_val_loss"] if ok else None
    xlabel = "cumulative wire bytes sent per rank (MB, log)" if bytes_axis else "step"
    ax.set_xscale("log" if bytes_axis else "linear")
    ax.set(xlabel=xlabel, ylabel="validation loss (nats/byte)")
    ax.set_title(f"{title}\nuntrained: {_fmt(init, '.3f')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _gap_plot(plt: Any, ok: list[dict[str, Any]], path: Path, reference: str, title: str) -> Path:
    rows = [s for s in ok if s["loss_gap_mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.35 * max(1, len(rows))))
    if rows:
        names = [s["row"] for s in rows]
        gaps = [s["loss_gap_mean"] for s in rows]
        errs = [s["loss_gap_std"] or 0.0 for s in rows]
        colors = ["tab:red" if g > 0 else "tab:green" for g in gaps]
        ax.barh(names, gaps, xerr=errs, color=colors)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, f"{reference} did not run", ha="center", va="center")
    ax.set(xlabel=f"final validation loss - {reference} (nats/byte; error bar: std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
