"""benchmarks/sharded_bytes.py: the accounting runs, and its figures are consistent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.sharded_bytes import account, baseline_bytes, dion_bytes
from dion_lp.dist.accounting import mean_bytes


def test_help_works(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.sharded_bytes", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # nothing may be written there; benchmarks/ runs from the repo root
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.returncode == 0 and "--world-sizes" in out.stdout
    assert not any(tmp_path.iterdir())


def test_dion_sends_less_than_gathering_every_matrix():
    for model in ("gpt2-small", "llama-7b", "llama-70b"):
        for N in (2, 4, 64):
            rows = {row["method"]: row for row in account(model, N, 0.25)}
            for fmt in ("fp32", "bf16", "fp8_e4m3"):
                assert rows[f"dion {fmt}"]["bytes"] < rows["all-gather fp32"]["bytes"]
            assert rows["dion fp8_e4m3"]["bytes"] < rows["dion bf16"]["bytes"]
            assert rows["dion bf16"]["bytes"] < rows["all-gather bf16"]["bytes"]


def test_accounting_of_one_matrix_by_hand():
    # a 64 x 16 matrix, Shard(0) (long dim sharded), r = 4, 2 ranks: R (16 x 4) summed,
    # two passes of 10-entry Gram triangles, no norms; the flags of 1 tensor
    parts = dion_bytes([(64, 16, 0)], 1, 2, "fp32", 0.25)
    # a quantized mean of S elements on 2 ranks sends an all-to-all and an all-gather of S / 2
    assert parts["factors"] == mean_bytes(64, "fp32", 2) == 2 * 32 * 4
    assert parts["gram"] == 2 * mean_bytes(10, "fp32", 2) == 2 * 2 * 5 * 4
    assert parts["norms"] == 0 and parts["flags"] == 2
    assert baseline_bytes([(64, 16, 0)], 2, 4) == 64 * 16 * 4 // 2
