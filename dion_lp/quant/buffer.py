"""The quantized state buffer: codes + scales in a row-block layout, for tensors and shards alike.

A buffer ``name`` lives in a per-parameter state dict as plain entries, so the
dict saves with ``torch.save`` / DCP and loads with ``torch.load(weights_only=True)``:

- ``state[f"{name}_codes"]``: ``(rows, width)`` codes in the format's code dtype
  (int4: ``(rows, width / 2)`` bytes, two codes a byte along the row);
- ``state[f"{name}_scales"]``: ``(rows, nb)`` float32, scaled formats only;
- ``state[f"{name}_format"]``: ``{"fmt", "block_size", "row_block", "row_numel",
  "version"}``.

Row-block layout. A tensor is seen as ``rows`` rows of ``row_numel`` elements
along its *row dim* (dim 0 for a plain tensor; the sharded dim of an FSDP2
parameter, so each rank holds whole rows). Each row is cut into
``nb = ceil(row_numel / block_size)`` blocks of ``row_block = ceil(row_numel / nb)``
elements (padded with zeros to ``width = nb * row_block``), one scale per block;
int4 rounds ``row_block`` up to an even number, so that blocks, rows and row
shards are whole bytes (:mod:`dion_lp.quant.int4`).
Block boundaries never depend on how the rows are split over ranks: with
nearest rounding a buffer's codes are the same on any number of shards, and a
sharded checkpoint reshards exactly. For a DTensor the entries are DTensors
sharded ``Shard(0)`` like the rows; this module only ever touches the local rows.

Small buffers stay in full precision (as torchao does for its low-bit
optimizers: for biases and norms the scales cost more than the bytes they save):
fewer than :data:`MIN_QUANT_NUMEL` elements in all, or, for the scaled formats,
rows shorter than :data:`MIN_ROW_NUMEL` (a 4-byte scale per handful of codes),
are stored as fp32 whatever format is asked for; :func:`storage_format` states
the rule. With ``fmt == "fp32"`` the codes *are* the buffer: :meth:`read`
returns them and callers update them in place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..dist.dtensor import local
from . import codecs, kernels
from .formats import SCALE_NBYTES, format_info
from .rng import key_tensor

__all__ = [
    "BLOCK_NUMEL",
    "BUFFER_VERSION",
    "MIN_QUANT_NUMEL",
    "MIN_ROW_NUMEL",
    "QuantizedBuffer",
    "block_ranges",
    "buffer_nbytes",
    "row_blocks",
    "row_shape",
    "storage_format",
]

BUFFER_VERSION = 2  # 1: dion_lp 0.1.0's flat blocks (plain) or "_sharded" records (DTensor)
MIN_QUANT_NUMEL = 4096
MIN_ROW_NUMEL = 32
# Elements of the row blocks a step decodes, updates and re-encodes at a time
# (1 MiB in fp32): the step's temporaries stay this size whatever the tensor's.
BLOCK_NUMEL = 2**18


def block_ranges(rows: int, row_numel: int, numel: int | None = None) -> list[tuple[int, int]]:
    """``(r0, r1)`` row ranges of at most ``numel`` (default :data:`BLOCK_NUMEL`) elements
    each (one row per range if a row is longer)."""
    step = max(1, (BLOCK_NUMEL if numel is None else numel) // max(row_numel, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)] or [(0, 0)]


def storage_format(fmt: str, rows: int, row_numel: int) -> str:
    """The format a ``rows x row_numel`` buffer asked for in ``fmt`` is stored in."""
    info = format_info(fmt)
    if rows * row_numel < MIN_QUANT_NUMEL or (info.scaled and row_numel < MIN_ROW_NUMEL):
        return "fp32"
    return fmt


def row_blocks(row_numel: int, block_size: int, pack: int = 1) -> tuple[int, int]:
    """(blocks per row, elements per block) of a row of ``row_numel`` elements.

    ``nb = ceil(row_numel / block_size)`` blocks of ``ceil(row_numel / nb)`` elements,
    rounded up to a multiple of ``pack`` (the format's codes per byte: 2 for int4).
    """
    nb = max(1, -(-row_numel // block_size))
    eb = -(-row_numel // nb)
    return nb, -(-eb // pack) * pack


def buffer_nbytes(shape: tuple[int, ...], fmt: str, block_size: int, row_dim: int = 0) -> int:
    """Closed form of the bytes of a buffer of a tensor of ``shape`` asked for in ``fmt``."""
    rows, U = row_shape(shape, row_dim)
    info = format_info(storage_format(fmt, rows, U))
    if not info.scaled:
        return rows * info.code_nbytes(U)
    nb, eb = row_blocks(U, block_size, info.pack)
    return rows * nb * (info.code_nbytes(eb) + SCALE_NBYTES)


def _chunk(width: int) -> int:
    """Block length of the unscaled formats' kernels: 256 when it divides a row, else the row."""
    return 256 if width % 256 == 0 else width


def row_shape(shape: tuple[int, ...], row_dim: int = 0) -> tuple[int, int]:
    """(rows, row_numel) of a tensor of ``shape`` cut into rows along ``row_dim``."""
    if not shape:
        return 1, 1
    rows = shape[row_dim]
    return rows, math.prod(shape) // max(rows, 1)


class QuantizedBuffer:
    """A view over buffer ``name`` of a per-parameter state dict (see the module docstring).

    Args:
        state: the per-parameter state dict holding the entries.
        name: the buffer's name.
    """

    def __init__(self, state: dict[str, Any], name: str) -> None:
        info = state.get(f"{name}_format")
        if not isinstance(info, dict) or f"{name}_codes" not in state:
            raise ValueError(f"Invalid state: no buffer {name!r}")
        self.state, self.name, self.info = state, name, info

    @classmethod
    def create(
        cls,
        state: dict[str, Any],
        name: str,
        *,
        rows: int,
        row_numel: int,
        local_rows: int,
        fmt: str,
        block_size: int,
        device: Any,
        wrap: Callable[[Tensor, tuple[int, int]], Any] | None = None,
    ) -> QuantizedBuffer:
        """Create a zero buffer of ``rows x row_numel`` elements, this rank holding ``local_rows``.

        Args:
            wrap: turns a local ``(local_rows, w)`` tensor into the stored entry of global
                shape ``(rows, w)`` (a DTensor for sharded parameters); None: stored as is.
        """
        codecs.check_block_size(block_size)
        stored = storage_format(fmt, rows, row_numel)
        info = format_info(stored)
        nb, eb = row_blocks(row_numel, block_size, info.pack) if info.scaled else (0, row_numel)
        width = nb * eb if info.scaled else row_numel
        codes = torch.zeros(
            local_rows, info.code_count(width), dtype=info.code_dtype, device=device
        )
        wrap = wrap or (lambda t, shape: t)
        if info.scaled:
            scales = torch.zeros(local_rows, nb, dtype=torch.float32, device=device)
            # zero is not code 0 of every codebook (dynamic8): encode one block of
            # zeros and repeat its codes (no temporary of the buffer's size)
            zero_codes = torch.empty(info.code_count(eb), dtype=info.code_dtype, device=device)
            zeros = torch.zeros(eb, dtype=torch.float32, device=device)
            codecs.encode_(zeros, zero_codes, torch.empty(1, device=device), stored, eb)
            codes.view(-1, zero_codes.numel()).copy_(zero_codes)
            state[f"{name}_scales"] = wrap(scales, (rows, nb))
        else:
            state.pop(f"{name}_scales", None)
        state[f"{name}_codes"] = wrap(codes, (rows, codes.shape[1]))  # int4: bytes
        state[f"{name}_format"] = {
            "fmt": stored,
            "block_size": block_size,
            "row_block": eb,
            "row_numel": row_numel,
            "version": BUFFER_VERSION,
        }
        return cls(state, name)

    @property
    def fmt(self) -> str:
        """The stored format (after the small-buffer rule)."""
        return self.info["fmt"]

    @property
    def width(self) -> int:
        """Elements of a stored row: ``row_numel`` padded to whole blocks (codes, not bytes)."""
        return self._codes().shape[1] * format_info(self.fmt).pack

    def _codes(self) -> Tensor:
        return local(self.state[f"{self.name}_codes"])

    def _scales(self, rows: tuple[int, int] | None = None) -> Tensor | None:
        scales = self.state.get(f"{self.name}_scales")
        return None if scales is None else self._rows(local(scales), rows).reshape(-1)

    @staticmethod
    def _rows(t: Tensor, rows: tuple[int, int] | None) -> Tensor:
        return t if rows is None else t[rows[0] : rows[1]]

    def read(
        self,
        add: Tensor | None = None,
        rows: tuple[int, int] | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """This rank's rows in fp32, ``(local_rows, row_numel)``, plus ``add`` if given.

        One fused pass (decode + add, :mod:`dion_lp.quant.kernels`). For fp32 buffers
        this is the stored tensor itself, ``add`` added in place (update it in place).

        Args:
            add: ``(r1 - r0, row_numel)`` fp32 added to the decoded rows.
            rows: ``(r0, r1)``: only local rows ``r0:r1`` (a row block: the
                temporaries are that block's size); None: all of them.
            out: a contiguous fp32 tensor the result may be written into (a scratch
                block reused across calls) if it has at least ``(r1 - r0) * width``
                elements (:attr:`width`); ignored if shorter, and for fp32 buffers.
        """
        codes, U = self._rows(self._codes(), rows), self.info["row_numel"]
        if self.fmt == "fp32":
            return codes if add is None else codes.add_(add)
        scales, info = self._scales(rows), format_info(self.fmt)
        k, width = codes.shape[0], codes.shape[1] * info.pack  # width in elements
        if out is not None:
            out = out.view(-1)[: k * width].view(k, width) if out.numel() >= k * width else None
        if self.fmt in ("dynamic8", "udynamic8"):  # codebook lookups: the eager codec
            return self._read_codebook(codes, scales, add, out)
        eb = self.info["row_block"] if info.scaled else _chunk(U)
        if info.pack == 2:  # int4, fp4_e2m1
            decode = functools.partial(kernels.decode_4bit_blocks, fmt=self.fmt)
        else:
            decode = kernels.decode_blocks
        blocks = codes.view(-1, eb // info.pack)  # one block per row (4-bit: eb / 2 bytes)
        if width == U and (add is None or add.is_contiguous()):  # blocks of whole rows
            blocks_add = None if add is None else add.view(-1, eb)
            out = None if out is None else out.view(-1, eb)
            return decode(blocks, scales, add=blocks_add, out=out).view(k, U)
        values = decode(blocks, scales).view(k, width)[:, :U]
        return values if add is None else values + add

    def _read_codebook(
        self, codes: Tensor, scales: Tensor, add: Tensor | None, out: Tensor | None
    ) -> Tensor:
        """Decode codebook rows in chunks of ``codecs.EAGER_CHUNK`` elements (bounded
        temporaries) into ``out`` (or a new tensor), adding ``add``; ``(rows, row_numel)``."""
        k, width = codes.shape
        U, eb = self.info["row_numel"], self.info["row_block"]
        if out is None:
            out = torch.empty(k, width, dtype=torch.float32, device=codes.device)
        nb = width // eb
        step = max(1, codecs.EAGER_CHUNK // max(width, 1))
        for r0 in range(0, k, step):
            r1 = min(k, r0 + step)
            chunk = out[r0:r1].view(-1)
            flat = codes[r0:r1].reshape(-1)
            codecs.decode(flat, scales[r0 * nb : r1 * nb], self.fmt, eb, flat.numel(), out=chunk)
            if add is not None:
                out[r0:r1, :U].add_(add[r0:r1])
        return out[:, :U]

    def write(
        self,
        x: Tensor,
        *,
        stochastic: bool,
        key: int | None = None,
        row0: int = 0,
        rows: tuple[int, int] | None = None,
        consume: bool = False,
    ) -> None:
        """Quantize ``x`` (``(local_rows, row_numel)``, any float dtype) into the buffer, in place.

        Args:
            x: this rank's rows (or the row block ``rows``).
            stochastic: stochastic rounding (needs ``key``) instead of round-to-nearest.
            key: the write's stream key (:func:`dion_lp.quant.rng.stream_key`).
            row0: the global index of this rank's first row: element (i, j) of local
                row i rounds with the bits of global index ``(row0 + i) * width + j``,
                so a tensor written whole, as row shards or as row blocks gets the
                same bits.
            rows: ``(r0, r1)``: ``x`` holds local rows ``r0:r1`` only; None: all of them.
            consume: ``x`` is not used after this call and may be overwritten (saves a
                temporary of its size for bf16 with stochastic rounding).

        Raises:
            ValueError: wrong shape, NaN/Inf in ``x``, negative ``x`` for udynamic8, or
                stochastic rounding without a key.
        """
        codes = self._rows(self._codes(), rows)
        want = (codes.shape[0], self.info["row_numel"])
        if tuple(x.shape) != want:
            raise ValueError(
                f"Invalid x for buffer {self.name!r}: shape {tuple(x.shape)}, expected {want}"
            )
        if self.fmt == "fp32":
            if x.data_ptr() != codes.data_ptr() or x.stride() != codes.stride():
                codes.copy_(x)
            return
        if stochastic and key is None:
            raise ValueError(f"Invalid key: None; stochastic rounding of {self.name!r} needs one")
        width = codes.shape[1] * format_info(self.fmt).pack  # elements of a padded row
        first = row0 + (0 if rows is None else rows[0])  # global index of x's first row
        rng = None if not stochastic else key_tensor(key, first * width, codes.device)
        x = x.float()
        if not format_info(self.fmt).scaled:
            x = x.contiguous()
            if codes.numel() and not codecs.all_finite(x):
                raise ValueError(f"Invalid x: cannot encode NaN or Inf in {self.fmt}")
            C = _chunk(width)
            kernels.encode_bf16_(x.view(-1, C), codes.view(-1, C), stochastic, rng, consume)
            return
        if width != x.shape[1]:  # pad each row to whole blocks
            x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
        eb = self.info["row_block"]
        scales = self._scales(rows)
        codecs.encode_blocks_(x.reshape(-1), codes.view(-1), scales, self.fmt, eb, stochastic, rng)

    @property
    def nbytes(self) -> int:
        """Exact bytes this rank holds: codes plus scales."""
        codes, scales = self._codes(), self._scales()
        total = codes.numel() * codes.element_size()
        return total + (0 if scales is None else scales.numel() * 4)

    def check(self, fmt: str, block_size: int) -> None:
        """Raise ``ValueError`` unless the buffer has the layout this run would create.

        Use after loading a state dict: version, stored format (after the small-buffer
        rule), block size (scaled formats), code dtype and the codes' and scales' shapes.

        Args:
            fmt: the format this run asks for.
            block_size: the block size this run asks for.
        """
        name, info = self.name, self.info
        codes = self.state[f"{name}_codes"]
        if info.get("version") != BUFFER_VERSION or codes.ndim != 2:
            raise ValueError(
                f"Invalid state buffer {name!r}: format version {info.get('version')!r}, this "
                f"dion_lp reads version {BUFFER_VERSION} (convert an older state dict with "
                "dion_lp.checkpoint.upgrade_state_dict)"
            )
        rows, U = codes.shape[0], info["row_numel"]
        want = storage_format(fmt, rows, U)
        if info["fmt"] != want:
            raise ValueError(
                f"Invalid state buffer {name!r}: saved with fmt {info['fmt']!r}, "
                f"but this run uses fmt {want!r} (requested {fmt!r})"
            )
        stored = format_info(want)
        scaled = stored.scaled
        if scaled and info["block_size"] != block_size:
            raise ValueError(
                f"Invalid state buffer {name!r}: saved with block_size {info['block_size']!r}, "
                f"but this run uses block_size {block_size!r}"
            )
        nb, eb = row_blocks(U, block_size, stored.pack) if scaled else (0, U)
        scales = self.state.get(f"{name}_scales")
        bad_scales = scaled and (
            scales is None or tuple(scales.shape) != (rows, nb) or scales.dtype != torch.float32
        )
        width = stored.code_count(nb * eb if scaled else U)  # int4: bytes of two codes
        dtype = stored.code_dtype
        if codes.dtype != dtype or codes.shape[1] != width or bad_scales or info["row_block"] != eb:
            raise ValueError(
                f"Invalid state buffer {name!r}: codes {codes.dtype} {tuple(codes.shape)} do "
                f"not match fmt {want!r} with rows of {U} elements and block_size {block_size}"
            )

    def check_shape(self, rows: int, row_numel: int, what: str) -> None:
        """Raise ``ValueError`` naming ``what`` unless the buffer holds ``rows x row_numel``."""
        codes = self.state[f"{self.name}_codes"]
        got = (codes.shape[0], self.info.get("row_numel"))
        if got != (rows, row_numel):
            raise ValueError(
                f"Invalid state for {what}: buffer {self.name!r} holds {got[0]} rows of {got[1]} "
                f"elements, the parameter needs {rows} rows of {row_numel}"
            )
