"""The one registry of number formats: what each is, what it costs, where it may be used.

Validation (:mod:`dion_lp.options`), the codecs (:mod:`dion_lp.quant.codecs`), the
wire (:mod:`dion_lp.dist.collectives`) and the state buffers
(:mod:`dion_lp.quant.buffer`) all read this table; no other module lists formats.

=============  ==================  ======  =====================================
format         codes dtype         scaled  used for
=============  ==================  ======  =====================================
``fp32``       float32             no      state, wire
``bf16``       bfloat16            no      state, wire
``int8``       int8 in [-127,127]  yes     state
``fp8_e4m3``   float8_e4m3fn       yes     state, wire
``fp8_e5m2``   float8_e5m2         yes     wire
``dynamic8``   uint8               yes     state
``udynamic8``  uint8               yes     non-negative state (AdamW's second moment)
``int4``       uint8, 2 per byte   yes     state (signed, in [-7, 7])
``fp4_e2m1``   uint8, 2 per byte   yes     state (signed, OCP e2m1 grid, max 6)
=============  ==================  ======  =====================================

A scaled format stores one float32 scale per block of elements. ``built`` says
whether the optimizer can run with a format: a format in the table that is not
built is accepted by name and refused with ``NotImplementedError`` (none today).

``int4`` and ``fp4_e2m1`` pack two codes per byte (``pack == 2``): element ``2 j``
in the low nibble of byte ``j``, element ``2 j + 1`` in the high one, each a
two's-complement level (int4) or a sign-magnitude e2m1 pattern (fp4_e2m1; the
grid {0, 0.5, 1, 1.5, 2, 3, 4, 6} times ``absmax / 6``: finer near zero, which
suits a block's many small values better than int4's even steps:
:mod:`dion_lp.quant.int4`). Its non-negative buffers (AdamW's second
moment) are kept in ``udynamic8``: a linear 4-bit grid flushes the small second
moments of a block to zero (Li et al. 2023, "Memory efficient optimizers with
4-bit states", the zero-point problem), and Dion and Lion need only the signed
format. Sizes of packed codes: :meth:`Format.code_count` / :meth:`Format.code_nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FORMATS",
    "MOMENTUM_FORMATS",
    "REGISTRY",
    "SCALED_FORMATS",
    "SCALE_NBYTES",
    "WIRE_FORMATS",
    "Format",
    "check_built",
    "format_info",
    "unsigned_variant",
]

SCALE_NBYTES = 4  # every scale is a float32


@dataclass(frozen=True)
class Format:
    """One number format.

    Attributes:
        name: the name users pass (``momentum_dtype=``, ``comm_dtype=``).
        code_dtype: dtype of the stored codes (fp8 travels as uint8 views of it).
        scaled: one float32 scale per block of codes.
        state: usable as an optimizer-state format (``momentum_dtype``).
        wire: usable as a wire format (``comm_dtype``).
        built: the optimizer can run with it.
        unsigned: the variant used for non-negative state (AdamW's second moment).
        pack: codes per element of ``code_dtype`` (2 for int4's nibbles, else 1).
    """

    name: str
    code_dtype: torch.dtype
    scaled: bool
    state: bool
    wire: bool
    built: bool = True
    unsigned: str | None = None
    pack: int = 1

    @property
    def bytes_per_element(self) -> int | float:
        """Bytes of one code (scales not included): 4, 2, 1, or 0.5 for int4."""
        size = self.code_dtype.itemsize
        return size if self.pack == 1 else size / self.pack

    def code_count(self, numel: int) -> int:
        """Elements of ``code_dtype`` holding ``numel`` codes: ``ceil(numel / pack)``."""
        return -(-numel // self.pack)

    def code_nbytes(self, numel: int) -> int:
        """Exact bytes of ``numel`` codes (a trailing half-used int4 byte counts whole)."""
        return self.code_count(numel) * self.code_dtype.itemsize


REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp32", torch.float32, scaled=False, state=True, wire=True),
        Format("bf16", torch.bfloat16, scaled=False, state=True, wire=True),
        Format("int8", torch.int8, scaled=True, state=True, wire=False, unsigned="udynamic8"),
        Format(
            "fp8_e4m3",
            torch.float8_e4m3fn,
            scaled=True,
            state=True,
            wire=True,
            unsigned="udynamic8",
        ),
        Format("fp8_e5m2", torch.float8_e5m2, scaled=True, state=False, wire=True),
        Format("dynamic8", torch.uint8, scaled=True, state=True, wire=False, unsigned="udynamic8"),
        # internal: chosen for non-negative buffers, never asked for by name
        Format("udynamic8", torch.uint8, scaled=True, state=False, wire=False),
        Format(
            "int4", torch.uint8, scaled=True, state=True, wire=False, unsigned="udynamic8", pack=2
        ),
        Format(
            "fp4_e2m1",
            torch.uint8,
            scaled=True,
            state=True,
            wire=False,
            unsigned="udynamic8",
            pack=2,
        ),
    )
}

FORMATS = tuple(REGISTRY)
SCALED_FORMATS = tuple(name for name, f in REGISTRY.items() if f.scaled)
MOMENTUM_FORMATS = tuple(name for name, f in REGISTRY.items() if f.state)
WIRE_FORMATS = tuple(name for name, f in REGISTRY.items() if f.wire)


def format_info(fmt: str) -> Format:
    """The :class:`Format` named ``fmt``, or a ``ValueError`` naming it."""
    if not isinstance(fmt, str) or fmt not in REGISTRY:
        raise ValueError(f"Invalid fmt: {fmt!r}; expected one of {FORMATS}")
    return REGISTRY[fmt]


def check_built(fmt: str, name: str) -> None:
    """Raise ``NotImplementedError`` naming the argument if ``fmt`` is registered but not built."""
    if not format_info(fmt).built:
        raise NotImplementedError(f"{name}={fmt!r} is not built yet")


def unsigned_variant(fmt: str) -> str:
    """The format of a non-negative buffer asked for in ``fmt``.

    AdamW's second moment spans many decades of small positive values; a signed
    absmax code would waste its sign bit and flush the small ones to zero, so the
    8-bit state formats and int4 store it in the unsigned dynamic codebook.
    """
    return format_info(fmt).unsigned or fmt
