"""The benchmark suite (shapes, comm_volume, memory, codecs) in tiny configurations.

Asserts exact byte accounting, never wall-clock times: shape tables against
published parameter counts, measured wire bytes against the computed ones,
measured optimizer state against closed forms.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

import dion_lp
from benchmarks import codecs, comm_volume, memory, shapes
from benchmarks.model import GPT

# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", sorted(shapes.KNOWN_TOTALS))
def test_shape_tables_match_published_totals(name):
    specs = shapes.shapes(name)
    assert shapes.param_count(specs) == shapes.KNOWN_TOTALS[name]
    assert len({s.name for s in specs}) == len(specs)


def test_gpt2_small_table_is_the_benchmark_model():
    with torch.device("meta"):
        model = GPT(shapes.GPT2_SMALL)
    assert shapes.from_model(model) == shapes.shapes("gpt2-small")
    counts = shapes.count_by_kind(shapes.shapes("gpt2-small"))
    # 12 x (2304 + 768 + 2 x 3072) x 768 hidden; wte + wpe; biases and norms
    assert counts == {
        "dion-matrix": 84_934_656,
        "embedding": 50257 * 768 + 1024 * 768,
        "head": 0,
        "vector": 121_344,
    }


def test_llama_gqa_shapes():
    specs = {s.name: s for s in shapes.shapes("llama-70b")}
    assert specs["layers.0.attention.wk.weight"].shape == (8 * 128, 8192)
    assert specs["layers.79.feed_forward.w2.weight"].shape == (8192, 28672)
    assert specs["output.weight"].kind == "head"


@pytest.mark.parametrize("module", [shapes, comm_volume, memory, codecs])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m benchmarks." in capsys.readouterr().out


# ----------------------------------------------------------------------------- comm volume


def test_dion_step_bytes_by_hand():
    # one 8 x 4 matrix at rank 1/4: r = 1, (8 + 4) * 1 < 32 -> factors; N = 2, fp32
    specs = [shapes.ParamSpec("w", (8, 4), "dion-matrix"), shapes.ParamSpec("b", (8,), "vector")]
    b = comm_volume.dion_step_bytes(specs, "fp32", 0.25, 2)
    # 2 (N-1)/N * S: P 8 x 4 B, R 4 x 4 B, control 2 flags x 2 tensors, vector 8 x 4 B
    assert (b.factors_p, b.factors_r, b.full, b.control, b.scalar_grads) == (32, 16, 0, 4, 32)
    # at rank 1 the factors (12 x 4) outgrow the matrix (32): B travels instead
    full = comm_volume.dion_step_bytes(specs, "fp32", 1.0, 2)
    assert (full.full, full.factors_p, full.factors_r) == (32 * 4, 0, 0)
    # fp8: one fp32 scale per 128 codes (per chunk of a rank): 2 ranks x (4 codes + 4 B)
    assert comm_volume.dion_step_bytes(specs, "fp8_e4m3", 0.25, 2).factors_p == 16


def test_gpt2_small_factor_volume_and_targets():
    specs = shapes.shapes("gpt2-small")
    # per layer at rank 1/16 (r = 48): (2304 + 768 + 2 (3072 + 768) + 2 x 768) x 48 numbers
    numbers = 12 * 48 * (2304 + 768 + 768 + 768 + 2 * (3072 + 768))
    assert numbers == 7_077_888
    fp32 = comm_volume.dion_step_bytes(specs, "fp32", 1 / 16, 2)
    assert fp32.matrices == 4 * numbers
    assert fp32.scalar_grads == 4 * (39_383_808 + 121_344)
    fp8 = comm_volume.dion_step_bytes(specs, "fp8_e4m3", 1 / 16, 2)
    allreduce_matrices = 4 * 84_934_656
    assert allreduce_matrices / fp8.matrices >= comm_volume.TARGET_VS_ALLREDUCE
    assert fp32.matrices / fp8.matrices >= comm_volume.TARGET_VS_FP32_FACTORS
    assert comm_volume.allreduce_bytes(specs, 4, 2) == 4 * shapes.KNOWN_TOTALS["gpt2-small"]


def test_powersgd_bytes_by_hand():
    specs = [
        shapes.ParamSpec("w", (64, 32), "dion-matrix"),  # (64 + 32) x 4 x 2 < 2048: compressed
        shapes.ParamSpec("b", (64,), "vector"),  # 64 x 1: never worth it
    ]
    got = comm_volume.powersgd_bytes(specs, 4, 2)
    assert got == {"uncompressed": 64 * 4, "p": 64 * 4 * 4, "q": 32 * 4 * 4, "total": 1792}


@pytest.fixture(scope="module")
def comm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm_volume")
    code = comm_volume.main(["--quick", "--out", str(out)])
    return code, out


def test_comm_volume_measured_equals_computed(comm_run):
    code, out = comm_run
    assert code == 0
    with open(out / "measured.csv") as f:
        rows = list(csv.DictReader(f))
    configs = {r["config"] for r in rows}
    assert {"DDP all-reduce fp32", "DDP all-reduce bf16", "DDP PowerSGD r4"} <= configs
    assert sum(r["config"].startswith("dion") for r in rows) == 8  # 4 formats x 2 ranks
    for r in rows:
        assert int(r["measured"]) == int(r["computed"]) > 0, r
    report = json.loads((out / "comm_volume.json").read_text())
    assert any("1/16 MET" in line for line in report["targets"])
    methods = {r["method"] for r in report["rows"]}
    assert "PowerSGD r32" in methods and "dion fp8_e5m2 + bf16 grads" in methods


# ----------------------------------------------------------------------------- memory


def test_dion_int8_matrix_state_is_codes_scales_and_q():
    p = nn.Parameter(torch.zeros(768, 3072))
    p.grad = torch.randn(768, 3072, generator=torch.Generator().manual_seed(0))
    opt = dion_lp.Dion([p], rank_fraction=1 / 16, momentum_dtype="int8")
    opt.step()
    r = 48  # ceil(768 / 16)
    codes, scales, q = 768 * 3072, 4 * (768 * 3072 // 256), 2 * 768 * r
    assert opt.state_bytes() == codes + scales + q == 2_469_888
    spec = [shapes.ParamSpec("w", (768, 3072), "dion-matrix")]
    assert memory.dion_state_bytes(spec, memory.DionConfig("int8", 1 / 16)) == 2_469_888
    assert opt.state_bytes() / p.numel() <= memory.TARGET_MATRIX


def test_closed_forms_of_the_whole_models():
    gpt2 = shapes.shapes("gpt2-small")
    n = shapes.param_count(gpt2)
    target = memory.dion_state_bytes(gpt2, memory.DionConfig("int8", 1 / 16))
    assert target / n <= memory.TARGET_MODEL
    assert memory.baseline_state_bytes(gpt2, "adamw (torch)") == 8 * n + 4 * len(gpt2)
    llama = shapes.shapes("llama-7b")
    assert (
        memory.dion_state_bytes(llama, memory.DionConfig("int8", 1 / 16))
        / shapes.param_count(llama)
        < 1.1
    )


def test_memory_quick_run_matches_closed_forms(tmp_path):
    code = memory.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "memory.json").read_text())
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    names = {r["optimizer"] for r in ok}
    assert {"adamw (torch)", "muon + adamw (torch)", "dion int8 r1/16 (lion)"} <= names
    assert {r["measurement"] for r in ok} == {"matrix", "model"}
    for r in ok:
        assert r["closed_form_equal"] and r["state_bytes"] == r["closed_form"], r
    adamw = next(r for r in ok if r["optimizer"] == "adamw (torch)")
    assert adamw["measurement"] == "matrix" and adamw["state_bytes"] == 8 * 64 * 256 + 4
    assert (tmp_path / "analytic.csv").exists()


# ----------------------------------------------------------------------------- codecs


def test_codecs_quick_run(tmp_path):
    code = codecs.main(
        ["--quick", "--libs", "dion_lp,bitsandbytes", "--out", str(tmp_path), "--no-progress"]
    )
    assert code == 0
    rows = json.loads((tmp_path / "codecs.json").read_text())["rows"]
    dion = [r for r in rows if r["library"] == "dion_lp"]
    assert len(dion) == 2 * 2 * len(codecs.DION_FORMATS)  # tensors x rounding x formats
    for r in rows:
        assert r["status"] == "ok", r
        scaled = r["codec"] != "bf16" and "bf16" not in r["codec"]
        assert r["bytes_per_elem"] == (1 + 4 / 256 if scaled else 2.0)  # exact: 64 blocks
        assert 0 < r["rel_rms"] < 0.1 and r["max_err_rel_absmax"] <= 0.125
        if r["rounding"] == "stochastic":
            # unbiased: the mean of K draws errs by the spread's share only (z ~ 1; sqrt(8) if not)
            assert 0.8 < r["bias_z"] < 1.25, r
    nearest = {r["codec"]: r["rel_rms"] for r in dion if r["rounding"] == "nearest"}
    assert nearest["bf16"] < nearest["int8"] < nearest["fp8_e4m3"] < nearest["fp8_e5m2"]


def test_codec_inputs_and_unknown_library():
    t = codecs.make_tensors((64, 256))
    assert set(t) == {"gaussian", "student-t3"}
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in t.values())
    peak = {k: float(x.abs().max() / x.std()) for k, x in t.items()}
    assert peak["student-t3"] > peak["gaussian"]  # heavy tails
    with pytest.raises(ValueError, match="library"):
        codecs.codecs_for(["nope"])


# ----------------------------------------------------------------------------- step-time table


def test_step_time_issue15_table_on_tiny_shapes(tmp_path, capsys):
    from benchmarks import step_time

    missing = str(tmp_path / "missing")  # unavailable rows are reported, never a crash
    out = tmp_path / "table.json"
    step_time.main(
        ["--table", "issue15", "--shapes", "64x96,96x64", "--repeats", "1"]
        + ["--old", missing, "--microsoft-dion", missing, "--out", str(out)]
    )
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["rank_fraction"] for r in rows} == {0.25, 0.0625}
    dion = [r for r in rows if r["optimizer"].startswith("dion_lp ") and r["status"] == "ok"]
    assert len(dion) == 2 * 5  # rank fractions x momentum formats
    assert all(r["ratio"] > 0 and r["first_ms"] > 0 for r in dion)
    base = [r for r in dion if r["optimizer"] == "dion_lp fp32"]
    assert [r["ratio"] for r in base] == [1.0, 1.0]
    adamw = [r for r in rows if r["optimizer"] == "torch AdamW (foreach)"]
    assert len(adamw) == 2 and all(r["ratio"] > 0 for r in adamw)
    for name in ("dion_lp --old", "microsoft/dion DionReference (fp32)"):
        assert {r["status"].split(":")[0] for r in rows if r["optimizer"] == name} == {
            "not available"
        }
    for label in ("dion_lp fp32", "dion_lp int8 momentum SR", "dion_lp int8 nearest"):
        assert f"| {label} | " in table
    assert "| rank 1/4 | first step ms (1/4) | rank 1/16 |" in table
    assert "(1.00x)" in table and "not available: ValueError" in table
