"""Train a small byte-level GPT with DDP + dion_lp, with crash-safe checkpoints.

Launch (2 processes on one machine; gloo on CPU, nccl when CUDA is available)::

    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 40
    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 80 --ckpt-dir ckpt --resume

What it shows:

- ``dion_lp.Dion`` on the hidden matrices (int8 momentum, factors exchanged in
  fp8 between the replicas) and Lion on embeddings, head, biases and norms;
- the DDP comm hook registered in one line (``dion_lp.register_ddp``): the
  gradients of Dion's matrices stay local (Dion exchanges their low-rank factors
  itself), the other gradients are averaged in bf16 with error feedback;
- the wire bytes of every step, optimizer factors + hook, from the counters
  ``opt.comm_stats()`` and ``hook_state.comm_stats()``;
- checkpoints that survive ``kill -9`` at any moment, and a resume that ends with
  the same parameters, bit for bit, as an uninterrupted run.

Checkpoint layout (``--ckpt-dir``; every rank must see the same directory)::

    step_00000020/
        model.pt     rank 0's model state (the parameters are identical on every rank)
        rank0.pt     rank 0's optimizer state (its own Dion momentum), hook residuals, RNG
        rank1.pt     the same for rank 1
        COMPLETE     JSON manifest (step, world size, size and sha256 of every file)

Every file is written to a temporary file in the same directory, fsync'ed and
renamed over its final name (``os.replace``, atomic on POSIX), so a file is either
absent or whole. ``COMPLETE`` is written last, by rank 0, once every rank has
renamed its files into place (the ranks meet in a collective first), so a step
directory without it, a crash mid-checkpoint, is never loaded. ``--resume`` takes
the newest directory whose manifest is there and whose files match it, and
skips (and reports) any other. Replicas keep different Dion momenta by design, so
every rank's optimizer state is saved: resuming is bit for bit on the same world
size. The training data of step ``s`` is a pure function of ``s`` (and the seed),
and the learning rate a function of ``s`` only, so a resumed run sees exactly the
batches the uninterrupted run would have seen.

Model and data come from the repository's ``benchmarks`` package (the small GPT of
the ablation, trained on the Python standard library's own source files), so the
script runs offline. Device-agnostic code (CPU/gloo and CUDA/nccl), but only run on
CPU with gloo here: untested on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dion_lp

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # benchmarks/ (model and data) sits next to examples/
    sys.path.insert(0, str(_REPO))
from benchmarks.data import load_corpus  # noqa: E402
from benchmarks.model import GPT, GPTConfig  # noqa: E402

COMM_DTYPES = ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2")
MOMENTUM_DTYPES = ("fp32", "bf16", "int8", "fp8_e4m3", "int4", "fp4_e2m1")
MARKER = "COMPLETE"
STEP_PREFIX = "step_"
CKPT_VERSION = 1


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (every one has a small default: 40 steps take seconds on CPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="train until this many steps are done")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint directory (shared)")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every k steps")
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep (>= 1)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--save-final", type=Path, default=None, help="save the final model state")
    p.add_argument(
        "--comm-dtype",
        choices=COMM_DTYPES,
        default="fp8_e4m3",
        help="wire format of Dion's factor exchange",
    )
    p.add_argument(
        "--hook-dtype",
        choices=COMM_DTYPES,
        default="bf16",
        help="wire format of the DDP hook (non-Dion gradients)",
    )
    p.add_argument(
        "--hook-lowrank",
        type=int,
        default=0,
        help="send the embedding and head gradients as rank-r factors (0: whole)",
    )
    p.add_argument(
        "--momentum-dtype",
        choices=MOMENTUM_DTYPES,
        default="int8",
        help="storage of Dion's momentum and of Lion's state",
    )
    p.add_argument("--rank-fraction", type=float, default=0.25, help="Dion rank / min(m, n)")
    p.add_argument("--lr", type=float, default=0.02, help="Dion learning rate (hidden matrices)")
    p.add_argument("--scalar-lr", type=float, default=3e-3, help="Lion learning rate (the rest)")
    p.add_argument("--warmup", type=int, default=5, help="linear learning-rate warm-up steps")
    p.add_argument("--d-model", type=int, default=64, help="model width")
    p.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seed", type=int, default=0, help="model init, data order, optimizer seed")
    p.add_argument("--log-every", type=int, default=1, help="print every k steps")
    args = p.parse_args(argv)
    for name in ("steps", "ckpt_every", "keep", "log_every", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.resume and args.ckpt_dir is None:
        p.error("--resume needs --ckpt-dir")
    return args


# ----------------------------------------------------------------------------- setup
def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group: nccl + one GPU per process if CUDA, else gloo on CPU."""
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc_per_node=2 " + __file__)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


def log(*parts: Any) -> None:
    """Print on rank 0 only, flushed (the output is read while the run goes on)."""
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up, then constant: a function of the step only, so resuming changes nothing."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def params_sha256(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes and raw bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, the old file, or all of it.

    Temp file in the same directory (same filesystem, so the rename is atomic),
    fsync of the data, ``os.replace``, fsync of the directory.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; checkpoints are read by every rank's user
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_torch(path: Path, obj: Any) -> dict[str, Any]:
    """``torch.save`` ``obj`` atomically; returns ``{"bytes", "sha256"}`` for the manifest."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_torch(path: Path, device: torch.device) -> Any:
    """``torch.load(..., weights_only=True)`` onto ``device``."""
    return torch.load(path, map_location=device, weights_only=True)


# ----------------------------------------------------------------------------- checkpoints
def step_dir(ckpt_dir: Path, step: int) -> Path:
    """Directory of the checkpoint taken after ``step`` steps."""
    return ckpt_dir / f"{STEP_PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(STEP_PREFIX) :]
    return int(suffix) if path.name.startswith(STEP_PREFIX) and suffix.isdigit() else None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory, complete or not, as (step, path), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(_step_of(p), p) for p in ckpt_dir.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when its manifest and files check out."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (interrupted while being written)"
    try:
        manifest = json.loads(marker.read_text())
        files: Mapping[str, Mapping[str, Any]] = manifest["files"]
        expected = {"model.pt", *(f"rank{r}.pt" for r in range(int(manifest["world_size"])))}
        if manifest["step"] != _step_of(path):
            return f"its marker is for step {manifest['step']!r}"
        if set(files) != expected:
            return f"its marker lists {sorted(files)}, expected {sorted(expected)}"
        for name, meta in files.items():
            f = path / name
            if not f.is_file() or f.stat().st_size != meta["bytes"]:
                return f"{name} is missing or has the wrong size"
            if hashlib.sha256(f.read_bytes()).hexdigest() != meta["sha256"]:
                return f"{name} does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MARKER} marker or file ({err!r})"
    return None


def find_latest(ckpt_dir: Path) -> Path | None:
    """Newest checkpoint that :func:`verify_checkpoint` accepts; reports the ones skipped."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        print(f"skipping checkpoint {path.name} (step {step}): {reason}", flush=True)
    return None


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, marker first: a half-deleted one is never 'complete'."""
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: nn.Module,
    opt: dion_lp.Dion,
    hook_state: Any,
    config: Mapping[str, Any],
    keep: int,
) -> Path:
    """Collective: every rank writes its file, then rank 0 writes the manifest, then prunes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    path = step_dir(ckpt_dir, step)
    if rank == 0:  # a leftover of a run that crashed after this step: never mix files
        if path.exists():
            _remove_checkpoint(path)
        path.mkdir(parents=True)
        _fsync_dir(ckpt_dir)
    dist.barrier()
    files: dict[str, dict[str, Any]] = {}
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        files["model.pt"] = save_torch(path / "model.pt", state)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    per_rank = {
        "version": CKPT_VERSION,
        "step": step,
        "rank": rank,
        "optimizer": opt.state_dict(),
        "hook": hook_state.state_dict(),
        "rng": rng,
    }
    files[f"rank{rank}.pt"] = save_torch(path / f"rank{rank}.pt", per_rank)
    # The barrier before the marker: rank 0 gets every rank's manifest entries only
    # once that rank's files are renamed into place and fsync'ed.
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(files, gathered, dst=0)
    if rank == 0:
        assert gathered is not None
        manifest = {
            "version": CKPT_VERSION,
            "step": step,
            "world_size": world,
            "config": dict(config),
            "files": {k: v for entry in gathered for k, v in entry.items()},
        }
        atomic_write(path / MARKER, json.dumps(manifest, indent=1).encode())
        # Prune older ones: incomplete leftovers, and complete ones beyond the newest
        # ``keep``. Directories past this step (another run's, or corrupted) are left alone.
        older = [(s, p) for s, p in list_checkpoints(ckpt_dir) if s <= step]
        complete = [p for _, p in older if (p / MARKER).is_file()]
        for old_step, old in older:
            if old_step < step and (old not in complete or old in complete[:-keep]):
                _remove_checkpoint(old)
    return path


def load_checkpoint(
    path: Path, model: nn.Module, device: torch.device
) -> tuple[int, dict[str, Any], Mapping[str, Any]]:
    """Load the model state into ``model``; return (step, this rank's file, saved config)."""
    manifest = json.loads((path / MARKER).read_text())
    if manifest["world_size"] != dist.get_world_size():  # every rank stops, none hangs
        raise SystemExit(
            f"{path} was saved by {manifest['world_size']} ranks, this run has "
            f"{dist.get_world_size()}: each rank's Dion momentum is saved, so resume on "
            "the same number of ranks (or save after opt.synchronize_for_checkpoint())"
        )
    model.load_state_dict(load_torch(path / "model.pt", device))
    per_rank = load_torch(path / f"rank{dist.get_rank()}.pt", device)
    if per_rank["step"] != manifest["step"]:
        raise RuntimeError(f"{path}: rank file of step {per_rank['step']} in a step dir")
    return int(manifest["step"]), per_rank, manifest["config"]


# ----------------------------------------------------------------------------- training
def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """What must match between a checkpoint and the run resuming it."""
    keys = ("comm_dtype", "hook_dtype", "hook_lowrank", "momentum_dtype", "rank_fraction")
    keys += ("d_model", "n_layer")
    keys += ("n_head", "seq_len", "batch_size", "seed", "lr", "scalar_lr", "warmup")
    return {k: getattr(args, k) for k in keys}


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> dion_lp.Dion:
    """Dion on the hidden matrices, Lion (at ``--scalar-lr``) on everything else."""
    groups = dion_lp.param_groups(model, scalar_algorithm="lion", scalar_lr=args.scalar_lr)
    return dion_lp.Dion(
        groups,
        lr=args.lr,
        rank_fraction=args.rank_fraction,
        momentum_dtype=args.momentum_dtype,
        comm_dtype=args.comm_dtype,
        seed=args.seed,
    )  # world > 1 and no process_group: replicated over the default group


def train(args: argparse.Namespace) -> None:
    """The whole run on this rank (called under torchrun)."""
    rank, world, device = setup_distributed()
    t_start = time.perf_counter()
    config = build_config(args)
    cfg = GPTConfig(
        seq_len=args.seq_len, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head
    )
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)

    resume_from: Path | None = None
    if args.resume:
        holder = [find_latest(args.ckpt_dir) if rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)  # every rank resumes from rank 0's choice
        resume_from = holder[0]
    start, per_rank = 0, None
    if resume_from is not None:
        start, per_rank, saved = load_checkpoint(resume_from, model, device)
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"{resume_from} was saved with other settings (saved, now): {changed}")
        if start > args.steps:
            raise SystemExit(f"{resume_from} is past --steps {args.steps}; raise --steps")
        log(f"resumed from {resume_from} (step {start})")
    elif args.resume:
        log(f"no complete checkpoint in {args.ckpt_dir}; starting from step 0")

    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    opt = build_optimizer(ddp.module, args)
    hook_state = dion_lp.register_ddp(  # the one line
        ddp, opt, comm_dtype=args.hook_dtype, lowrank_rank=args.hook_lowrank
    )
    # Peak learning rates, read before loading a checkpoint: a saved state holds the lr
    # of its last step (mid warm-up, that is not the peak).
    peaks = [group["lr"] for group in opt.param_groups]
    if per_rank is not None:
        opt.load_state_dict(per_rank["optimizer"])
        hook_state.load_state_dict(per_rank["hook"])
        torch.set_rng_state(per_rank["rng"]["cpu"].cpu())
        if "cuda" in per_rank["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(per_rank["rng"]["cuda"].cpu())

    n_dion = sum(
        p.numel() for g in opt.param_groups if g["algorithm"] == "dion" for p in g["params"]
    )
    n_all = sum(p.numel() for g in opt.param_groups for p in g["params"])
    log(
        f"world {world} | backend {dist.get_backend()} | device {device} | params {n_all} "
        f"(dion {n_dion}, lion {n_all - n_dion}) | factors {args.comm_dtype} | hook "
        f"{args.hook_dtype} (lowrank {args.hook_lowrank}) | momentum {args.momentum_dtype} | "
        f"rank_fraction {args.rank_fraction}"
    )
    corpus = load_corpus()
    loss_mean = torch.zeros((), device=device)
    t_loop = time.perf_counter()
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * lr_factor(step, args.warmup)
        x, y = corpus.get_batch(
            "train", step, args.batch_size, args.seq_len, rank, world, seed=args.seed
        )
        _, loss = ddp(x.to(device), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            loss_mean.copy_(loss.detach())
            dist.all_reduce(loss_mean)  # for the log only (not counted below)
            opt_bytes = opt.comm_stats()["last_step"]
            hook_bytes = hook_state.comm_stats()["last_step"]
            log(
                f"step {done:5d} | loss {loss_mean.item() / world:.4f} | bytes/step "
                f"{opt_bytes + hook_bytes} = optimizer {opt_bytes} + hook {hook_bytes} | "
                f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
            )
        if args.ckpt_dir is not None and (done % args.ckpt_every == 0 or done == args.steps):
            path = save_checkpoint(
                args.ckpt_dir, done, ddp.module, opt, hook_state, config, args.keep
            )
            log(f"checkpoint {path} complete")

    finish(args, ddp.module, opt, hook_state, start, t_start, t_loop)
    dist.destroy_process_group()


def finish(
    args: argparse.Namespace,
    model: nn.Module,
    opt: dion_lp.Dion,
    hook_state: Any,
    start: int,
    t_start: float,
    t_loop: float,
) -> None:
    """Final loss on a fixed batch, parameter checksum (checked equal on every rank), totals."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    x, y = load_corpus().eval_windows("val", 64, args.seq_len, rank, world)
    model.eval()
    with torch.no_grad():
        _, loss = model(x.to(device), y.to(device))
    total = loss.detach().reshape(1)
    dist.all_reduce(total)
    digest = params_sha256(model)
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"parameters differ between ranks: {digests}")
    if args.save_final is not None and rank == 0:
        args.save_final.parent.mkdir(parents=True, exist_ok=True)
        save_torch(args.save_final, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    o, h = opt.comm_stats(), hook_state.comm_stats()
    ran = args.steps - start
    now = time.perf_counter()
    log(
        f"comm totals | optimizer {o['bytes_sent']} B in {o['steps']} steps | "
        f"hook {h['bytes_sent']} B in {h['steps']} steps"
    )
    log(
        f"final | step {args.steps} | val loss {total.item() / world:.4f} | "
        f"params sha256 {digest} (identical on {world} ranks)"
    )
    log(f"time | {ran} steps in {now - t_loop:.2f} s | total {now - t_start:.2f} s")


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse the flags and train."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
