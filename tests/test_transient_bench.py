"""benchmarks/transient.py: fresh-process rows whose figures obey independent bounds."""

from __future__ import annotations

import csv
import json
import sys

from benchmarks import transient
from benchmarks.transient import QUICK_SHAPE, Config, child_row, closed_form, default_grid

ROWS = ("dion/fp32/sr", "dion/int8/rn", "adamw/int8/sr")


def test_quick_rows_in_fresh_processes(tmp_path):
    argv = ["--quick", "--rows", ",".join(ROWS), "--out", str(tmp_path)]
    assert transient.main(argv) == 0
    report = json.loads((tmp_path / "transient.json").read_text())
    assert report["shape"] == list(QUICK_SHAPE)
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == list(ROWS)
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["state_bytes"] == r["closed_form_bytes"] > 0
        # the state is created inside the measured step: its bytes bound the peak from below
        assert r["peak_bytes"] >= r["state_bytes"]
        assert r["peak_bytes"] >= r["live_bytes"] and r["new_graphs"] == 0
    m, n = QUICK_SHAPE
    r = m // 4  # rank fraction 1/4 of min(m, n)
    # by hand: fp32 momentum + fp32 Q (min(m, n) x r); int8 codes + an fp32 scale per 256 + bf16 Q
    assert rows["dion/fp32/sr"]["state_bytes"] == 4 * m * n + 4 * m * r
    assert rows["dion/int8/rn"]["state_bytes"] == m * n + 4 * m * n // 256 + 2 * m * r
    assert rows["dion/fp32/sr"]["peak_vs_dion_fp32"] == 1.0
    with open(tmp_path / "transient.csv", newline="") as f:
        assert [line["key"] for line in csv.DictReader(f)] == list(ROWS)


def test_missing_baseline_is_unavailable(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "bitsandbytes"] + ["bitsandbytes"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, even if imported before
    cfg = Config("bnb-adamw8bit", rule="adamw", shape=QUICK_SHAPE)
    row = child_row(cfg)
    assert row["status"].startswith("unavailable: ModuleNotFoundError")
    assert row["rule"] == "adamw8bit (bitsandbytes)"


def test_grid_and_closed_forms():
    grid = default_grid(QUICK_SHAPE, 0.25, torchao_compile=False)
    keys = [c.key for c in grid]
    assert len(keys) == len(set(keys)) == 17
    assert set(transient.ISSUE_PEAK_MIB) <= set(keys)
    by_key = dict(zip(keys, grid, strict=True))
    numel = QUICK_SHAPE[0] * QUICK_SHAPE[1]
    assert closed_form(by_key["lion/fp32/sr"]) == 4 * numel
    assert (
        closed_form(by_key["adamw/fp32/sr"]) == 8 * numel == closed_form(by_key["torch-adamw"]) - 4
    )
    assert by_key["torchao-adamw8bit"].labels()["rule"] == "adamw8bit (torchao, eager)"
