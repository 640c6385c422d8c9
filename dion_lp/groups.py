"""Param groups: split a model the way Dion needs, and check a group before it joins.

:func:`param_groups` splits a model so users never do it by hand;
:func:`checked_group` runs every check of ``add_param_group`` (torch's and Dion's)
on a copy of a new group, so a refused group never reaches the optimizer.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .dist.dtensor import is_sharded, local
from .gradients import param_name
from .options import MATRIX_ALGORITHMS, validate_group

__all__ = ["check_param", "checked_group", "param_groups"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
DEFAULT_HEAD_NAMES = ("lm_head", "head", "output", "output_layer", "classifier", "fc_out")


def param_groups(
    model: nn.Module,
    scalar_algorithm: str = "lion",
    *,
    scalar_lr: float | None = None,
    head_names: tuple[str, ...] = DEFAULT_HEAD_NAMES,
    exclude: tuple[str, ...] = (),
    no_decay_vectors: bool = True,
    **dion_overrides: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`dion_lp.Dion`: hidden 2-D weights to Dion, the rest element-wise.

    Every trainable parameter appears exactly once (tied weights included). The
    rules, in order:

    - a parameter owned by an ``nn.Embedding``, by a module whose last name is in
      ``head_names`` (an output head, also when tied to the embedding), or whose
      name starts with an entry of ``exclude`` -> the scalar rule ("matrices" group);
    - tensors that are not 2-D, norm weights, biases, and 2-D tensors with a
      dimension of 1 -> the scalar rule ("vectors" group, weight decay 0 when
      ``no_decay_vectors``);
    - every other 2-D weight -> Dion.

    Args:
        model: the model.
        scalar_algorithm: "lion" or "adamw" for the non-Dion groups.
        scalar_lr: learning rate of the non-Dion groups (default: the optimizer's lr).
        head_names: module names treated as output heads.
        exclude: parameter-name prefixes forced to the scalar rule.
        no_decay_vectors: no weight decay on biases and norm weights.
        **dion_overrides: extra keys for the Dion group (e.g. ``rank_fraction=0.25``).

    Returns:
        Up to three group dicts with ``params``, ``param_names`` and ``algorithm``;
        empty groups are left out.
    """
    if scalar_algorithm not in ("lion", "adamw"):
        raise ValueError(f"Invalid scalar_algorithm: {scalar_algorithm!r}; expected lion or adamw")
    owners = _owners(model, head_names)
    dion, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kinds = owners.get(id(p), set())
        excluded = any(name.startswith(prefix) for prefix in exclude)
        if excluded or "embedding" in kinds or "head" in kinds:
            matrices.append((name, p))
        elif p.ndim != 2 or "norm" in kinds or min(p.shape) < 2:
            vectors.append((name, p))
        else:
            dion.append((name, p))
    scalar = {"algorithm": scalar_algorithm}
    if scalar_lr is not None:
        scalar["lr"] = scalar_lr
    groups = [
        _group(dion, {"algorithm": "dion", **dion_overrides}),
        _group(matrices, scalar),
        _group(vectors, {**scalar, **({"weight_decay": 0.0} if no_decay_vectors else {})}),
    ]
    return [g for g in groups if g["params"]]


def _group(named: list[tuple[str, Tensor]], options: dict[str, Any]) -> dict[str, Any]:
    return {"params": [p for _, p in named], "param_names": [n for n, _ in named], **options}


def _owners(model: nn.Module, head_names: tuple[str, ...]) -> dict[int, set[str]]:
    """id(param) -> kinds of module that own it ("embedding", "head", "norm"), ties included."""
    owners: dict[int, set[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        kind = None
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            kind = "embedding"
        elif mod_name and mod_name.rsplit(".", 1)[-1] in head_names:
            kind = "head"
        elif isinstance(module, _NORM_TYPES):
            kind = "norm"
        if kind is None:
            continue
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(kind)
    return owners


# ------------------------------------------------------------- add_param_group
def checked_group(
    param_group: Any, defaults: dict[str, Any], existing: list[dict[str, Any]]
) -> dict[str, Any]:
    """Check a group for ``add_param_group`` on a copy, before anything changes.

    Runs torch's own checks (``torch.optim.Optimizer.add_param_group`` on a scratch
    list of groups: tensors, leaves, overlaps, names), then Dion's: every
    hyperparameter with the defaults filled in, every parameter against the group's
    algorithm, one device for all parameters. A group without names joining
    groups with names (:func:`param_groups` sets them) is given
    ``"group{g}.param{i}"`` names, as torch refuses to mix the two.

    Args:
        param_group: the group as passed to ``add_param_group`` (not changed).
        defaults: the optimizer's defaults.
        existing: the optimizer's groups (not changed).

    Returns:
        The entries to set on ``param_group`` before torch's ``add_param_group``
        takes it: ``"params"`` as a list (an iterator is read once, here) and the
        derived ``"param_names"``, if any.

    Raises:
        ValueError: a hyperparameter, parameter or device Dion cannot take,
            naming it and its value; torch's ``TypeError`` / ``ValueError`` for
            what torch refuses.
    """
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    trial = dict(param_group)
    params = trial["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif not isinstance(params, set):  # torch refuses sets (unordered) below
        params = list(params)
    trial["params"] = params
    updates = {"params": params, **_derived_names(trial, existing)}
    trial.update(updates)
    scratch = types.SimpleNamespace(defaults=defaults, param_groups=list(existing))
    with warnings.catch_warnings():  # torch warns again when it adds the group for real
        warnings.simplefilter("ignore")
        torch.optim.Optimizer.add_param_group(scratch, trial)  # type: ignore[arg-type]
    group = scratch.param_groups[-1]
    names, count = group.get("param_names"), len(group["params"])
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != count):
        raise ValueError(
            f"Invalid param_names: {names!r}; expected a list of one name per parameter ({count})"
        )
    validate_group(group)
    devices = {local(p).device for g in scratch.param_groups for p in g["params"]}
    if len(devices) > 1:
        raise ValueError(
            f"Invalid params: on devices {sorted(map(str, devices))}; dion_lp.Dion needs "
            "all its parameters on one device (use one optimizer per device)"
        )
    for i, p in enumerate(group["params"]):
        check_param(p, group, i)
    return updates


def _derived_names(trial: dict[str, Any], existing: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"param_names": ...}`` for an unnamed group joining named ones, else ``{}``."""
    params = trial["params"]
    named = "param_names" in trial or any(isinstance(p, tuple) for p in params)
    if not existing or named == ("param_names" in existing[0]) or not isinstance(params, list):
        return {}
    if named:
        raise ValueError(
            "Invalid param_group: it names its parameters ('param_names' or (name, tensor) "
            "pairs) but this optimizer's groups do not; pass the tensors without names"
        )
    return {"param_names": [f"group{len(existing)}.param{i}" for i in range(len(params))]}


def check_param(p: Tensor, group: dict[str, Any], i: int) -> None:
    """Reject parameters the group's algorithm cannot handle, naming them."""
    if not p.is_floating_point():
        raise ValueError(
            f"Invalid parameter {param_name(group, i)}: dtype {p.dtype} is not floating"
        )
    if group["weight_rounding"] == "stochastic" and p.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"Invalid parameter {param_name(group, i)}: dtype {p.dtype} with "
            "weight_rounding='stochastic', which rounds into bfloat16 (float32 parameters "
            "need no rounding); use bfloat16 or float32 parameters, or weight_rounding='nearest'"
        )
    algorithm = group["algorithm"]
    if algorithm not in MATRIX_ALGORITHMS:
        return
    if p.ndim != 2:
        raise ValueError(
            f"Invalid parameter {param_name(group, i)} in a {algorithm} group: shape "
            f"{tuple(p.shape)}; {algorithm} takes 2-D matrices, put other tensors in an "
            "'adamw' or 'lion' group (dion_lp.param_groups does this)"
        )
    if min(p.shape) < 2:
        raise ValueError(
            f"Invalid parameter {param_name(group, i)} in a {algorithm} group: shape "
            f"{tuple(p.shape)} has a dimension of 1; such vectors belong to an 'adamw' or "
            "'lion' group"
        )
    if algorithm != "dion" and is_sharded(p):
        raise NotImplementedError(
            f"Invalid parameter {param_name(group, i)} in a {algorithm} group: an FSDP2 "
            f"(DTensor) parameter; {algorithm} selects and orthogonalizes whole rows and is "
            "built for whole matrices only (DDP or one process); use 'dion' for FSDP2"
        )
