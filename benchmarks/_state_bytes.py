"""Bytes of an optimizer's state, for any library: ``state_bytes``.

Shared by the ablation (``benchmarks._rows``), the memory benchmarks and the
fine-tuning example.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["state_bytes"]


def _tensor_parts(t: Tensor) -> list[Tensor]:
    """Plain tensors behind ``t`` (a tensor subclass is flattened, e.g. torchao's 8-bit state)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (Tensor, nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [part for name in names for part in _tensor_parts(getattr(t, name))]


def _walk(value: Any, out: list[Tensor]) -> None:
    if isinstance(value, Tensor):
        out.extend(_tensor_parts(value))
    elif isinstance(value, dict):
        for v in value.values():
            _walk(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk(v, out)


def state_bytes(opt: Any) -> int:
    """Bytes of every optimizer-state tensor, each storage counted once.

    Uses ``opt.state_bytes()`` when the optimizer has it (dion_lp.Dion); otherwise
    walks ``opt.state`` (of each optimizer of a ``benchmarks._rows.OptimizerList``), flattening
    tensor subclasses and counting a storage shared by several states (bitsandbytes'
    quantization maps) once.

    Args:
        opt: an optimizer or a ``benchmarks._rows.OptimizerList``.

    Returns:
        Total bytes.
    """
    if isinstance(getattr(opt, "optimizers", None), list):  # an OptimizerList
        return sum(state_bytes(o) for o in opt.optimizers)
    if callable(getattr(opt, "state_bytes", None)):
        return int(opt.state_bytes())
    tensors: list[Tensor] = []
    _walk(dict(opt.state), tensors)
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())
