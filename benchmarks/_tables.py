"""Shared plumbing of the suite's small benchmarks: text tables, CSV + JSON files, environment.

Each benchmark builds a list of flat row dicts; :func:`format_table` prints the
chosen columns and :func:`write_results` writes every key of every row to
``<out>/<name>.csv`` and the rows plus metadata to ``<out>/<name>.json``.
"""

from __future__ import annotations

import csv
import importlib.metadata
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._report import write_json

__all__ = ["Column", "environment", "format_table", "human_bytes", "write_results"]


@dataclass(frozen=True)
class Column:
    """One printed column: row key, header, and a format spec (``""``: ``str(value)``)."""

    key: str
    header: str
    spec: str = ""


def human_bytes(n: float | None) -> str:
    """``1536 -> '1.50 KiB'``; None -> ``'-'``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "bytes":
        return human_bytes(value)
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table of ``rows`` (missing keys print as ``-``); numbers right-aligned."""
    cells = [[_cell(row.get(c.key), c.spec) for c in columns] for row in rows]
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(c.key), (int, float)) or row.get(c.key) is None for row in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([c.header for c in columns]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def write_results(
    out: Path, name: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``<out>/<name>.csv`` (one line per row, every key) and ``<out>/<name>.json``.

    Args:
        out: folder, created if needed.
        name: file stem.
        rows: flat dicts (values: numbers, strings, bools or None).
        meta: anything JSON-able (command, environment, notes, extra tables).

    Returns:
        The CSV and JSON paths.
    """
    out.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    write_json({**meta, "rows": list(rows)}, json_path)
    return csv_path, json_path


def environment() -> dict[str, Any]:
    """Python, platform, torch threads and the versions of the packages the suite compares."""
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    for dist_name in ("torch", "dion_lp", "torchao", "bitsandbytes"):
        try:
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    return out
