"""What each rank of the ablation runs: every (seed, row) in one process group.

The ranks are started once (by :mod:`benchmarks.ablation`) and train all rows,
so process and gloo start-up is paid once. For each seed the rows train in
lock-step (one step of each row in turn, see :func:`run_seed`): every row's
model is initialised from the same seed, batches come from
:meth:`benchmarks.data.Corpus.get_batch` (same order for every row, a different
slice per rank), the learning rate follows the same schedule (scaled by each
group's own peak lr), and the validation loss is measured on a fixed set of
windows at fixed steps.

How a row communicates is decided in ONE place, :func:`wrap_model`.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's
# annotations at run time (``dist.GradBucket``, ``torch.futures.Future[Tensor]``).
import importlib
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ._rows import ROWS, UNAVAILABLE, BuildContext, Row, state_bytes, unavailable_reason
from ._spawn import exit_rank
from .data import Corpus, load_corpus
from .model import GPT, GPTConfig

__all__ = [
    "ByteCounter",
    "RunConfig",
    "Wrapped",
    "counting_allreduce_hook",
    "run_seed",
    "worker",
    "wrap_model",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything the ranks need (picklable).

    Attributes:
        rows: row names, in run order.
        seeds: seeds; each seeds model init, data order and the optimizer.
        steps: optimizer steps per row.
        batch_size: sequences per rank per step.
        model: the model size (``model.seq_len`` is also the training length).
        world_size: data-parallel ranks.
        eval_every: steps between validation evaluations (also at 0 and at the end).
        eval_windows: validation windows per evaluation (all ranks together).
        warmup: linear warm-up steps; then cosine decay to ``final_lr_fraction``.
        final_lr_fraction: lr at the last step as a fraction of the peak.
        train_bytes, val_bytes: corpus caps.
        collective_timeout: seconds before a stuck collective raises.
        dion_comm: how Dion rows communicate ("auto", "hook", "sync", "ddp"; see
            :func:`benchmarks._rows.dion_modes`).
    """

    rows: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int = 120
    batch_size: int = 16
    model: GPTConfig = field(default_factory=GPTConfig)
    world_size: int = 2
    eval_every: int = 12
    eval_windows: int = 256
    warmup: int = 12
    final_lr_fraction: float = 0.1
    train_bytes: int = 2_000_000
    val_bytes: int = 400_000
    collective_timeout: float = 120.0
    dion_comm: str = "auto"


# ----------------------------------------------------------------------------- communication
class ByteCounter:
    """State of :func:`counting_allreduce_hook`: the wire bytes this rank sent.

    Convention (nccl-tests bus bandwidth): an all-reduce of S bytes over N ranks
    charges each rank 2 (N-1)/N * S, what a ring all-reduce sends per rank.
    """

    def __init__(self, process_group: Any, world_size: int) -> None:
        self.process_group = process_group
        self.world_size = world_size
        self.bytes_sent = 0

    def wire_bytes(self) -> int:
        """Bytes this rank sent so far."""
        return self.bytes_sent

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "process_group"}


def counting_allreduce_hook(
    state: ByteCounter, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    """DDP's default all-reduce (mean) of a gradient bucket, counting its wire bytes."""
    n, nbytes = state.world_size, bucket.buffer().numel() * bucket.buffer().element_size()
    state.bytes_sent += -(-2 * (n - 1) * nbytes // n)  # ceil(2 (N-1)/N * S)
    return default_hooks.allreduce_hook(state.process_group, bucket)


@dataclass
class Wrapped:
    """A row's model as trained, and how to read its communication.

    Attributes:
        module: the module to call for training (DDP-wrapped when distributed).
        bytes_sent: returns the wire bytes this rank has sent so far.
        comm: a short description for the report.
    """

    module: nn.Module
    bytes_sent: Callable[[], int]
    comm: str


def _stats_bytes(obj: Any) -> int:
    """``obj.comm_stats()["bytes_sent"]`` if ``obj`` reports it, else 0."""
    stats = getattr(obj, "comm_stats", None)
    if callable(stats):
        return int(stats()["bytes_sent"])
    return 0


def wrap_model(row: Row, model: nn.Module, opt: Any, group: Any) -> Wrapped:
    """THE single place where a row's communication is set up and measured.

    - One rank: no wrapper, nothing sent.
    - Baseline rows, and Dion in "ddp" mode: DDP with the default all-reduce of
      every gradient in fp32, counted by :func:`counting_allreduce_hook`; Dion
      (built with a one-rank group) runs non-replicated on the averaged gradients.
    - Dion in "sync" mode: no DDP; Dion was built with the process group and
      ``grad_sync=True``, so it averages the element-wise gradients and
      exchanges its factors itself; bytes = ``opt.comm_stats()["bytes_sent"]``.
    - Dion in "hook" mode (``dion_lp.hooks`` exists): DDP with the library's hook,
      ``dion_lp.hooks.register_ddp(ddp, opt, comm_dtype=...)`` (or, per DESIGN.md,
      ``ddp.register_comm_hook(DionHookState(opt, comm_dtype=...), dion_hook)``);
      bytes = the hook state's ``comm_stats()["bytes_sent"]`` (when it reports
      its own and is not the optimizer) + ``opt.comm_stats()["bytes_sent"]``.

    The mode of a Dion row is chosen by ``benchmarks._rows.dion_modes`` and
    recorded on the optimizer as ``opt.ablation_comm``.

    Args:
        row: the row (its ``kind`` and ``comm_dtype``).
        model: the freshly built model.
        opt: the row's optimizer.
        group: the process group, or None.

    Returns:
        The :class:`Wrapped` model.
    """
    world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    mode = getattr(opt, "ablation_comm", "ddp") if row.kind == "dion" else "ddp"
    if world == 1:
        return Wrapped(model, lambda: 0, "none (1 rank)")
    if mode == "sync":
        return Wrapped(model, lambda: _stats_bytes(opt), f"Dion grad_sync ({row.comm_dtype})")
    ddp = DistributedDataParallel(model, process_group=group)
    if mode == "hook":
        hooks = importlib.import_module("dion_lp.hooks")
        if hasattr(hooks, "register_ddp"):
            extra = {"lowrank_rank": row.hook_lowrank} if row.hook_lowrank else {}
            hook_state = hooks.register_ddp(ddp, opt, comm_dtype=row.comm_dtype, **extra)
        else:
            hook_state = hooks.DionHookState(opt, comm_dtype=row.comm_dtype)
            ddp.register_comm_hook(hook_state, hooks.dion_hook)
        if hook_state is opt:
            hook_state = None

        def sent() -> int:
            return _stats_bytes(opt) + _stats_bytes(hook_state)

        lowrank = f", lowrank {row.hook_lowrank}" if row.hook_lowrank else ""
        return Wrapped(ddp, sent, f"DDP + Dion hook ({row.comm_dtype}{lowrank})")
    counter = ByteCounter(group, world)
    ddp.register_comm_hook(counter, counting_allreduce_hook)
    return Wrapped(ddp, counter.wire_bytes, "DDP all-reduce (fp32)")


# ----------------------------------------------------------------------------- training
def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to ``final_lr_fraction``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * cosine


def _set_lr(opt: Any, peaks: list[float], factor: float) -> None:
    for group, peak in zip(opt.param_groups, peaks, strict=True):
        if isinstance(group["lr"], Tensor):  # torchao keeps lr as a tensor
            group["lr"].fill_(peak * factor)
        else:
            group["lr"] = peak * factor


@torch.no_grad()
def evaluate(model: nn.Module, windows: tuple[Tensor, Tensor], group: Any) -> float:
    """Mean validation cross-entropy (nats/byte) over every rank's windows."""
    x, y = windows
    total = torch.zeros(2, dtype=torch.float64)
    if x.numel():
        _, loss = model(x, y)
        total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(total, group=group)
    return float(total[0] / total[1])


def _all_agree(failure: str | None, group: Any) -> str | None:
    """None if every rank succeeded, else this rank's failure (or "another rank failed")."""
    if group is None:
        return failure
    flag = torch.tensor([0 if failure else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if flag.item() == 1:
        return None
    return failure or "failed on another rank"


def _prepare(row: Row, model: nn.Module, ctx: BuildContext) -> tuple[Any, Any, str | None]:
    """(optimizer, wrapped model, None), or (None, None, why the row is not available)."""
    try:
        opt = row.build(model, ctx)
        return opt, wrap_model(row, model, opt, ctx.process_group), None
    except UNAVAILABLE as exc:
        return None, None, unavailable_reason(exc)


def _train_step(wrapped: Wrapped, opt: Any, x: Tensor, y: Tensor) -> tuple[float, str | None]:
    """Forward, backward (gradients averaged by the wrapper), optimizer step."""
    _, loss = wrapped.module(x, y)
    loss.backward()
    value = loss.item()
    try:
        opt.step()
    except Exception as exc:  # reported in the table as a failed row, never hidden
        return value, f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        opt.zero_grad(set_to_none=True)
    return value, None if math.isfinite(value) else f"training loss is {value}"


@dataclass
class _Env:
    """Per-rank objects shared by all rows."""

    cfg: RunConfig
    corpus: Corpus
    rank: int
    group: Any
    local_group: Any
    eval_set: tuple[Tensor, Tensor]
    progress: Callable[[int], None]


@dataclass
class _RowRun:
    """One row being trained: its model, optimizer, wrapper and record."""

    name: str
    model: nn.Module
    opt: Any
    wrapped: Wrapped
    record: dict[str, Any]
    peaks: list[float]
    times: list[float] = field(default_factory=list)
    running: bool = True


def _start_row(name: str, seed: int, env: _Env) -> _RowRun | dict[str, Any]:
    """Build a row's model (seeded), optimizer and wrapper; its record if not available."""
    cfg, row = env.cfg, ROWS[name]
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    record: dict[str, Any] = {"row": name, "seed": seed, "n_params": model.num_params()}
    record.update(status="ok", note=row.note, comm="", evals=[], steps_done=0)
    ctx = BuildContext(env.group, cfg.world_size, seed, cfg.dion_comm, env.local_group)
    opt, wrapped, reason = _prepare(row, model, ctx)
    reason = _all_agree(reason, env.group)
    if reason:
        record["status"] = f"not available: {reason}"
        return record
    record["comm"] = wrapped.comm
    record["dion_mode"] = getattr(opt, "ablation_comm", None)
    return _RowRun(name, model, opt, wrapped, record, [float(g["lr"]) for g in opt.param_groups])


def _step_row(run: _RowRun, step: int, x: Tensor, y: Tensor, env: _Env) -> None:
    """One timed training step of one row; a failure (agreed by all ranks) stops the row."""
    _set_lr(run.opt, run.peaks, lr_factor(step, env.cfg))
    start = time.perf_counter()
    _, failure = _train_step(run.wrapped, run.opt, x, y)
    run.times.append(time.perf_counter() - start)
    failure = _all_agree(failure, env.group)
    if failure:
        run.record["status"] = f"failed at step {step}: {failure}"
        run.running = False
        env.progress(env.cfg.steps - step - 1)
    else:
        run.record["steps_done"] = step + 1


def run_seed(seed: int, env: _Env) -> list[dict[str, Any]]:
    """Train every row with one seed in lock-step; returns their records in row order.

    Each global step runs one step of every row in turn, on the same batch, so
    a change of machine load hits all rows alike and the step-time ratios
    compare like with like (round-robin timing). The rows' results are those
    of training each alone: nothing is shared between them but the batches.
    """
    cfg = env.cfg
    started = [_start_row(name, seed, env) for name in cfg.rows]
    runs = [r for r in started if isinstance(r, _RowRun)]
    env.progress(cfg.steps * (len(started) - len(runs)))
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            for run in (r for r in runs if r.running):
                loss = evaluate(run.model, env.eval_set, env.group)
                run.record["evals"].append([step, loss, run.wrapped.bytes_sent()])
        if step == cfg.steps:
            break
        x, y = env.corpus.get_batch(
            "train", step, cfg.batch_size, cfg.model.seq_len, env.rank, cfg.world_size, seed
        )
        for run in (r for r in runs if r.running):
            _step_row(run, step, x, y, env)
        env.progress(sum(r.running for r in runs))
    for run in runs:
        _summarise(run.record, run.times, run.wrapped, run.opt)
    return [r.record if isinstance(r, _RowRun) else r for r in started]


def _summarise(record: dict[str, Any], times: list[float], wrapped: Wrapped, opt: Any) -> None:
    """Per-step bytes, state bytes and step time of a trained row."""
    steps = max(1, record["steps_done"])
    first_bytes = record["evals"][0][2] if record["evals"] else 0
    record["bytes_per_step"] = (wrapped.bytes_sent() - first_bytes) / steps
    record["state_bytes"] = state_bytes(opt)
    record["state_bytes_per_param"] = record["state_bytes"] / record["n_params"]
    skip = min(5, len(times) // 5)  # first steps allocate state
    record["step_time"] = statistics.median(times[skip:]) if times else float("nan")
    record["init_loss"] = record["evals"][0][1] if record["evals"] else float("nan")
    record["final_loss"] = record["evals"][-1][1] if record["status"] == "ok" else float("nan")


def _init(rank: int, cfg: RunConfig, port: int) -> tuple[Any, Any]:
    """(the world group, a group of this rank alone), or (None, None) for one rank."""
    torch.set_num_threads(1)
    if cfg.world_size == 1:
        return None, None
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=cfg.world_size,
        timeout=timedelta(seconds=cfg.collective_timeout),
    )
    # new_group is collective: every rank creates every one-rank group, in order
    singles = [dist.new_group([r]) for r in range(cfg.world_size)]
    return dist.group.WORLD, singles[rank]


def worker(rank: int, cfg: RunConfig, port: int, queue: Any) -> None:
    """Entry point of one rank: runs every (seed, row) and reports to ``queue``.

    Messages: ``("progress", row-steps done)`` and ``("record", dict)`` from rank 0,
    ``("done", rank)`` from every rank at the end, ``("error", rank, traceback)``.

    Args:
        rank: this rank.
        cfg: the run.
        port: a free TCP port on 127.0.0.1 for the gloo rendezvous.
        queue: a multiprocessing queue read by the parent.
    """
    group = None
    try:
        group, local_group = _init(rank, cfg, port)
        corpus = load_corpus(cfg.train_bytes, cfg.val_bytes)
        eval_set = corpus.eval_windows(
            "val", cfg.eval_windows, cfg.model.seq_len, rank, cfg.world_size
        )

        def progress(n: int) -> None:
            if rank == 0 and n:
                queue.put(("progress", n))

        env = _Env(cfg, corpus, rank, group, local_group, eval_set, progress)
        for seed in cfg.seeds:
            records = run_seed(seed, env)
            if rank == 0:
                for record in records:
                    queue.put(("record", record))
        queue.put(("done", rank))
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
        if group is not None and dist.is_initialized():
            dist.destroy_process_group()
        raise
    exit_rank(queue)
