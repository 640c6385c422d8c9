"""Optimizer state bytes per parameter, measured after one step on instantiated models.

Two measurements, each on real fp32 parameters with random gradients, one
optimizer at a time, after exactly one ``step()``:

(a) one 768 x 3072 matrix (a GPT-2-small MLP weight);
(b) a whole GPT-2-small-shaped :class:`benchmarks.model.GPT` (124.4M parameters,
    tied head, built on the CPU).

State bytes: ``opt.state_bytes()`` for dion_lp.Dion (codes, scales, Q,
residuals); for the others every tensor in ``opt.state``, tensor subclasses
(torchao's 8-bit / fp8 states) flattened into their inner tensors, each storage
counted once (``benchmarks._rows.state_bytes``). Per parameter = bytes / parameters.

Each measured figure is set beside its closed form computed from the shapes
(:func:`dion_state_bytes`, :func:`baseline_state_bytes`): Dion's from the
library's own rules (tensors under ``dion_lp.quant.buffer.MIN_QUANT_NUMEL`` stay fp32,
codes (int4: two a byte) plus one fp32 scale per 256, Q of ``min(m, n) x r`` in fp32 with
fp32 momentum, fp8 with a 4-bit one, else bf16, residual bf16, AdamW's second moment in the unsigned
dynamic codebook). The closed forms then give the 7B figure without building it.

Baselines: torch AdamW; torchao AdamW8bit and AdamWFp8 (their step wraps the
update in ``torch.compile``, ~30 s per shape here: run eagerly with
``torch.compile`` replaced by the identity, same state; ``--compile`` for the
real thing); bitsandbytes AdamW8bit (CPU); torch Muon on the hidden matrices
(run with ``ns_steps=0``: its state, one fp32 momentum per matrix, does not
depend on it, and bf16 Newton-Schulz costs ~45 s per 768 x 3072 step here) +
AdamW on the rest.

    python -m benchmarks.memory             # (a) full grid, (b) main rows, closed forms to 7B
    python -m benchmarks.memory --full      # (b) nine Dion rows and torchao AdamW8bit too
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

import dion_lp
from dion_lp.algorithms.elementwise import ELEMENTWISE_STATE as SCALAR_STATE
from dion_lp.algorithms.elementwise import state_format as scalar_format
from dion_lp.options import dion_rank
from dion_lp.quant.buffer import buffer_nbytes

from ._baselines import OptimizerList, _adamw_groups, _split_named
from ._state_bytes import state_bytes
from ._tables import Column, environment, format_table, write_results
from .model import GPT, GPTConfig
from .shapes import GPT2_SMALL, ParamSpec, from_model, shapes

__all__ = [
    "BASELINES",
    "DionConfig",
    "baseline_state_bytes",
    "dion_grid",
    "dion_state_bytes",
    "main",
    "measure_model",
]

BLOCK_SIZE = 256  # dion_lp's default state block size
MATRIX_SHAPE = (768, 3072)
RANK_FRACTIONS = (1.0, 1 / 4, 1 / 16)
MOMENTUM_DTYPES = ("fp32", "bf16", "int8", "fp8_e4m3", "int4", "fp4_e2m1")
TARGET_MATRIX = 1.15  # issue 3: int8 momentum, rank 1/16, one matrix
TARGET_MODEL = 1.2  # issue 3: Dion int8 + Lion int8, whole GPT-2-small


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class DionConfig:
    """One Dion state configuration: formats of every group, rank, residual, scalar rule."""

    momentum_dtype: str
    rank_fraction: float
    residual: bool = False
    scalar: str = "lion"

    @property
    def label(self) -> str:
        """E.g. ``"dion int8 r1/16 +res (lion)"``."""
        rank = "1" if self.rank_fraction == 1 else f"1/{round(1 / self.rank_fraction)}"
        res = " +res" if self.residual else ""
        return f"dion {self.momentum_dtype} r{rank}{res} ({self.scalar})"

    def build(self, model: nn.Module) -> dion_lp.Dion:
        """The optimizer over ``model`` (every group in ``momentum_dtype``)."""
        groups = dion_lp.param_groups(model, scalar_algorithm=self.scalar)
        return dion_lp.Dion(
            groups,
            lr=1e-3,
            rank_fraction=self.rank_fraction,
            momentum_dtype=self.momentum_dtype,
            momentum_residual=self.residual,
            block_size=BLOCK_SIZE,
        )


def dion_grid(scalars: Sequence[str] = ("lion", "adamw")) -> list[DionConfig]:
    """Every format x rank fraction x residual (not with fp32: nothing to keep) x scalar rule."""
    return [
        DionConfig(fmt, rf, res, scalar)
        for scalar in scalars
        for fmt in MOMENTUM_DTYPES
        for rf in RANK_FRACTIONS
        for res in ((False,) if fmt == "fp32" else (False, True))
    ]


# Whole-model Dion rows: the default run measures the reference and the target;
# --full adds the others (each costs 20-100 s on this CPU); every configuration
# of the grid is in the closed-form table, whose forms these rows check.
MODEL_ROWS = (
    DionConfig("fp32", 1 / 16, scalar="adamw"),
    DionConfig("int8", 1 / 16),
)
FULL_MODEL_ROWS = (
    *MODEL_ROWS,
    DionConfig("fp32", 1 / 16),
    DionConfig("bf16", 1 / 16),
    DionConfig("int8", 1),
    DionConfig("int8", 1 / 4),
    DionConfig("int8", 1 / 16, residual=True),
    DionConfig("int8", 1 / 16, scalar="adamw"),
    DionConfig("fp8_e4m3", 1 / 16),
)
# Eager torchao AdamW8bit takes ~200 s for one GPT-2-small step here: --full only.
FULL_ONLY_MODEL_BASELINES = ("adamw8bit (torchao)",)


# ----------------------------------------------------------------------------- closed forms
def _buffer_bytes(shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of a dion_lp state buffer of a tensor of ``shape`` asked for in ``fmt``."""
    return buffer_nbytes(tuple(shape), fmt, BLOCK_SIZE)


def dion_state_bytes(specs: Sequence[ParamSpec], cfg: DionConfig) -> int:
    """Closed form of ``Dion.state_bytes()`` after one step over ``specs``.

    Dion matrices: momentum (:func:`_buffer_bytes`), Q of ``min(m, n) x r``
    (4 bytes with fp32 momentum, 1 (fp8) with a 4-bit one, else 2), bf16 residual
    if asked (not with fp32).
    Other tensors: the element-wise rule's buffers
    (``dion_lp.algorithms.elementwise.ELEMENTWISE_STATE``) in
    ``scalar_format(momentum_dtype)``.
    """
    total = 0
    for s in specs:
        if s.kind == "dion-matrix":
            m, n = s.shape
            r = dion_rank(m, n, cfg.rank_fraction, 1)
            low = cfg.momentum_dtype != "fp32"
            total += _buffer_bytes(s.shape, cfg.momentum_dtype)
            q_bytes = 4 if not low else 1 if cfg.momentum_dtype in ("int4", "fp4_e2m1") else 2
            total += min(m, n) * r * q_bytes
            total += 2 * s.numel if cfg.residual and low else 0
        else:
            for unsigned in SCALAR_STATE[cfg.scalar].values():
                total += _buffer_bytes(
                    s.shape, scalar_format(cfg.momentum_dtype, unsigned=unsigned)
                )
    return total


def _blockwise_8bit(numel: int, code_bytes: int = 1) -> int:
    """One 8-bit buffer: codes plus an fp32 absmax per 256."""
    return code_bytes * numel + 4 * math.ceil(numel / 256)


def _adamw(s: ParamSpec) -> int:
    return 8 * s.numel + 4  # exp_avg, exp_avg_sq and a float32 step tensor


def _bnb(s: ParamSpec) -> int:
    # bitsandbytes: 8-bit from 4096 elements on (min_8bit_size), else fp32 state; int step
    return 2 * _blockwise_8bit(s.numel) if s.numel >= 4096 else 8 * s.numel


def _torchao_form(s: ParamSpec, qmap: int) -> int:
    # torchao: quantized when >= 4096 elements and a multiple of the block; float32 step
    if s.numel >= 4096 and s.numel % 256 == 0:
        return 2 * (_blockwise_8bit(s.numel) + qmap) + 4
    return _adamw(s)


BASELINE_FORMS: dict[str, Callable[[Sequence[ParamSpec]], int]] = {
    "adamw (torch)": lambda specs: sum(_adamw(s) for s in specs),
    # two 256-entry fp32 maps shared by every parameter
    "adamw8bit (bitsandbytes)": lambda specs: sum(_bnb(s) for s in specs) + 2 * 1024,
    # a 256-entry fp32 map per quantized buffer
    "adamw8bit (torchao)": lambda specs: sum(_torchao_form(s, 1024) for s in specs),
    "adamwfp8 (torchao)": lambda specs: sum(_torchao_form(s, 0) for s in specs),
    "muon + adamw (torch)": lambda specs: sum(
        4 * s.numel if s.kind == "dion-matrix" else _adamw(s) for s in specs
    ),
}


def baseline_state_bytes(specs: Sequence[ParamSpec], name: str) -> int:
    """Closed form of a baseline's state bytes after one step (see the comments in the code)."""
    return BASELINE_FORMS[name](specs)


# ----------------------------------------------------------------------------- baselines
@contextlib.contextmanager
def _eager_torchao(compile_: bool) -> Iterator[None]:
    """Run torchao's step eagerly (``torch.compile`` -> identity) unless ``compile_``."""
    if compile_:
        yield
        return
    with mock.patch.object(torch, "compile", lambda fn=None, **kw: fn):
        yield


def _torchao(name: str) -> Callable[[nn.Module], Any]:
    def build(model: nn.Module) -> Any:
        cls = getattr(importlib.import_module("torchao.optim"), name)
        return cls(_adamw_groups(list(_split_named(model))), lr=1e-3)

    return build


def _bnb_adamw8bit(model: nn.Module) -> Any:
    bnb_optim = importlib.import_module("bitsandbytes.optim")
    return bnb_optim.AdamW8bit(_adamw_groups(list(_split_named(model))), lr=1e-3)


def _muon_adamw(model: nn.Module) -> Any:
    hidden, embeds, vectors = _split_named(model)
    opts = [torch.optim.Muon(hidden, lr=0.02, ns_steps=0)]
    if embeds or vectors:
        opts.append(torch.optim.AdamW(_adamw_groups([embeds, vectors]), lr=1e-3))
    return OptimizerList(*opts)


BASELINES: dict[str, Callable[[nn.Module], Any]] = {
    "adamw (torch)": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
    "adamw8bit (torchao)": _torchao("AdamW8bit"),
    "adamwfp8 (torchao)": _torchao("AdamWFp8"),
    "adamw8bit (bitsandbytes)": _bnb_adamw8bit,
    "muon + adamw (torch)": _muon_adamw,
}


# ----------------------------------------------------------------------------- measurement
class _OneMatrix(nn.Module):
    """A single hidden weight (Dion's, and Muon's)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape) * 0.02)


def _random_grads(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3)


def measure_model(
    model: nn.Module,
    configs: Sequence[str | DionConfig],
    *,
    compile_torchao: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Step each optimizer once on ``model`` (grads already set) and count its state.

    Args:
        model: the model; its parameters change (one step per optimizer).
        configs: baseline names (keys of :data:`BASELINES`) or :class:`DionConfig`.
        compile_torchao: run torchao's compiled step (slow to compile).
        progress: show a tqdm bar.

    Returns:
        One row per config: measured bytes, bytes/param, the closed form, whether
        they are equal, step seconds, or ``status`` with the reason a baseline
        could not run.
    """
    specs = from_model(model)
    params = sum(s.numel for s in specs)
    rows = []
    bar = configs
    if progress:
        from tqdm import tqdm

        bar = tqdm(configs, desc="memory", unit="opt", leave=False)
    for cfg in bar:
        name = cfg.label if isinstance(cfg, DionConfig) else cfg
        row: dict[str, Any] = {"optimizer": name, "params": params}
        try:
            opt = cfg.build(model) if isinstance(cfg, DionConfig) else BASELINES[cfg](model)
            start = time.perf_counter()
            with _eager_torchao(compile_torchao):
                opt.step()
            row["step_s"] = time.perf_counter() - start
        except Exception as exc:  # a baseline library failing on CPU is reported, not fatal
            rows.append({**row, "status": f"skipped: {type(exc).__name__}: {exc}"[:200]})
            continue
        measured = state_bytes(opt)
        closed = (
            dion_state_bytes(specs, cfg)
            if isinstance(cfg, DionConfig)
            else baseline_state_bytes(specs, cfg)
        )
        row.update(
            status="ok",
            state_bytes=measured,
            bytes_per_param=measured / params,
            closed_form=closed,
            closed_form_equal=measured == closed,
        )
        rows.append(row)
        del opt
    return rows


def analytic_rows(model: str, configs: Sequence[str | DionConfig]) -> list[dict[str, Any]]:
    """Closed-form state bytes of ``configs`` on the shape table ``model``."""
    specs = shapes(model)
    params = sum(s.numel for s in specs)
    rows = []
    for cfg in configs:
        if isinstance(cfg, DionConfig):
            name, nbytes = cfg.label, dion_state_bytes(specs, cfg)
        else:
            name, nbytes = cfg, baseline_state_bytes(specs, cfg)
        rows.append(
            {
                "model": model,
                "optimizer": name,
                "state_bytes": nbytes,
                "bytes_per_param": nbytes / params,
            }
        )
    return rows


# ----------------------------------------------------------------------------- report
MEASURED_COLUMNS = [
    Column("optimizer", "optimizer"),
    Column("state_bytes", "state", "bytes"),
    Column("bytes_per_param", "B/param", ".4f"),
    Column("closed_form_equal", "= closed form"),
    Column("step_s", "step s", ".2f"),
    Column("status", "status"),
]


def _targets(matrix: list[dict[str, Any]], whole: list[dict[str, Any]]) -> list[str]:
    def find(rows: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["optimizer"] == label and r["status"] == "ok"), None)

    lines = []
    for rows, label, target, what in (
        (matrix, DionConfig("int8", 1 / 16).label, TARGET_MATRIX, "768x3072 matrix"),
        (
            whole,
            DionConfig("int8", 1 / 16).label,
            TARGET_MODEL,
            "GPT-2-small, Dion int8 + Lion int8",
        ),
    ):
        r = find(rows, label)
        if r is None:
            lines.append(f"{what}: not measured")
            continue
        verdict = "MET" if r["bytes_per_param"] <= target else "MISSED"
        lines.append(
            f"{what}, rank 1/16: {r['bytes_per_param']:.4f} B/param (<= {target}) {verdict}"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="small matrix and a tiny model, no torchao")
    p.add_argument(
        "--full", action="store_true", help="(b): more Dion rows and torchao AdamW8bit (~10 min)"
    )
    p.add_argument("--skip", default="", help="comma list of baselines to leave out")
    p.add_argument("--compile", action="store_true", help="torchao's compiled step (slow)")
    p.add_argument("--analytic-models", default="gpt2-small,llama-7b")
    p.add_argument("--out", type=Path, default=Path("results/memory"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Measure (a) and (b), print them with the closed forms and targets; write CSV + JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if args.quick:
        skip |= {"adamw8bit (torchao)", "adamwfp8 (torchao)"}
    baselines = [b for b in BASELINES if b not in skip]
    matrix_configs = [*baselines, *dion_grid(("lion",))]
    model_baselines = [
        b for b in baselines if args.full or args.quick or b not in FULL_ONLY_MODEL_BASELINES
    ]
    model_configs = [*model_baselines, *(FULL_MODEL_ROWS if args.full else MODEL_ROWS)]
    shape = (64, 256) if args.quick else MATRIX_SHAPE
    cfg = GPTConfig(vocab_size=512, seq_len=64, d_model=64, n_layer=2, n_head=4, tied=True)
    cfg = cfg if args.quick else GPT2_SMALL
    progress = not args.no_progress

    torch.manual_seed(0)
    matrix_model = _OneMatrix(shape)
    _random_grads(matrix_model)
    matrix = measure_model(
        matrix_model, matrix_configs, compile_torchao=args.compile, progress=progress
    )
    print(f"(a) one {shape[0]}x{shape[1]} matrix, state after one step")
    print(format_table(matrix, MEASURED_COLUMNS))

    model = GPT(cfg)
    _random_grads(model)
    whole = measure_model(model, model_configs, compile_torchao=args.compile, progress=progress)
    del model
    print(f"\n(b) whole model {cfg} ({whole[0]['params']:,} params), state after one step")
    print(format_table(whole, MEASURED_COLUMNS))
    left_out = [b for b in baselines if b not in model_baselines]
    if left_out:
        print(f"({', '.join(left_out)}: --full only, eager step ~200 s here; closed form in (c))")

    analytic = []
    for name in args.analytic_models.split(","):
        analytic += analytic_rows(name, [*BASELINE_FORMS, *dion_grid()])
    wide = _pivot(analytic)
    print("\n(c) closed form, bytes per parameter (the forms (a) and (b) check)")
    print(
        format_table(
            wide,
            [
                Column("optimizer", "optimizer"),
                *(Column(m, m, ".4f") for m in args.analytic_models.split(",")),
            ],
        )
    )

    targets = _targets(matrix, whole)
    print("\n" + "\n".join(targets))
    for rows, name in ((matrix, "matrix"), (whole, "model")):
        for r in rows:
            r["measurement"] = name
    meta = {
        "command": " ".join(["python -m benchmarks.memory", *argv]),
        "environment": environment(),
        "matrix_shape": list(shape),
        "model": vars(cfg),
        "targets": targets,
        "analytic": analytic,
        "notes": __doc__,
    }
    write_results(args.out, "memory", [*matrix, *whole], meta)
    write_results(args.out, "analytic", wide, {"models": args.analytic_models})
    print(f"\nwrote {args.out}/memory.{{csv,json}} and analytic.{{csv,json}}")
    mismatch = [r for r in matrix + whole if r["status"] == "ok" and not r["closed_form_equal"]]
    return 1 if mismatch else 0


def _pivot(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer, one column of bytes/param per model."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["optimizer"], {"optimizer": r["optimizer"]})[r["model"]] = r[
            "bytes_per_param"
        ]
    return list(out.values())


if __name__ == "__main__":
    sys.exit(main())
