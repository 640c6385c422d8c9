"""Split a model's parameters the way Dion needs, so users never do it by hand."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["param_groups"]

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
