"""Bytes DDP moves per step: default all-reduce, compress hooks, PowerSGD, dion_hook + Dion.

Two parts:

1. Accounting for a GPT-2-small-shaped model (12 layers, d 768, 4x MLP, vocab
   50257, 1024 positions, tied head: 124,439,808 parameters), built on the meta
   device, so nothing is allocated. Every figure is one rank's wire bytes per
   optimizer step in the nccl-tests bus-bandwidth convention of
   :mod:`dion_lp.dist.accounting` (an all-reduce of S bytes over N ranks costs 2 (N-1)/N S):

   - default DDP: an fp32 all-reduce of every bucket;
   - ``compress_hook`` (bf16 / fp8): one quantized mean of every gradient per step,
     ``mean_bytes(numel, fmt, N)``, after an all-reduce of one uint8 non-finite
     flag per gradient;
   - torch's PowerSGD (rank r), from its algorithm, per bucket: one fp32
     all-reduce of the tensors it does not compress (vectors, and matrices with
     ``(n + m) r * 2 >= n m``), one of the P factors (``n r`` per n x m matrix)
     and one of the Q factors (``m r``);
   - ``dion_hook`` + Dion with fp8 factors: the hook's one mean of the non-Dion
     gradients in its format (and their uint8 flags), plus what Dion sends itself: its per-step
     agreement on non-finite gradients (an all-reduce of 2 bytes per parameter
     tensor) and the means of P (``max(m, n) r``) and R (``min(m, n) r``) over every
     matrix, r = ceil(rank_fraction min(m, n)).
   - the same with the hook's ``lowrank_rank`` 32 or 8: the non-Dion matrices
     that ``dion_lp.ddp.lowrank.compressed_shape`` accepts (GPT-2's token and position
     embeddings) travel as the means of their P (n r) and Q (m r) factors.

   DDP's buckets are its steady-state ones (25 MiB, the first 1 MiB, in reverse
   parameter order); only the per-bucket all-reduces depend on them, and only
   through byte rounding.

2. A measured run that checks the accounting: 2 gloo ranks train a small GPT
   on the benchmark corpus with each method (torch.distributed's collectives
   wrapped and counted, optimizer steps included) and the measured bytes of the
   last step are compared with the same accounting applied to that model and to
   the buckets DDP actually used. The validation loss after the run is reported.

    python -m benchmarks.ddp_bytes                     # both parts (~30 s)
    python -m benchmarks.ddp_bytes --no-measure        # accounting only
    python -m benchmarks.ddp_bytes --world-size 64 --rank-fraction 0.125
"""

# No ``from __future__ import annotations``: DDP checks hook annotations at run time.

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dion_lp
from dion_lp.ddp.lowrank import compressed_shape
from dion_lp.dist.accounting import collective_bytes, mean_bytes
from dion_lp.options import dion_rank

from ._baselines import ADAMW
from ._rows import DION, SCALAR_LR
from ._spawn import exit_rank
from .model import GPT, GPTConfig

__all__ = ["GPT2_SMALL", "METHODS", "ParamShape", "account", "gpt2_params", "main", "model_params"]

GPT2_SMALL = GPTConfig(
    vocab_size=50257, seq_len=1024, d_model=768, n_layer=12, n_head=12, tied=True, bias=True
)
SMALL = GPTConfig(vocab_size=256, seq_len=64, d_model=128, n_layer=2, n_head=4)
FIRST_BUCKET_BYTES, BUCKET_BYTES = 1 << 20, 25 << 20  # DDP's defaults
FACTOR_FMT = "fp8_e4m3"
# name -> (label, kind, options)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddp_fp32": ("default DDP (fp32 all-reduce)", "allreduce", {}),
    "compress_bf16": ("compress_hook bf16", "compress", {"fmt": "bf16"}),
    "compress_fp8": ("compress_hook fp8_e4m3", "compress", {"fmt": "fp8_e4m3"}),
    "powersgd_r4": ("torch PowerSGD rank 4", "powersgd", {"rank": 4}),
    "powersgd_r32": ("torch PowerSGD rank 32", "powersgd", {"rank": 32}),
    "dion_bf16": ("dion_hook bf16 + Dion fp8 factors", "dion", {"fmt": "bf16"}),
    "dion_fp8": ("dion_hook fp8_e4m3 + Dion fp8 factors", "dion", {"fmt": "fp8_e4m3"}),
    "dion_fp8_lr32": (
        "dion_hook fp8 lowrank 32 + Dion fp8 factors",
        "dion",
        {"fmt": "fp8_e4m3", "lowrank": 32},
    ),
    "dion_fp8_lr8": (
        "dion_hook fp8 lowrank 8 + Dion fp8 factors",
        "dion",
        {"fmt": "fp8_e4m3", "lowrank": 8},
    ),
}


@dataclass(frozen=True)
class ParamShape:
    """One trainable parameter as the accounting sees it.

    Attributes:
        name: parameter name.
        shape: its shape.
        dion: owned by Dion (``dion_lp.param_groups`` puts it in the "dion" group).
    """

    name: str
    shape: tuple[int, ...]
    dion: bool

    @property
    def numel(self) -> int:
        """Elements of the parameter."""
        return math.prod(self.shape)


# ----------------------------------------------------------------------------- accounting
def model_params(model: nn.Module) -> list[ParamShape]:
    """Every trainable parameter of ``model`` (shared ones once), in ``parameters()`` order."""
    dion = {
        id(p) for g in dion_lp.param_groups(model) if g["algorithm"] == "dion" for p in g["params"]
    }
    return [
        ParamShape(n, tuple(p.shape), id(p) in dion)
        for n, p in model.named_parameters()
        if p.requires_grad
    ]


def gpt2_params(cfg: GPTConfig = GPT2_SMALL) -> list[ParamShape]:
    """The GPT-2-small-shaped model's parameters (built on the meta device)."""
    with torch.device("meta"):
        return model_params(GPT(cfg))


def steady_buckets(params: Sequence[ParamShape]) -> list[list[int]]:
    """DDP's buckets after its rebuild: indices into ``params``, in reverse parameter order."""
    with torch.device("meta"):
        tensors = [torch.empty(p.shape) for p in reversed(params)]
    indices, _ = dist._compute_bucket_assignment_by_size(
        tensors, [FIRST_BUCKET_BYTES, BUCKET_BYTES], [False] * len(tensors)
    )
    last = len(params) - 1
    return [[last - i for i in bucket] for bucket in indices]


def _allreduce(numel: int, N: int) -> int:
    return collective_bytes("all_reduce", 4 * numel, N)


def allreduce_bytes(params: Sequence[ParamShape], buckets: list[list[int]], N: int) -> int:
    """Default DDP: an fp32 all-reduce of each bucket."""
    return sum(_allreduce(sum(params[i].numel for i in b), N) for b in buckets)


def powersgd_bytes(
    params: Sequence[ParamShape], buckets: list[list[int]], N: int, rank: int, min_rate: float = 2
) -> int:
    """torch's ``powerSGD_hook`` once compressing: three fp32 all-reduces per bucket.

    Every gradient is viewed as ``(shape[0], -1)``, an n x m matrix; with
    ``r = min(n, m, rank)`` it is compressed when ``(n + m) r * min_rate < n m``
    (torch's ``_should_compress``), else all-reduced as it is.
    """
    total = 0
    for bucket in buckets:
        plain = ps = qs = 0
        for i in bucket:
            shape = params[i].shape
            n, m = shape[0], math.prod(shape[1:])
            r = min(n, m, rank)
            if (n + m) * r * min_rate < n * m:
                ps, qs = ps + n * r, qs + m * r
            else:
                plain += n * m
        total += _allreduce(plain, N) + _allreduce(ps, N) + _allreduce(qs, N)
    return total


def compress_bytes(params: Sequence[ParamShape], N: int, fmt: str) -> int:
    """``compress_hook``: a uint8 non-finite flag per gradient, then one quantized mean."""
    flags = collective_bytes("all_reduce", len(params), N)
    return flags + mean_bytes(sum(p.numel for p in params), fmt, N)


def dion_bytes(
    params: Sequence[ParamShape],
    N: int,
    hook_fmt: str,
    rank_fraction: float,
    factor_fmt: str,
    lowrank: int = 0,
) -> dict[str, int]:
    """``dion_hook`` + replicated Dion, split into the hook's and Dion's own bytes.

    With ``lowrank`` r > 0 the hook sends each non-Dion matrix that
    ``dion_lp.ddp.lowrank.compressed_shape`` accepts as its P (n r) and Q (m r) means.

    Returns:
        ``{"hook": mean of the non-Dion gradients sent whole, "hook_lowrank": means
        of their P and Q factors, "hook_flags": the hook's non-finite agreement (a
        uint8 per non-Dion gradient), "flags": Dion's, "factors":
        means of Dion's P and R (or of B where (m+n) r >= m n)}``.
    """
    full = tall = thin = 0
    for p in params:
        if not p.dion:
            continue
        m, n = p.shape
        r = dion_rank(m, n, rank_fraction, 1)
        if (m + n) * r < m * n:
            tall, thin = tall + max(m, n) * r, thin + min(m, n) * r
        else:
            full += m * n
    factors = sum(mean_bytes(k, factor_fmt, N) for k in (full, tall, thin))
    whole = ps = qs = 0
    for p in params:
        if p.dion:
            continue
        shape = compressed_shape(p.shape, lowrank)
        if shape is None:
            whole += p.numel
        else:
            ps, qs = ps + shape[0] * shape[2], qs + shape[1] * shape[2]
    return {
        "hook": mean_bytes(whole, hook_fmt, N),
        "hook_lowrank": mean_bytes(ps, hook_fmt, N) + mean_bytes(qs, hook_fmt, N),
        "hook_flags": collective_bytes("all_reduce", sum(not p.dion for p in params), N),
        "flags": collective_bytes("all_reduce", 2 * len(params), N),  # uint8 (2, params)
        "factors": factors,
    }


def account(
    method: str,
    params: Sequence[ParamShape],
    N: int,
    rank_fraction: float,
    buckets: list[list[int]] | None = None,
) -> int:
    """Wire bytes one rank sends per (steady-state) step with ``method`` (a key of METHODS)."""
    _, kind, opts = METHODS[method]
    buckets = buckets if buckets is not None else steady_buckets(params)
    if kind == "allreduce":
        return allreduce_bytes(params, buckets, N)
    if kind == "compress":
        return compress_bytes(params, N, opts["fmt"])
    if kind == "powersgd":
        return powersgd_bytes(params, buckets, N, opts["rank"])
    lowrank = opts.get("lowrank", 0)
    return sum(dion_bytes(params, N, opts["fmt"], rank_fraction, FACTOR_FMT, lowrank).values())


def accounting_report(N: int, rank_fraction: float) -> dict[str, Any]:
    """Per-method bytes for GPT-2 small on N ranks, ratios to default DDP, and a breakdown."""
    params = gpt2_params()
    buckets = steady_buckets(params)
    rows = {m: account(m, params, N, rank_fraction, buckets) for m in METHODS}
    base = rows["ddp_fp32"]
    dion_numel = sum(p.numel for p in params if p.dion)
    parts = dion_bytes(params, N, "fp8_e4m3", rank_fraction, FACTOR_FMT)
    return {
        "world_size": N,
        "rank_fraction": rank_fraction,
        "n_params": sum(p.numel for p in params),
        "dion_params": dion_numel,
        "buckets": len(buckets),
        "bytes": rows,
        "ratio": {m: base / b for m, b in rows.items()},
        "breakdown": {
            "dion_matrices_fp32_allreduce": _allreduce(dion_numel, N),
            "dion_matrices_fp8_factors": parts["factors"],
            "non_dion_fp8_hook": parts["hook"],
            "dion_flags": parts["flags"],
        },
    }


# ----------------------------------------------------------------------------- measured run
@dataclass
class _Counter:
    """Bytes of every torch.distributed collective while ``active`` (bus-bandwidth convention)."""

    world_size: int
    active: bool = False
    bytes: int = 0


def _install_counter(counter: _Counter) -> None:
    """Wrap the collectives every method here uses (kind, index of the sized buffer)."""
    kinds = {
        "all_reduce": ("all_reduce", 0),
        "all_to_all_single": ("all_to_all", 1),
        "all_gather_single": ("all_gather", 0),
        "all_gather_into_tensor": ("all_gather", 0),
    }
    for name, (kind, index) in kinds.items():
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapper(*args: Any, _fn: Callable = fn, _kind: str = kind, _i: int = index, **kw: Any):
            if counter.active:
                t = args[_i]
                counter.bytes += collective_bytes(
                    _kind, t.numel() * t.element_size(), counter.world_size
                )
            return _fn(*args, **kw)

        setattr(dist, name, wrapper)


def _build(
    method: str, model: nn.Module, rank_fraction: float, buckets: list[list[int]]
) -> tuple[Any, Any]:
    """(optimizer, DDP model with the method's hook) for one method.

    The per-bucket methods' hooks are wrapped to record, into ``buckets``, the
    parameter indices of each bucket of the current step.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

    _, kind, opts = METHODS[method]
    # small buckets: several per step, so the per-bucket accounting is exercised
    ddp = DDP(model, bucket_cap_mb=0.25)
    if kind == "dion":
        groups = dion_lp.param_groups(model, scalar_algorithm="lion", scalar_lr=SCALAR_LR["lion"])
        opt = dion_lp.Dion(groups, **DION, rank_fraction=rank_fraction, comm_dtype=FACTOR_FMT)
        dion_lp.register_ddp(ddp, opt, comm_dtype=opts["fmt"], lowrank_rank=opts.get("lowrank", 0))
        return opt, ddp
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    if kind == "compress":  # one mean per step, whatever the buckets
        dion_lp.register_ddp(ddp, opt, comm_dtype=opts["fmt"])
        return opt, ddp
    index = {id(p): i for i, p in enumerate(model.parameters())}
    if kind == "allreduce":
        state, hook = None, default_hooks.allreduce_hook
    else:
        state = powerSGD_hook.PowerSGDState(
            None, matrix_approximation_rank=opts["rank"], start_powerSGD_iter=2
        )
        hook = powerSGD_hook.powerSGD_hook

    def spy(state, bucket):  # no annotations: DDP only checks those it finds
        if bucket.index() == 0:
            buckets.clear()
        buckets.append([index[id(p)] for p in bucket.parameters()])
        fut = hook(state, bucket)
        # PowerSGD issues its P and Q all-reduces from future callbacks; on gloo these
        # race the next bucket's hook for the process group (ranks can disagree on the
        # order), so the measured run finishes each bucket first (same bytes).
        fut.wait()
        return fut

    ddp.register_comm_hook(state, spy)
    return opt, ddp


def _rank_main(rank: int, world_size: int, tmp: str, args: dict[str, Any]) -> None:
    """One rank of the measured run: every method in turn on the same data."""
    from ._train import evaluate
    from .data import load_corpus

    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        corpus = load_corpus(500_000, 100_000)
        windows = corpus.eval_windows("val", 64, SMALL.seq_len, rank, world_size)
        counter = _Counter(world_size)
        _install_counter(counter)
        results = {}
        for method in args["methods"]:
            torch.manual_seed(0)
            model = GPT(SMALL)
            params = model_params(model)
            buckets: list[list[int]] = []
            opt, ddp = _build(method, model, args["rank_fraction"], buckets)
            for step in range(args["steps"]):
                x, y = corpus.get_batch("train", step, 8, SMALL.seq_len, rank, world_size)
                counter.active, counter.bytes = True, 0
                ddp(x, y)[1].backward()
                opt.step()
                counter.active = False
                opt.zero_grad(set_to_none=True)
            expected = account(method, params, world_size, args["rank_fraction"], buckets or None)
            loss = evaluate(model, windows, dist.group.WORLD)
            results[method] = {"measured": counter.bytes, "accounted": expected, "loss": loss}
        if rank == 0:
            torch.save(results, os.path.join(tmp, "results.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()


def measure(methods: list[str], steps: int, rank_fraction: float) -> dict[str, Any]:
    """Train the small GPT with each method on 2 gloo ranks; last-step bytes and val loss.

    Returns:
        method -> ``{"measured": bytes, "accounted": bytes, "loss": nats/byte}``.
    """
    import torch.multiprocessing as mp

    args = {"methods": methods, "steps": steps, "rank_fraction": rank_fraction}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _rank_main, args=(2, tmp, args), nprocs=2, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + 300
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError("measured ranks did not finish in 300 s")
        return torch.load(os.path.join(tmp, "results.pt"), weights_only=True)


# ----------------------------------------------------------------------------- report
def _mb(n: float) -> str:
    return f"{n / 1e6:10.3f} MB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the accounting for GPT-2 small and the measured check; returns both."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=8, help="N for the GPT-2 accounting")
    parser.add_argument("--rank-fraction", type=float, default=1 / 16, help="Dion's rank fraction")
    parser.add_argument("--steps", type=int, default=20, help="steps of the measured run")
    parser.add_argument("--no-measure", action="store_true", help="accounting only")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated methods of the measured run"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.world_size < 2:
        parser.error(f"Invalid --world-size: {args.world_size}; expected >= 2")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"Invalid --methods: {unknown}; expected some of {', '.join(METHODS)}")
    if args.steps < 3:
        parser.error(f"Invalid --steps: {args.steps}; expected >= 3 (PowerSGD starts at step 2)")

    report = accounting_report(args.world_size, args.rank_fraction)
    print(
        f"GPT-2 small ({report['n_params']:,} params, {report['dion_params']:,} in Dion "
        f"matrices), {args.world_size} ranks, {report['buckets']} DDP buckets, "
        f"Dion rank_fraction {args.rank_fraction:g}; wire bytes per step per rank:"
    )
    for method, (label, _, _) in METHODS.items():
        b, ratio = report["bytes"][method], report["ratio"][method]
        print(f"  {label:45s} {_mb(b)}   {ratio:6.1f}x below default DDP")
    parts = report["breakdown"]
    print(
        f"  of which, for dion_hook fp8: Dion's matrices {_mb(parts['dion_matrices_fp8_factors'])}"
        f" (fp32 all-reduce: {_mb(parts['dion_matrices_fp32_allreduce'])}, "
        f"{parts['dion_matrices_fp32_allreduce'] / parts['dion_matrices_fp8_factors']:.1f}x), "
        f"the other params {_mb(parts['non_dion_fp8_hook'])}, flags {parts['dion_flags']} B"
    )
    for method in ("dion_fp8", "dion_fp8_lr32"):
        ratio = report["ratio"][method]
        verdict = "met" if ratio >= 30 else "NOT met"
        print(f"  target >= 30x below default DDP, {METHODS[method][0]}: {verdict} ({ratio:.1f}x)")
    print(
        "  (without lowrank the tied 50257 x 768 embedding travels whole, >= 1 byte per "
        "element, which alone caps the ratio near 12x)"
    )
    result: dict[str, Any] = {"accounting": report}
    if not args.no_measure:
        print(f"\nMeasured: small GPT {SMALL.to_dict()}, 2 gloo ranks, {args.steps} steps:")
        measured = measure(methods, args.steps, args.rank_fraction)
        ok = True
        for method in methods:
            label, m = METHODS[method][0], measured[method]
            match = m["measured"] == m["accounted"]
            ok &= match
            print(
                f"  {label:45s} measured {m['measured']:>9,} B  accounted {m['accounted']:>9,} B"
                f"  {'==' if match else '!='}   val loss {m['loss']:.4f}"
            )
        print(f"  accounting {'matches' if ok else 'DOES NOT match'} the measured bytes")
        result["measured"] = measured
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
