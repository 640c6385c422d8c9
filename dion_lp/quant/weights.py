"""Writing an fp32 update into a low-precision parameter: nearest or stochastic rounding.

A bf16 weight has 8 significant bits: an update smaller than half a bf16 step
(~0.2-0.4% of the weight) is rounded away by round-to-nearest, and fine-tuning
learning rates make most updates that small. Stochastic rounding keeps them in
expectation: the new weight is the bf16 neighbour above with probability
(distance to the one below) / (bf16 step), so ``E[new] = old + update`` exactly.
The random bits are those of the state codecs (:mod:`dion_lp.quant.rng`): a pure
function of (seed, parameter index, step, element's global index), so a resumed
run rounds exactly as the uninterrupted one, and row blocks or FSDP2 shards of a
parameter get the bits the whole tensor would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .rng import key_tensor

__all__ = ["write_weights_"]


def _chunk(width: int) -> int:
    return 256 if width % 256 == 0 else width


def write_weights_(
    dst: Tensor,  # (rows, cols) view of the parameter, any float dtype; written in place
    src: Tensor,  # (rows, cols) fp32, the new values
    *,
    stochastic: bool,
    key: int | None = None,
    first: int = 0,
) -> None:
    """``dst = round(src)`` in ``dst``'s dtype, stochastically for bf16 when asked.

    Args:
        dst: the parameter rows to write (a view; need not be contiguous).
        src: fp32 values, ``dst``'s shape; a temporary: it may be overwritten.
        stochastic: stochastic rounding into bf16 (needs ``key``); ignored for fp32
            ``dst`` (exact) and refused for other dtypes by the optimizer's checks.
        key: the write's stream key (:func:`dion_lp.quant.rng.stream_key`).
        first: global index of ``dst[0, 0]``; element (i, j) rounds with the bits of
            ``first + i * cols + j``.
    """
    if dst.dtype == torch.float32 or not stochastic or dst.dtype != torch.bfloat16:
        dst.copy_(src)
        return
    if key is None:
        raise ValueError("Invalid key: None; stochastic rounding of the weights needs one")
    rows, cols = src.shape
    C = _chunk(cols)
    x = src.contiguous().view(-1, C)
    out = dst if dst.is_contiguous() else torch.empty_like(src, dtype=dst.dtype)
    rng = key_tensor(key, first, src.device)
    kernels.encode_bf16_(x, out.view(-1, C), True, rng, consume=True)
    if out is not dst:
        dst.copy_(out)
