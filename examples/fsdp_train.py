"""Train a small byte-level GPT with FSDP2 (``fully_shard``) + sharded dion_lp, DCP checkpoints.

Launch (gloo on CPU, nccl when CUDA is available)::

    torchrun --nproc_per_node=2 examples/fsdp_train.py --steps 40 --ckpt-dir ckpt
    torchrun --nproc_per_node=2 examples/fsdp_train.py --steps 80 --ckpt-dir ckpt --resume
    torchrun --nproc_per_node=1 examples/fsdp_train.py --steps 80 --ckpt-dir ckpt --resume

What it shows:

- ``fully_shard`` on every transformer block and on the root: each parameter is a
  DTensor split row-wise (``Shard(0)``) over the ranks;
- ``dion_lp.Dion`` on those DTensors: Dion (int8 momentum, fp8 factors by default)
  on the hidden matrices, Lion (int8 state) on embeddings, head, biases and norms.
  The optimizer states stay sharded like the parameters (only Dion's thin right
  factor Q may be replicated); no rank holds or sends a whole matrix in the
  optimizer step;
- the optimizer's wire bytes of every step (``opt.comm_stats()["last_step"]``:
  Dion's factors, Gram matrices and column norms, and the per-step agreement on
  non-finite gradients). FSDP's own parameter all-gathers and gradient
  reduce-scatters are not part of it: they are the same for any optimizer;
- ``torch.distributed.checkpoint`` (DCP) checkpoints of the model and of
  ``dcp_state_dict(opt)``, and ``--resume`` from the newest complete one, on the
  same number of ranks or on another (DCP reshards the DTensors; dion_lp's 8-bit
  states are quantized along whole rows, so their codes reshard exactly).

Checkpoint layout (``--ckpt-dir``; every rank must see the same directory)::

    step_00000020/
        .metadata, __0_0.distcp, __1_0.distcp   DCP's files (one data file per saving rank)
        COMPLETE     JSON manifest: step, world size, settings, size of every DCP file

``COMPLETE`` is written last, by rank 0, after ``dcp.save`` has returned on every
rank and the ranks have met at a barrier; it goes to a temporary file, is fsync'ed
and renamed into place (atomic on POSIX). A step directory without it (a crash
mid-checkpoint), or whose files do not have the sizes it lists, is skipped (and
reported) by ``--resume``, which takes the newest checkpoint that checks out.

Determinism. The batch of step ``s`` is a pure function of ``s`` and the seed,
``--global-batch`` sequences split over however many ranks run, and the learning
rate a function of ``s`` only. On the same number of ranks a resumed run ends
with the uninterrupted run's parameters bit for bit, with nearest and with
stochastic rounding alike: its random bits are a function of (seed, parameter,
step) and each element's global index, so there is no generator state to lose.
On another number of ranks the run goes on from the same state, but float sums
are taken in another order (stochastic rounding draws the same bits for the same
elements, but the values it rounds differ in their last bits; a single rank sends
nothing, so it never rounds factors to ``--comm-dtype``), so it ends close to,
not equal to, the uninterrupted run. (The attention key biases are the exception:
softmax ignores them, so their exact gradient is zero and Lion follows the sign of
rounding noise, +-lr per step.)

The full model is built on every rank (seeded identically) before ``fully_shard``
splits it, which suits a small model; a large one would be built on the ``meta``
device, sharded, then materialized (``to_empty`` + initialization) instead.

Model and data come from the repository's ``benchmarks`` package (the small GPT of
the ablation, trained on the Python standard library's own source files), so the
script runs offline. The code is device-agnostic (CPU/gloo and CUDA/nccl) but has
only been run on CPU with gloo: untested on CUDA.
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
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import dion_lp
from dion_lp import dcp_state_dict, load_dcp_state_dict
from dion_lp.dist.accounting import collective_bytes

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
EVAL_WINDOWS = 64


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (every one has a small default: 40 steps take seconds on CPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="train until this many steps are done")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint directory (shared)")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every k steps")
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep (>= 1)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--save-final", type=Path, default=None, help="save the full final weights")
    p.add_argument(
        "--comm-dtype", choices=COMM_DTYPES, default="fp8_e4m3", help="wire format of the factors"
    )
    p.add_argument(
        "--momentum-dtype",
        choices=MOMENTUM_DTYPES,
        default="int8",
        help="storage of Dion's momentum and of Lion's state",
    )
    p.add_argument(
        "--rounding",
        choices=("stochastic", "nearest"),
        default="stochastic",
        help="rounding of the low-precision momentum",
    )
    p.add_argument("--rank-fraction", type=float, default=0.25, help="Dion rank / min(m, n)")
    p.add_argument("--lr", type=float, default=0.02, help="Dion learning rate (hidden matrices)")
    p.add_argument("--scalar-lr", type=float, default=3e-3, help="Lion learning rate (the rest)")
    p.add_argument("--warmup", type=int, default=5, help="linear learning-rate warm-up steps")
    p.add_argument("--d-model", type=int, default=64, help="model width")
    p.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step over all ranks")
    p.add_argument("--seed", type=int, default=0, help="model init, data order, optimizer seed")
    p.add_argument("--log-every", type=int, default=1, help="print every k steps")
    args = p.parse_args(argv)
    for name in ("steps", "ckpt_every", "keep", "log_every", "global_batch"):
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


def build_model(args: argparse.Namespace, device: torch.device, world: int) -> GPT:
    """The GPT, identical on every rank (seeded), then ``fully_shard``-ed: blocks, then root."""
    cfg = GPTConfig(
        seq_len=args.seq_len, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head
    )
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head
    return model


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> dion_lp.Dion:
    """Dion on the hidden matrices, Lion (at ``--scalar-lr``) on everything else."""
    groups = dion_lp.param_groups(model, scalar_algorithm="lion", scalar_lr=args.scalar_lr)
    return dion_lp.Dion(
        groups,
        lr=args.lr,
        rank_fraction=args.rank_fraction,
        momentum_dtype=args.momentum_dtype,
        comm_dtype=args.comm_dtype,
        stochastic_rounding=args.rounding == "stochastic",
        seed=args.seed,
    )  # DTensor params and no process_group: plain FSDP, the shards are the whole job


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """What must match between a checkpoint and the run resuming it (not the world size)."""
    keys = ("comm_dtype", "momentum_dtype", "rounding", "rank_fraction", "d_model", "n_layer")
    keys += ("n_head", "seq_len", "global_batch", "seed", "lr", "scalar_lr", "warmup")
    return {k: getattr(args, k) for k in keys}


# ----------------------------------------------------------------------------- full weights
def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer, whole, on CPU (collective: DTensors are all-gathered).

    Only for the end of the run (checksum, final weights): the training step never
    gathers a parameter.
    """
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.detach().cpu().contiguous()
    return out


def params_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and raw bytes of ``state``."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- files
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
    """Write ``data`` to ``path``: temp file in the same directory, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o644)  # mkstemp makes 0600
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
        files: Mapping[str, int] = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {MARKER} marker ({err!r})"
    if manifest.get("step") != _step_of(path):
        return f"its marker is for step {manifest.get('step')!r}, not {_step_of(path)}"
    if ".metadata" not in files:
        return "its manifest lists no DCP .metadata"
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
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
    config: Mapping[str, Any],
    keep: int,
) -> Path:
    """Collective: DCP save of model + optimizer, a barrier, then rank 0's marker, then pruning."""
    rank, world = dist.get_rank(), dist.get_world_size()
    path = step_dir(ckpt_dir, step)
    if rank == 0:  # a leftover of a run that crashed after this step: never mix files
        if path.exists():
            _remove_checkpoint(path)
        path.mkdir(parents=True)
        _fsync_dir(ckpt_dir)
    dist.barrier()
    state = {"model": model.state_dict(), "optim": dcp_state_dict(opt)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True))
    dist.barrier()  # every rank's data files are written and fsync'ed
    if rank == 0:
        files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
        manifest = {
            "version": CKPT_VERSION,
            "step": step,
            "world_size": world,
            "config": dict(config),
            "files": files,
        }
        atomic_write(path / MARKER, json.dumps(manifest, indent=1).encode())
        complete = [p for _, p in list_checkpoints(ckpt_dir) if (p / MARKER).is_file()]
        for old_step, old in list_checkpoints(ckpt_dir):
            if old_step < step and (old not in complete or old in complete[:-keep]):
                _remove_checkpoint(old)
    return path


def load_checkpoint(path: Path, model: nn.Module, opt: dion_lp.Dion) -> dict[str, Any]:
    """Load model and optimizer in place (any number of ranks); return the manifest."""
    manifest = json.loads((path / MARKER).read_text())
    state = {"model": model.state_dict(), "optim": dcp_state_dict(opt)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    model.load_state_dict(state["model"])
    load_dcp_state_dict(opt, state["optim"])
    return manifest


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, seq_len: int, device: torch.device) -> float:
    """Mean next-byte loss (nats) on a fixed validation set split over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = load_corpus().eval_windows("val", EVAL_WINDOWS, seq_len, rank, world)
    logits, _ = model(x.to(device))
    total = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum"
    )
    sums = torch.stack([total, torch.tensor(float(y.numel()), device=device)])
    dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def dion_numel(opt: dion_lp.Dion) -> int:
    """Elements of the (whole) matrices in Dion's groups."""
    return sum(p.numel() for g in opt.param_groups if g["algorithm"] == "dion" for p in g["params"])


def dion_matrix_bytes(opt: dion_lp.Dion, world: int) -> int:
    """Bytes one rank would send to all-gather every Dion matrix once in fp32 (sharded Muon)."""
    return collective_bytes("all_gather", 4 * dion_numel(opt), world)


def train(args: argparse.Namespace) -> None:
    """The whole run on this rank (called under torchrun)."""
    rank, world, device = setup_distributed()
    t_start = time.perf_counter()
    config = build_config(args)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of {world} ranks")
    batch = args.global_batch // world

    model = build_model(args, device, world)
    opt = build_optimizer(model, args)
    # Peak learning rates, read before loading a checkpoint: a saved state holds the lr
    # of its last step (mid warm-up, that is not the peak).
    peaks = [group["lr"] for group in opt.param_groups]

    start = 0
    if args.resume:
        holder = [find_latest(args.ckpt_dir) if rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)  # every rank resumes from rank 0's choice
        if holder[0] is None:
            log(f"no complete checkpoint in {args.ckpt_dir}; starting from step 0")
        else:
            path = Path(holder[0])
            saved = json.loads((path / MARKER).read_text())
            changed = {k: (saved["config"].get(k), v) for k, v in config.items()}
            changed = {k: sv for k, sv in changed.items() if sv[0] != sv[1]}
            if changed:
                raise SystemExit(f"{path} was saved with other settings (saved, now): {changed}")
            if saved["step"] > args.steps:
                raise SystemExit(f"{path} is past --steps {args.steps}; raise --steps")
            start = int(load_checkpoint(path, model, opt)["step"])
            how = "same world size" if saved["world_size"] == world else "resharded by DCP"
            log(f"resumed from {path} (step {start}, saved on {saved['world_size']} ranks, {how})")

    n_dion = dion_numel(opt)
    n_all = sum(p.numel() for g in opt.param_groups for p in g["params"])
    log(
        f"world {world} | backend {dist.get_backend()} | device {device} | params {n_all} "
        f"(dion {n_dion}, lion {n_all - n_dion}) | factors {args.comm_dtype} | momentum "
        f"{args.momentum_dtype} ({args.rounding}) | rank_fraction {args.rank_fraction} | "
        f"batch {batch} x {world} ranks"
    )
    log(
        f"for scale: all-gathering every Dion matrix once in fp32 (what sharded Muon does) "
        f"would send {dion_matrix_bytes(opt, world)} B per step per rank"
    )
    corpus = load_corpus()
    loss_mean = torch.zeros((), device=device)
    t_loop = time.perf_counter()
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * lr_factor(step, args.warmup)
        x, y = corpus.get_batch("train", step, batch, args.seq_len, rank, world, seed=args.seed)
        _, loss = model(x.to(device), y.to(device))
        loss.backward()  # FSDP reduce-scatters the mean gradient into each rank's shard
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            loss_mean.copy_(loss.detach())
            dist.all_reduce(loss_mean)  # for the log only (not counted in the bytes)
            log(
                f"step {done:5d} | loss {loss_mean.item() / world:.4f} | bytes/step "
                f"{opt.comm_stats()['last_step']} | {(time.perf_counter() - t0) * 1e3:.0f} ms"
            )
        if args.ckpt_dir is not None and (done % args.ckpt_every == 0 or done == args.steps):
            path = save_checkpoint(args.ckpt_dir, done, model, opt, config, args.keep)
            log(f"checkpoint {path} complete")

    finish(args, model, opt, device, start, t_start, t_loop)
    dist.destroy_process_group()


def finish(
    args: argparse.Namespace,
    model: nn.Module,
    opt: dion_lp.Dion,
    device: torch.device,
    start: int,
    t_start: float,
    t_loop: float,
) -> None:
    """Validation loss, byte totals, the checksum of the gathered weights (and saving them)."""
    world = dist.get_world_size()
    val = evaluate(model, args.seq_len, device)
    full = full_state(model)  # collective: every rank gathers
    stats = opt.comm_stats()
    log(
        f"comm totals | optimizer {stats['bytes_sent']} B in {stats['steps']} steps | "
        f"optimizer state {opt.state_bytes()} B on rank 0"
    )
    if dist.get_rank() == 0:
        digest = params_sha256(full)
        if args.save_final is not None:  # whole tensors: loads without torch.distributed
            args.save_final.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(full, buf)
            atomic_write(args.save_final, buf.getvalue())
        log(f"final | step {args.steps} | val loss {val:.4f} | params sha256 {digest}")
    now = time.perf_counter()
    log(
        f"time | {args.steps - start} steps in {now - t_loop:.2f} s | total "
        f"{now - t_start:.2f} s | {world} ranks"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse the flags and train."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
