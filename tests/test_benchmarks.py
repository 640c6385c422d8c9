"""Smoke tests of the ablation benchmark: data, model, rows, and one tiny 2-rank run."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _rows, _train
from benchmarks._report import CSV_FIELDS
from benchmarks.data import (
    TRAIN_MODULES,
    VAL_MODULES,
    get_batch,
    load_corpus,
    manifest,
)
from benchmarks.model import GPT, GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- data
def test_get_batch_is_deterministic_and_differs_by_rank():
    a0 = get_batch("train", 3, 4, 32, rank=0, world_size=2, seed=1)
    a1 = get_batch("train", 3, 4, 32, rank=1, world_size=2, seed=1)
    again = get_batch("train", 3, 4, 32, rank=0, world_size=2, seed=1)
    for t, u in zip(a0, again, strict=True):
        assert torch.equal(t, u)
    assert not torch.equal(a0[0], a1[0])
    # the ranks' slices together are the one-rank batch of the same global size
    whole = get_batch("train", 3, 8, 32, rank=0, world_size=1, seed=1)
    assert torch.equal(torch.cat([a0[0], a1[0]]), whole[0])
    # targets are the inputs shifted by one byte
    assert torch.equal(a0[0][:, 1:], a0[1][:, :-1])
    assert a0[0].dtype == torch.int64 and int(a0[0].max()) < 256
    # another step or seed gives other windows
    assert not torch.equal(get_batch("train", 4, 4, 32, 0, 2, 1)[0], a0[0])
    assert not torch.equal(get_batch("train", 3, 4, 32, 0, 2, 2)[0], a0[0])


def test_split_is_by_file_and_deterministic():
    assert not set(TRAIN_MODULES) & set(VAL_MODULES)
    assert list(TRAIN_MODULES) == sorted(TRAIN_MODULES)
    m1, m2 = manifest(), manifest()
    assert m1 == m2
    train_files = {path for path, _ in m1["splits"]["train"]["files"]}
    val_files = {path for path, _ in m1["splits"]["val"]["files"]}
    assert train_files and val_files and not train_files & val_files
    corpus = load_corpus()
    for split in ("train", "val"):
        info = m1["splits"][split]
        assert info["bytes"] == sum(n for _, n in info["files"]) == corpus.tokens[split].numel()
    # the validation stream is exactly its files, in order, read from disk
    stdlib = m1["stdlib"]
    expected = b"".join(
        Path(stdlib, path).read_bytes()[:n] for path, n in m1["splits"]["val"]["files"]
    )
    assert bytes(corpus.tokens["val"].tolist()) == expected


def test_missing_module_is_skipped_and_reported(tmp_path):
    (tmp_path / "argparse.py").write_text("import os\n" * 100)
    (tmp_path / "zipfile").mkdir()
    (tmp_path / "zipfile" / "__init__.py").write_text("x = 1\n" * 100)  # module turned package
    (tmp_path / "difflib.py").write_text("y = 2\n" * 100)
    corpus = load_corpus(stdlib=str(tmp_path))
    info = manifest(corpus)
    assert [p for p, _ in info["splits"]["train"]["files"]] == [
        "argparse.py",
        "zipfile/__init__.py",
    ]
    assert "ast" in info["missing"] and "argparse" not in info["missing"]
    x, _ = corpus.get_batch("val", 0, 2, 16)
    assert x.shape == (2, 16)


def test_eval_windows_are_fixed_and_split_across_ranks():
    corpus = load_corpus()
    whole = corpus.eval_windows("val", 8, 16)
    parts = [corpus.eval_windows("val", 8, 16, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(parts[0], whole[0][0::2]) and torch.equal(parts[1], whole[0][1::2])


# ----------------------------------------------------------------------------- model, rows
@pytest.mark.parametrize("tied", [False, True])
def test_model_shapes_and_initial_loss(tied):
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=16, d_model=32, n_layer=1, n_head=2, tied=tied))
    x, y = get_batch("train", 0, 2, 16)
    logits, loss = model(x, y)
    assert logits.shape == (2, 16, 256)
    assert abs(loss.item() - math.log(256)) < 0.3  # near-uniform at init
    untied = sum(
        p.numel() for p in GPT(GPTConfig(seq_len=16, d_model=32, n_layer=1, n_head=2)).parameters()
    )
    assert model.num_params() == untied - (256 * 32 if tied else 0)


def test_state_bytes_of_adamw_is_two_fp32_moments():
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert _rows.state_bytes(opt) == 8 * n + 4 * 2  # exp_avg, exp_avg_sq, a float32 step each


def test_every_row_builds_or_says_why():
    model = GPT(GPTConfig(seq_len=16, d_model=32, n_layer=1, n_head=2))
    ctx = _rows.BuildContext()
    for name in ("adamw", "adamw8bit_bnb", *(n for n in _rows.ROWS if n.startswith("dion"))):
        try:
            opt = _rows.ROWS[name].build(model, ctx)
        except _rows.UNAVAILABLE as exc:
            assert _rows.unavailable_reason(exc)
            continue
        assert opt.param_groups


def _one_rank_env(cfg):
    corpus = load_corpus()
    windows = corpus.eval_windows("val", cfg.eval_windows, cfg.model.seq_len)
    return _train._Env(cfg, corpus, 0, None, None, windows, lambda n: None)


class _BrokenOptimizer(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("boom")


def _unbuilt(model, ctx):
    raise NotImplementedError("not built")


def _broken(model, ctx):
    return _BrokenOptimizer(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("factory", "status"), [(_unbuilt, "not available: "), (_broken, "failed at step 0: ")]
)
def test_unavailable_and_failing_rows_are_reported_not_faked(monkeypatch, factory, status):
    monkeypatch.setitem(_rows.ROWS, "fake", _rows.Row(factory))
    tiny = GPTConfig(seq_len=16, d_model=32, n_layer=1, n_head=2)
    cfg = _train.RunConfig(rows=("fake",), steps=3, world_size=1, model=tiny, eval_windows=4)
    (record,) = _train.run_seed(0, _one_rank_env(cfg))
    assert record["status"].startswith(status)
    assert "not built" in record["status"] or "boom" in record["status"]
    assert math.isnan(record.get("final_loss", math.nan))


def test_lock_step_rows_train_as_if_alone():
    tiny = GPTConfig(seq_len=16, d_model=32, n_layer=1, n_head=2)
    kw = dict(steps=4, eval_every=2, world_size=1, model=tiny, eval_windows=4, warmup=1)
    alone = _train.run_seed(0, _one_rank_env(_train.RunConfig(rows=("adamw",), **kw)))
    cfg = _train.RunConfig(rows=("adamw8bit_bnb", "adamw"), **kw)
    together = _train.run_seed(0, _one_rank_env(cfg))
    assert [r["row"] for r in together] == ["adamw8bit_bnb", "adamw"]
    assert together[1]["evals"] == alone[0]["evals"]
    assert together[1]["final_loss"] < together[1]["init_loss"]


def test_dion_modes():
    assert _rows.dion_modes(_rows.BuildContext(world_size=1)) == ("none",)
    assert _rows.dion_modes(_rows.BuildContext(world_size=2, dion_comm="ddp")) == ("ddp",)
    auto = _rows.dion_modes(_rows.BuildContext(world_size=2))
    # this dion_lp has the hook: the main job's Dion rows run under DDP with it (a
    # silent fall back to "sync" once hid a moved module)
    assert auto == ("hook", "sync", "ddp")


def test_lr_schedule_warms_up_then_decays():
    cfg = _train.RunConfig(rows=("adamw",), steps=100, warmup=10, final_lr_fraction=0.1)
    factors = [_train.lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)


# ----------------------------------------------------------------------------- the CLI
def test_help_works_and_import_has_no_side_effects(tmp_path):
    from benchmarks.ablation import main

    assert callable(main)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.ablation", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # nothing may be written there; benchmarks/ runs from the repo root
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.returncode == 0 and "--world-size" in out.stdout
    assert not any(tmp_path.iterdir())


def test_ablation_smoke(tmp_path):
    from benchmarks.ablation import main

    out = tmp_path / "abl"
    argv = ["--rows", "adamw,dion_fp32", "--steps", "6", "--eval-every", "3", "--world-size", "2"]
    argv += ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "32"]
    argv += ["--batch-size", "4", "--eval-windows", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra
        for name in ("val_loss_vs_step.png", "val_loss_vs_bytes.png", "loss_gap.png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["adamw", "dion_fp32"]
    assert tuple(rows[0]) == CSV_FIELDS
    report = json.loads((out / "ablation.json").read_text())
    assert report["corpus"]["splits"]["val"]["files"]
    records = {r["row"]: r for r in report["records"]}
    adamw = records["adamw"]
    assert adamw["status"] == "ok" and [e[0] for e in adamw["evals"]] == [0, 3, 6]
    assert adamw["final_loss"] < adamw["init_loss"]
    # measured DDP bytes == closed form 2 (N-1)/N * 4 bytes * n_params per step (fp32 all-reduce)
    n = 2
    assert adamw["bytes_per_step"] == 2 * (n - 1) / n * 4 * adamw["n_params"]
    assert adamw["state_bytes_per_param"] > 8.0  # two fp32 moments + step counters
    dion = records["dion_fp32"]
    assert dion["status"] == "ok" or dion["status"].startswith("not available: ")
    if dion["status"] == "ok":
        assert dion["bytes_per_step"] > 0 and dion["dion_mode"] in ("hook", "sync", "ddp")
        assert float(rows[1]["share_lost_mean"]) == 0.0
        assert float(rows[1]["step_time_ratio"]) == 1.0


def test_step_time_runs_every_config_and_the_breakdown(capsys):
    from benchmarks import step_time

    medians = step_time.measure([(32, 48)], 0.5, 1, list(step_time.CONFIGS))
    assert set(medians) == set(step_time.CONFIGS) and all(t > 0 for t in medians.values())
    step_time.main(["--shapes", "32x48", "--rank-fractions", "0.5", "--repeats", "1"])
    assert "dion int8 mom nearest" in capsys.readouterr().out
    rows = step_time.breakdown((64, 96), 0.25, 1)
    assert [r["fmt"] for r in rows] == ["fp32", "bf16", "int8", "fp8_e4m3", "dynamic8"]
    assert rows[0]["share"] == 0.0 and all(0 < r["share"] < 1 for r in rows[1:])


def test_vs_twin_is_the_share_lost_against_the_rows_fp32_twin():
    """Closed form: init 5, reference 2, twin 3, row 3.3 (seed 0) and 3.1 (seed 1):
    lost vs the reference (1.3 / 3, 1.1 / 3), vs the twin (0.3 / 2, 0.1 / 2)."""
    from benchmarks._report import aggregate, format_table

    def rec(row, seed, final):
        common = dict(step_time=1.0, bytes_per_step=1, state_bytes_per_param=1.0, evals=[])
        return dict(row=row, seed=seed, status="ok", init_loss=5.0, final_loss=final, **common)

    records = [rec("ref", s, 2.0) for s in (0, 1)] + [rec("twin", s, 3.0) for s in (0, 1)]
    records += [rec("row", 0, 3.3), rec("row", 1, 3.1)]
    summary = aggregate(records, ["ref", "twin", "row"], "ref", {"row": "twin"})
    row = summary[2]
    assert math.isclose(row["share_lost_mean"], (1.3 / 3 + 1.1 / 3) / 2)
    assert math.isclose(row["share_lost_twin_mean"], (0.15 + 0.05) / 2)
    assert math.isclose(row["share_lost_twin_std"], math.sqrt(2) * 0.05)
    assert row["twin"] == "twin" and summary[1]["share_lost_twin_mean"] is None
    assert "+0.100 ± 0.071" in format_table(summary, "ref")
