"""Checks and copies behind :meth:`dion_lp.Dion.load_state_dict`.

A Dion state dict is ``torch.optim.Optimizer``'s (``state`` + ``param_groups``)
plus a ``"dion_lp"`` section: format version, stochastic-rounding generator
states and the wire-byte counters. Everything is a tensor or a plain value, so
``torch.load(..., weights_only=True)`` reads it.

Loading refuses, before it changes anything, a state that this optimizer would
not have produced: another optimizer's, another version's, another number of
parameters, or a group whose stored layout differs (algorithm, momentum format,
block size, rank). Converting between formats is not done silently: load into
an optimizer built like the saved one instead.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import sharded_state
from . import state as qstate
from .scalar import scalar_format

__all__ = ["STATE_DICT_VERSION", "LAYOUT_KEYS", "check_loadable", "check_loaded_state"]

STATE_DICT_VERSION = 1

# Group keys that decide the layout of the stored state: they must match.
LAYOUT_KEYS = (
    "algorithm",
    "momentum_dtype",
    "block_size",
    "rank_fraction",
    "rank_multiple_of",
    "momentum_residual",
)


def check_loadable(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` fits an optimizer with ``param_groups``.

    Args:
        state_dict: what :meth:`dion_lp.Dion.state_dict` returned.
        param_groups: the loading optimizer's groups (their current settings).
    """
    meta = state_dict.get("dion_lp")
    if not isinstance(meta, dict) or "version" not in meta:
        raise ValueError(
            "state_dict was not saved by dion_lp.Dion (no 'dion_lp' section); "
            "refusing to load another optimizer's state"
        )
    if meta["version"] != STATE_DICT_VERSION:
        raise ValueError(
            f"state_dict version {meta['version']!r} is not supported "
            f"(this dion_lp reads version {STATE_DICT_VERSION})"
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"state_dict holds {len(saved_groups)} param groups, this optimizer {len(param_groups)}"
        )
    for index, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {index}: state_dict holds {len(saved['params'])} parameters, "
                f"this optimizer {len(group['params'])}"
            )
        for key in LAYOUT_KEYS:
            if key in saved and saved[key] != group[key]:
                raise ValueError(
                    f"param group {index}: state_dict was saved with {key}={saved[key]!r}, "
                    f"this optimizer uses {key}={group[key]!r}; build the optimizer with "
                    f"{key}={saved[key]!r} to load it"
                )


def check_loaded_state(st: dict[str, Any], group: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless every buffer in ``st`` has the layout ``group`` asks for."""
    for key, value in st.items():
        suffix = key.rsplit("_", 1)[-1]
        if suffix not in ("format", "sharded") or not isinstance(value, dict):
            continue
        name = key[: -len(suffix) - 1]
        if name == "exp_avg_sq":
            want = scalar_format(group["momentum_dtype"], unsigned=True)
        else:
            want = group["momentum_dtype"]
        if suffix == "sharded":  # a DTensor (FSDP2) parameter's row-wise layout
            sharded_state.check_buffer(st, name, want, group["block_size"])
        else:
            qstate.check_buffer(st, name, want, group["block_size"])


def copy_value(value: Any, device: Any) -> Any:
    """A loaded state entry, owned by the optimizer: tensors copied as they are (dtype kept)."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    return dict(value) if isinstance(value, dict) else value
