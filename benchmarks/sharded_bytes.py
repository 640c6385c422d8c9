"""Bytes per optimizer step under FSDP2: sharded Dion vs all-gathering each matrix (Muon-style).

Under FSDP2 every weight matrix is split over N ranks. An orthogonalizing
optimizer like Muon needs the whole momentum matrix of each weight, so sharded
Muon must all-gather every matrix each step: ``(N-1)/N * m n * bytes`` per
matrix per rank. Sharded Dion (:mod:`dion_lp.sharded`) never rebuilds a matrix:
per matrix it moves r x r Gram matrices and one factor of its long side (``L r``,
reduce-scattered and all-gathered) when the short dim is sharded, or of its
short side (``S r``, summed) when the long dim is sharded, plus r column norms.

Two parts:

1. Accounting, one rank's wire bytes per optimizer step in the nccl-tests
   bus-bandwidth convention of :mod:`dion_lp.comm`, for GPT-2 small (12 layers,
   d 768, 4x MLP), Llama-2 7B (d 4096, 32 layers, ffn 11008) and Llama-2 70B
   (d 8192, 80 layers, ffn 28672, 8 kv heads of 128), every hidden matrix
   sharded ``Shard(0)`` (FSDP2's default). Dion's figure is
   :func:`dion_lp.dist.accounting.sharded_step_bytes` plus the optimizer's per-step agreement on
   non-finite gradients (2 bytes per parameter tensor, all-reduced). The
   element-wise params (embeddings, head, norms) need no optimizer traffic in
   either method; FSDP's own parameter all-gathers and gradient reduce-scatter
   are the same for both and shown for scale only (fp32: 3 (N-1)/N 4 P).
2. A measured run that checks the accounting: 2 gloo ranks train a small GPT
   under ``fully_shard`` with sharded Dion; torch.distributed's collectives are
   wrapped during ``opt.step()`` and their bytes compared with the accounting
   (and with ``comm_stats()``); the baseline's all-gathers of every momentum
   matrix are run and counted the same way.

    python -m benchmarks.sharded_bytes                  # both parts (~15 s)
    python -m benchmarks.sharded_bytes --no-measure     # accounting only
    python -m benchmarks.sharded_bytes --world-sizes 2,4,64 --rank-fraction 0.0625
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dion_lp.dist.accounting import collective_bytes
from dion_lp.dist.accounting import sharded_step_bytes as step_bytes

from ._spawn import exit_rank
from ._tables import Column, format_table
from .model import GPT, GPTConfig
from .shapes import shapes

MODELS = ("gpt2-small", "llama-7b", "llama-70b")
DION_FORMATS = ("fp32", "bf16", "fp8_e4m3")
BASELINE_FORMATS = {"fp32": 4, "bf16": 2}
SMALL = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layer=2, n_head=4)

__all__ = ["account", "baseline_bytes", "dion_bytes", "main", "measure"]


def baseline_bytes(matrices: list[tuple[int, int, int]], N: int, element_bytes: int) -> int:
    """Bytes one rank sends to all-gather every (m, n, shard_dim) matrix once."""
    return sum(collective_bytes("all_gather", m * n * element_bytes, N) for m, n, _ in matrices)


def dion_bytes(
    matrices: list[tuple[int, int, int]], n_tensors: int, N: int, fmt: str, rank_fraction: float
) -> dict[str, int]:
    """Sharded Dion's bytes per step: :func:`step_bytes` plus the non-finite-gradient agreement."""
    out = step_bytes(matrices, N, fmt, rank_fraction)
    out["flags"] = collective_bytes("all_reduce", 2 * n_tensors, N)
    out["total"] += out["flags"]
    return out


def account(model: str, N: int, rank_fraction: float) -> list[dict[str, Any]]:
    """Rows of the accounting for one model shape table and N ranks."""
    specs = shapes(model)
    matrices = [(*s.shape, 0) for s in specs if s.kind == "dion-matrix"]
    total_params = sum(s.numel for s in specs)
    fsdp = 3 * collective_bytes("all_gather", 4 * total_params, N)
    common = {"model": model, "ranks": N, "r/d": rank_fraction, "fsdp_fp32": fsdp}
    rows = []
    reference = baseline_bytes(matrices, N, 4)
    for fmt, size in BASELINE_FORMATS.items():
        nbytes = baseline_bytes(matrices, N, size)
        rows.append(
            {**common, "method": f"all-gather {fmt}", "bytes": nbytes, "x": nbytes / reference}
        )
    for fmt in DION_FORMATS:
        parts = dion_bytes(matrices, len(specs), N, fmt, rank_fraction)
        rows.append(
            {
                **common,
                "method": f"dion {fmt}",
                "bytes": parts["total"],
                "x": parts["total"] / reference,
                "gram": parts["gram"],
                "norms+flags": parts["norms"] + parts["flags"],
            }
        )
    return rows


# ----------------------------------------------------------------------------- measured run
def _counting(log: list[int], N: int) -> Callable[[], None]:
    """Wrap torch.distributed's collectives to append their bytes; returns the undo."""
    kinds = {
        "all_reduce": ("all_reduce", 0),
        "all_to_all_single": ("all_to_all", 1),
        "all_gather_single": ("all_gather", 0),
        "all_gather_into_tensor": ("all_gather", 0),
    }
    originals = {}
    for name, (kind, index) in kinds.items():
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        originals[name] = fn

        def wrapper(*args: Any, _fn: Callable = fn, _kind: str = kind, _i: int = index, **kw: Any):
            t = args[_i]
            log.append(collective_bytes(_kind, t.numel() * t.element_size(), N))
            return _fn(*args, **kw)

        setattr(dist, name, wrapper)

    def undo() -> None:
        for name, fn in originals.items():
            setattr(dist, name, fn)

    return undo


def _rank_main(rank: int, world_size: int, tmp: str, rank_fraction: float) -> None:
    """One rank of the measured run: sharded Dion in each format, then the baseline gathers."""
    from torch.distributed.fsdp import fully_shard

    import dion_lp
    from dion_lp.dist.dtensor import local
    from dion_lp.layouts.placement import placement

    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        results: dict[str, Any] = {}
        for fmt in DION_FORMATS:
            torch.manual_seed(0)
            model = GPT(SMALL)
            fully_shard(model)
            groups = dion_lp.param_groups(
                model, scalar_algorithm="lion", rank_fraction=rank_fraction
            )
            opt = dion_lp.Dion(groups, lr=0.01, comm_dtype=fmt)
            gen = torch.Generator().manual_seed(rank)
            log: list[int] = []
            for step in range(2):
                idx = torch.randint(0, SMALL.vocab_size, (4, SMALL.seq_len + 1), generator=gen)
                model(idx[:, :-1], idx[:, 1:])[1].backward()
                undo = _counting(log, world_size) if step == 1 else None
                opt.step()
                if undo:
                    undo()
                opt.zero_grad()
            dion = [p for g in opt.param_groups if g["algorithm"] == "dion" for p in g["params"]]
            matrices = [(*p.shape, placement(p).row_dim) for p in dion]
            n_tensors = sum(len(g["params"]) for g in opt.param_groups)
            results[f"dion {fmt}"] = {
                "measured": sum(log),
                "comm_stats": opt.comm_stats()["last_step"],
                "accounted": dion_bytes(matrices, n_tensors, world_size, fmt, rank_fraction)[
                    "total"
                ],
            }
        for fmt, size in BASELINE_FORMATS.items():  # what sharded Muon must send
            log = []
            undo = _counting(log, world_size)
            for p in dion:
                M = local(opt.state[p]["momentum_codes"]).to(
                    torch.float32 if size == 4 else torch.bfloat16
                )
                out = M.new_empty(world_size * M.shape[0], *M.shape[1:])
                dist.all_gather_into_tensor(out, M.contiguous())
            undo()
            results[f"all-gather {fmt}"] = {
                "measured": sum(log),
                "comm_stats": None,
                "accounted": baseline_bytes(matrices, world_size, size),
            }
        if rank == 0:
            with open(os.path.join(tmp, "results.json"), "w") as f:
                json.dump(results, f)
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_rank()


def measure(rank_fraction: float) -> dict[str, Any]:
    """Run the small GPT under FSDP2 on 2 gloo ranks; per method measured vs accounted bytes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_main, args=(2, tmp, rank_fraction), nprocs=2, join=True, start_method="spawn"
        )
        with open(os.path.join(tmp, "results.json")) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- report
COLUMNS = [
    Column("model", "model"),
    Column("ranks", "N"),
    Column("method", "method"),
    Column("bytes", "bytes/step/rank", "bytes"),
    Column("x", "vs all-gather fp32", ".4f"),
    Column("gram", "of which Gram", "bytes"),
    Column("fsdp_fp32", "FSDP2 itself (fp32)", "bytes"),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the accounting (and the measured check); returns both."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sharded_bytes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--world-sizes", default="2,4", help="comma list of N for the accounting")
    parser.add_argument("--rank-fraction", type=float, default=0.25, help="Dion's r / min(m, n)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of shape tables")
    parser.add_argument("--no-measure", action="store_true", help="accounting only")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.world_sizes.split(",")]
    if any(n < 2 for n in sizes):
        parser.error(f"Invalid --world-sizes: {args.world_sizes}; expected integers >= 2")
    if not 0 < args.rank_fraction <= 1:
        parser.error(f"Invalid --rank-fraction: {args.rank_fraction}; expected 0 < r/d <= 1")
    rows = [
        row
        for m in args.models.split(",")
        for N in sizes
        for row in account(m, N, args.rank_fraction)
    ]
    print(f"Optimizer bytes per step and rank, r = {args.rank_fraction} min(m, n), Shard(0):")
    print(format_table(rows, COLUMNS))
    report: dict[str, Any] = {"rank_fraction": args.rank_fraction, "accounting": rows}
    if not args.no_measure:
        measured = measure(args.rank_fraction)
        report["measured"] = measured
        print(f"\nMeasured on 2 gloo ranks, GPT {SMALL.d_model}d x {SMALL.n_layer} layers:")
        check = [
            {"method": k, **v, "ok": v["measured"] == v["accounted"]} for k, v in measured.items()
        ]
        print(
            format_table(
                check,
                [
                    Column("method", "method"),
                    Column("measured", "measured bytes"),
                    Column("comm_stats", "comm_stats()"),
                    Column("accounted", "accounted"),
                    Column("ok", "equal"),
                ],
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
