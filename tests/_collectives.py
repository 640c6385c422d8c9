"""Test helpers: watch the collectives torch.distributed runs, independently of dion_lp.

    with recorded_collectives() as log:
        ...  # log gets (kind, bytes S of the whole buffer, dtype) per collective

S is the buffer the nccl-tests bus-bandwidth convention charges: the all-reduce
buffer, the all-to-all send buffer, the all-gather output.
:func:`patched_collectives` is the general form: a callback per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["patched_collectives", "recorded_collectives"]

# torch.distributed name -> (kind, index of the argument holding S)
KINDS = {
    "all_reduce": ("all_reduce", 0),
    "all_to_all_single": ("all_to_all", 1),  # S = the send buffer
    "all_gather_single": ("all_gather", 0),  # S = the output
    "all_gather_into_tensor": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "broadcast": ("broadcast", 0),
    "all_gather": ("all_gather_list", 0),
    "all_to_all": ("all_to_all_list", 0),
}


@contextlib.contextmanager
def patched_collectives(
    names: Iterable[str], on_call: Callable[[str, tuple[Any, ...]], None]
) -> Iterator[None]:
    """Call ``on_call(name, args)`` before each call of the named torch.distributed functions."""
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            on_call(name, args)
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def recorded_collectives() -> Iterator[list[tuple[str, int, torch.dtype | None]]]:
    """Log (kind, buffer bytes S, dtype) of every collective; -1 and None for list forms."""
    log: list[tuple[str, int, torch.dtype | None]] = []

    def on_call(name: str, args: tuple[Any, ...]) -> None:
        kind, index = KINDS[name]
        t = args[index]
        if isinstance(t, torch.Tensor):
            log.append((kind, t.numel() * t.element_size(), t.dtype))
        else:
            log.append((kind, -1, None))

    with patched_collectives(KINDS, on_call):
        yield log
