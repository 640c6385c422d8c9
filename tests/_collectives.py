"""Test helper: record the collectives torch.distributed runs, independently of dion_lp.

    with recorded_collectives() as log:
        ...  # log gets (kind, bytes S of the whole buffer, dtype) per collective

S is the buffer the nccl-tests bus-bandwidth convention charges: the all-reduce
buffer, the all-to-all send buffer, the all-gather output.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

__all__ = ["recorded_collectives"]


@contextlib.contextmanager
def recorded_collectives():
    """Wrap every torch.distributed collective; log (kind, buffer bytes S, dtype)."""
    log: list[tuple[str, int, torch.dtype]] = []
    kinds = {
        "all_reduce": ("all_reduce", 0),
        "all_to_all_single": ("all_to_all", 1),  # S = the send buffer
        "all_gather_single": ("all_gather", 0),  # S = the output
        "all_gather_into_tensor": ("all_gather", 0),
        "reduce_scatter_tensor": ("reduce_scatter", 1),
        "broadcast": ("broadcast", 0),
        "all_gather": ("all_gather_list", 0),
    }
    originals = {name: getattr(dist, name) for name in kinds if hasattr(dist, name)}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            kind, index = kinds[name]
            t = args[index]
            if isinstance(t, torch.Tensor):
                log.append((kind, t.numel() * t.element_size(), t.dtype))
            else:
                log.append((kind, -1, None))
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
