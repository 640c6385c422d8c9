"""The two DTensor helpers every layer needs, safe on builds without torch.distributed.tensor."""

from __future__ import annotations

from typing import Any

from torch import Tensor

try:  # torch.distributed.tensor is missing from builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["is_sharded", "local"]


def is_sharded(t: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter or a state tensor sharded like one)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (aliasing it), else ``t``."""
    return t.to_local() if is_sharded(t) else t
