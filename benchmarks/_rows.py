"""The ablation's rows: one line each in :data:`ROWS`, name -> :class:`Row`.

A row builds its optimizer for a model; nothing else about training differs
between rows (same model init, data order, schedule and evaluation). Learning
rates are explicit here and are the peak of the shared schedule (linear warm-up,
then cosine decay to 10 %):

- AdamW-type rows: lr 2e-3, betas (0.9, 0.95), weight decay 0.1 (0 on vectors).
- Dion rows: lr 0.02 on hidden matrices, mu 0.95, weight decay 0.01; the
  element-wise groups (embeddings, head, biases, norms) use Lion at lr 3e-3
  (or AdamW at 6e-3 in ``dion_fp32_adamw``), betas (0.9, 0.95).
- Muon: lr 0.02 on hidden matrices (torch's default ``adjust_lr_fn``:
  lr * sqrt(max(1, rows / cols))), AdamW 2e-3 on the rest.

How they were picked: one sweep on the default model (d 128, 2 layers, seq 64,
global batch 32, 300 steps, seed 0, final validation loss in nats/byte):
AdamW 1e-3 2.29, 1.5e-3 2.18, **2e-3 2.14**, 3e-3 2.20, 4e-3 2.28, 6e-3 2.44;
Dion 0.01 / 0.02 / 0.03 / 0.05 with Lion 1e-3: 1.95 / 1.91 / 1.89 / 2.02;
Dion 0.02 with Lion 3e-4 / 1e-3 / 2e-3 / **3e-3** / 5e-3: 2.01 / 1.91 / 1.88 /
1.87 / 1.88; Dion 0.02 with AdamW scalars 3e-3 / **6e-3** / 1e-2: 1.89 / 1.86 /
1.87. Re-checked at the default 120 steps: AdamW 2e-3 / 3e-3 / 4e-3: 2.60 / 2.63 /
2.77; Dion 0.02 / 0.03 with Lion 3e-3: 2.28 / 2.27, 0.02 with Lion 1e-3: 2.33.
Dion2 (fraction 1/4) and dion_lp's Muon group, same 120 steps, seed 0: Dion2
lr 0.01 / 0.02 / **0.04** / 0.08: 2.55 / 2.50 / 2.42 / 2.48; Muon 0.01 / 0.02 /
**0.04**: 2.44 / 2.29 / 2.23 (Dion 0.02 in the same run: 2.29).
A byte-level model leans on its embedding and head, so the element-wise rule
wants a larger lr than usual for Lion. Re-tune when the model changes.

Dion rows are built in the first communication mode the library supports (see
:func:`dion_modes`: the DDP hook, Dion's own ``grad_sync``, or plain DDP with
Dion non-replicated); the mode is recorded with every result.

A feature the library does not have yet raises (``NotImplementedError``,
``TypeError``, ``ImportError``, ``AttributeError``) when the row is built; the
ablation then reports the row as "not available: <reason>" instead of faking it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ._baselines import (
    ADAMW,
    MUON_LR,
    OptimizerList,
    _adamw,
    _adamw8bit_bnb,
    _adamw8bit_torchao,
    _muon,
)
from ._state_bytes import state_bytes

__all__ = [
    "DEFAULT_ROWS",
    "DION_COMM_MODES",
    "ROWS",
    "BuildContext",
    "OptimizerList",
    "Row",
    "dion_hooks_available",
    "dion_modes",
    "state_bytes",
    "unavailable_reason",
]

DION = dict(lr=0.02, mu=0.95, weight_decay=0.01, betas=(0.9, 0.95))
SCALAR_LR = {"lion": 3e-3, "adamw": 6e-3}
# Dion2 / Muon groups of dion_lp.Dion (the rest as Dion rows: Lion at SCALAR_LR)
DION2 = dict(matrix_algorithm="dion2", rank_fraction=0.25, lr=0.04)
MUON_DIONLP = dict(matrix_algorithm="muon", lr=0.04)
NORDION2 = dict(DION2, matrix_algorithm="nordion2")  # lr not swept: Dion2's
HYPERPARAMETERS = {
    "adamw": ADAMW,
    "dion": DION,
    "dion_scalar_lr": SCALAR_LR,
    "muon_lr": MUON_LR,
    "dion2": DION2,
    "muon_dionlp": MUON_DIONLP,
    "nordion2": NORDION2,
}
UNAVAILABLE = (NotImplementedError, TypeError, ImportError, AttributeError)


DION_COMM_MODES = ("auto", "hook", "sync", "ddp")


@dataclass(frozen=True)
class BuildContext:
    """What a row factory may use besides the model.

    Attributes:
        process_group: the data-parallel group (None when not distributed).
        world_size: ranks in the group.
        seed: the run's seed (Dion's Q and rounding generators).
        dion_comm: how Dion rows communicate (see :func:`dion_modes`).
        local_group: a group holding only this rank, for Dion under DDP
            ("ddp" mode: Dion must not exchange anything itself).
    """

    process_group: Any = None
    world_size: int = 1
    seed: int = 0
    dion_comm: str = "auto"
    local_group: Any = None


@dataclass(frozen=True)
class Row:
    """One row of the ablation.

    Attributes:
        build: ``(model, ctx) -> optimizer`` (raises an UNAVAILABLE error if a
            feature is missing).
        kind: "baseline" (DDP all-reduce of gradients) or "dion" (see
            ``benchmarks._train.wrap_model``).
        comm_dtype: the factor-exchange format the row is about ("fp32" if none).
        full_only: kept out of the default grid (too slow for its budget); why in ``note``.
        note: shown in the report.
        hook_lowrank: in "hook" mode, the DDP hook's ``lowrank_rank`` (0: matrices
            Dion does not own travel whole).
        twin: the fp32 row of the same algorithm and rank, which this row's
            precision is compared to (the report's ``vs twin`` column); "" if none.
    """

    build: Callable[[nn.Module, BuildContext], Any]
    kind: str = "baseline"
    comm_dtype: str = "fp32"
    full_only: bool = False
    note: str = ""
    hook_lowrank: int = 0
    twin: str = ""


# ----------------------------------------------------------------------------- Dion
class NoDionModeError(NotImplementedError):
    """No communication mode of a Dion row could be built; the message says why for each."""


def dion_hooks_available() -> bool:
    """Does ``dion_lp.hooks`` offer a DDP hook for Dion (``register_ddp`` or ``dion_hook``)?"""
    try:
        hooks = importlib.import_module("dion_lp.hooks")
    except ImportError:
        return False
    return hasattr(hooks, "register_ddp") or (
        hasattr(hooks, "DionHookState") and hasattr(hooks, "dion_hook")
    )


def dion_modes(ctx: BuildContext) -> tuple[str, ...]:
    """Communication modes to try for a Dion row, best first.

    - "hook": DDP with the library's Dion hook; Dion built with the process
      group exchanges its factors, the hook averages the other gradients.
    - "sync": no DDP; Dion built with the process group and ``grad_sync=True``
      exchanges its factors and averages the element-wise gradients itself.
    - "ddp": DDP all-reduces every gradient in fp32 and Dion, built with a
      one-rank group, runs non-replicated on the averaged gradients.

    "auto" tries them in that order (the hook only when ``dion_lp.hooks`` has one).
    """
    if ctx.world_size == 1:
        return ("none",)
    if ctx.dion_comm != "auto":
        return (ctx.dion_comm,)
    return ("hook", "sync", "ddp") if dion_hooks_available() else ("sync", "ddp")


def _dion_kwargs(mode: str, comm: str, ctx: BuildContext) -> dict[str, Any]:
    if mode == "none":
        return {"process_group": None}
    if mode == "hook":
        if not dion_hooks_available():
            raise NotImplementedError("dion_lp.hooks has no DDP hook for Dion")
        return {"process_group": ctx.process_group, "grad_sync": False}
    if mode == "sync":
        return {"process_group": ctx.process_group, "grad_sync": True}
    if comm != "fp32":  # under plain DDP nothing goes through Dion's wire format
        raise NotImplementedError(f"comm_dtype={comm} needs replicated Dion ('hook' or 'sync')")
    return {"process_group": ctx.local_group}


def _dion(
    scalar: str = "lion",
    hook_only: bool = False,
    scalar_momentum_dtype: str | None = None,
    matrix_algorithm: str = "dion",
    **options: Any,
) -> Callable[[nn.Module, BuildContext], Any]:
    """A factory of ``dion_lp.Dion`` with ``options`` on top of :data:`DION`
    (``scalar_momentum_dtype``: the element-wise groups' state format, if not the Dion one;
    ``matrix_algorithm``: the hidden matrices' group, "dion", "dion2" or "muon").

    Tries the modes of :func:`dion_modes` in order (only "hook" when ``hook_only``:
    the row's compression lives in the DDP hook) and tags the optimizer with
    the one that was built (``opt.ablation_comm``), which
    ``benchmarks._train.wrap_model`` reads. If none can be built, raises
    ``NotImplementedError`` listing why each failed.
    """

    def build(model: nn.Module, ctx: BuildContext) -> Any:
        dion_lp = importlib.import_module("dion_lp")
        comm = options.get("comm_dtype", "fp32")
        reasons = []
        for mode in dion_modes(ctx):
            if hook_only and mode != "hook":
                reasons.append(f"[{mode}] this row's compression is done by the DDP hook")
                continue
            groups = dion_lp.param_groups(model, scalar_algorithm=scalar)
            for group in groups:
                if group.get("algorithm") != "dion":
                    group["lr"] = SCALAR_LR[scalar]
                    if scalar_momentum_dtype is not None:
                        group["momentum_dtype"] = scalar_momentum_dtype
                else:
                    group["algorithm"] = matrix_algorithm
            try:
                kwargs = {**DION, **options, **_dion_kwargs(mode, comm, ctx), "seed": ctx.seed}
                opt = dion_lp.Dion(groups, **kwargs)
            except UNAVAILABLE as exc:
                reasons.append(f"[{mode}] {unavailable_reason(exc)}")
                continue
            opt.ablation_comm = mode
            return opt
        raise NoDionModeError("; ".join(reasons))

    return build


def _row_dion(
    full_only: bool = False, note: str = "", hook_lowrank: int = 0, **options: Any
) -> Row:
    return Row(
        build=_dion(hook_only=hook_lowrank > 0, **options),
        kind="dion",
        comm_dtype=options.get("comm_dtype", "fp32"),
        full_only=full_only,
        note=note,
        hook_lowrank=hook_lowrank,
        twin=_twin(options),
    )


def _twin(options: dict[str, Any]) -> str:
    """The fp32 row of the same algorithm and rank as a Dion-family row with ``options``."""
    algorithm = options.get("matrix_algorithm", "dion")
    if algorithm != "dion":
        return f"{algorithm}_fp32"
    rank = options.get("rank_fraction", 1.0)
    return {0.25: "dion_rank1_4", 1 / 16: "dion_rank1_16"}.get(rank, "dion_fp32")


_FULL_RANK = "full rank: the replicas average B itself ((m + n) r >= m n), not factors"
_R4 = "rank 1/4: the factors P, R travel in this format"
_ROWS_NOTE = "Dion2, local momenta: only a sketch and the selected rows travel"

_MUON_NOTE = (
    "torch.optim.Muon runs Newton-Schulz in bf16, ~30x slower than fp32 matmuls on this CPU: "
    "~0.45 s/step, 4.5x Dion fp32 (~90 s per 200-step row); full grid only"
)
_AO_NOTE = "eager single_param_adam (torch.compile costs ~30 s per shape): step time not comparable"

ROWS: dict[str, Row] = {
    "adamw": Row(_adamw),
    "muon": Row(_muon, full_only=True, note=_MUON_NOTE),
    "adamw8bit_torchao": Row(_adamw8bit_torchao, full_only=True, note=_AO_NOTE),
    "adamw8bit_bnb": Row(_adamw8bit_bnb),
    "dion_fp32": _row_dion(),
    "dion_fp32_adamw": _row_dion(scalar="adamw", full_only=True, note="AdamW scalars at 6e-3"),
    "dion_bf16_comm": _row_dion(comm_dtype="bf16", full_only=True, note=_FULL_RANK),
    "dion_fp8e4m3_comm": _row_dion(comm_dtype="fp8_e4m3", full_only=True, note=_FULL_RANK),
    "dion_fp8e5m2_comm": _row_dion(comm_dtype="fp8_e5m2", full_only=True, note=_FULL_RANK),
    "dion_int8_mom": _row_dion(momentum_dtype="int8", full_only=True),
    "dion_fp8_mom": _row_dion(momentum_dtype="fp8_e4m3", full_only=True),
    "dion_int4_mom": _row_dion(
        momentum_dtype="int4", full_only=True, note="int4 momentum (two codes a byte), SR"
    ),
    "dion_int4_mom_b64": _row_dion(
        momentum_dtype="int4", block_size=64, full_only=True, note="int4, a scale per 64"
    ),
    "dion_int4_mom_nearest": _row_dion(
        momentum_dtype="int4", stochastic_rounding=False, full_only=True, note="int4, nearest"
    ),
    "dion_int4_mom_lion_int8": _row_dion(
        momentum_dtype="int4",
        scalar_momentum_dtype="int8",
        full_only=True,
        note="int4 Dion momentum, int8 Lion state (embeddings, head, vectors)",
    ),
    "dion_fp4_mom": _row_dion(
        momentum_dtype="fp4_e2m1", full_only=True, note="fp4 e2m1 momentum (two codes a byte), SR"
    ),
    "dion_fp4_mom_nearest": _row_dion(
        momentum_dtype="fp4_e2m1",
        stochastic_rounding=False,
        full_only=True,
        note="fp4 e2m1, nearest",
    ),
    "dion_int8_mom_nearest": _row_dion(
        momentum_dtype="int8", stochastic_rounding=False, full_only=True
    ),
    "dion_int8_mom_residual": _row_dion(
        momentum_dtype="int8", momentum_residual=True, full_only=True
    ),
    "dion_fp8comm_lowrank32": _row_dion(
        comm_dtype="fp8_e4m3",
        hook_lowrank=32,
        full_only=True,
        note="hook mode: embeddings and head sent as rank-32 fp8 factors",
    ),
    "dion_fp8comm_int8mom": _row_dion(
        comm_dtype="fp8_e4m3",
        momentum_dtype="int8",
        full_only=True,
        note="the cheapest recipe: fp8 exchange + int8 momentum (long-run stability row)",
    ),
    "dion_rank1_4": _row_dion(rank_fraction=0.25),
    "dion_r4_bf16_comm": _row_dion(rank_fraction=0.25, comm_dtype="bf16", note=_R4),
    "dion_r4_fp8e4m3_comm": _row_dion(rank_fraction=0.25, comm_dtype="fp8_e4m3", note=_R4),
    "dion_r4_int8_mom": _row_dion(rank_fraction=0.25, momentum_dtype="int8"),
    "dion_r4_recipe": _row_dion(
        rank_fraction=0.25,
        comm_dtype="fp8_e4m3",
        momentum_dtype="int8",
        note="the recipe: fp8 factors, int8 SR momentum, fp8 hook for the other gradients",
    ),
    "dion_r4_fp4_mom": _row_dion(
        rank_fraction=0.25, momentum_dtype="fp4_e2m1", full_only=True, note="fp4, Q in fp8"
    ),
    "dion_rank1_16": _row_dion(rank_fraction=1 / 16),
    "dion2_fp32": _row_dion(**DION2, note="Dion2, a quarter of the rows a step"),
    "dion2_int8_mom": _row_dion(**DION2, momentum_dtype="int8", note="Dion2, int8 SR"),
    "dion2_rows_fp32": _row_dion(
        **DION2, dion2_exchange="selected_rows", full_only=True, note=_ROWS_NOTE
    ),
    "dion2_rows_bf16": _row_dion(
        **DION2, dion2_exchange="selected_rows", comm_dtype="bf16", full_only=True, note=_ROWS_NOTE
    ),
    "dion2_rows_fp8": _row_dion(
        **DION2,
        dion2_exchange="selected_rows",
        comm_dtype="fp8_e4m3",
        full_only=True,
        note=_ROWS_NOTE,
    ),
    "nordion2_fp32": _row_dion(**NORDION2, full_only=True, note="NorDion2, Dion2's lr"),
    "nordion2_int8_mom": _row_dion(
        **NORDION2, momentum_dtype="int8", full_only=True, note="NorDion2, int8 SR"
    ),
    "muon_fp32": _row_dion(**MUON_DIONLP, full_only=True, note="Muon in dion_lp, fp32 NS"),
    "muon_int8_mom": _row_dion(
        **MUON_DIONLP, momentum_dtype="int8", full_only=True, note="Muon in dion_lp, int8 SR"
    ),
}
ROWS = {name: replace(row, twin="") if row.twin == name else row for name, row in ROWS.items()}
DEFAULT_ROWS: tuple[str, ...] = tuple(name for name, row in ROWS.items() if not row.full_only)
REFERENCE_ROW = "dion_fp32"


def unavailable_reason(exc: BaseException) -> str:
    """The "not available" text for an error raised while building a row."""
    if isinstance(exc, NoDionModeError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
