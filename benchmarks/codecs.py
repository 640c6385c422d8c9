"""Quantization error and throughput of dion_lp's codecs against torchao's and bitsandbytes'.

Every codec encodes the same fp32 tensors (768 x 3072: gaussian, and Student-t
with 3 degrees of freedom for heavy tails) with blocks of 256 elements and one
fp32 scale per block where the format has scales:

- dion_lp ``quant.quantize`` / ``quant.dequantize``: bf16, int8, fp8_e4m3,
  fp8_e5m2, dynamic8, each round-to-nearest and stochastic (seeded generator);
- torchao 0.18 ``torchao.optim.quant_utils`` (the 8-bit optimizer's codec:
  ``scale_tensor`` + ``quantize_8bit_with_qmap`` on the signed dynamic map,
  ``dequant_with_qmap``), ``torchao.optim.subclass_fp8.quantize_fp8`` (AdamWFp8's
  e4m3 codec), ``torchao.quantization.quant_primitives`` int8 symmetric affine
  (``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine``, block
  1 x 256) and ``quant_utils._fp32_to_bf16_sr`` (bf16 stochastic rounding);
- bitsandbytes ``functional.quantize_blockwise`` / ``dequantize_blockwise``
  (dynamic map, blocksize 256, CPU).

A second table, 4-bit codecs (``codecs_4bit.{csv,json}``), on the same tensors:

- dion_lp ``int4`` (levels in [-7, 7], scale absmax / 7, two codes a byte) with
  blocks of 128, 256, 512 and 1024 elements, nearest and stochastic: the
  quality / size trade-off of the block size (B/elem = 0.5 + 4 / block);
- dion_lp ``fp4_e2m1`` (the e2m1 grid {0, 0.5, ..., 4, 6} times absmax / 6, two
  codes a byte), blocks of 64 and 256, nearest and stochastic;
- torchao 0.18 AdamW4bit's codec (``torchao.optim.subclass_4bit``: ``scale_tensor``
  + ``quantize_4bit_with_qmap`` on the signed 16-entry dynamic map
  ``get_qmap_signed()``, packed two a byte as ``OptimState4bit`` does,
  ``dequant_with_qmap``; blocks of 128, its default, and 256; nearest only);
- torchao ``quant_primitives`` int4 symmetric affine (levels in [-8, 7], scale
  absmax / 7.5, block 1 x 256; its codes are held in int8, counted as packed).

Columns:

- ``B/elem``: stored bytes per element (codes + scales; torchao's 256-entry map
  is counted with its tensor, bitsandbytes' shared map is not);
- ``rel RMS``: ||dequant(quant(x)) - x|| / ||x||;
- ``max/absmax``: max |dequant(quant(x)) - x| / max |x|;
- ``bias z`` (stochastic codecs): over K independent draws,
  ||mean_k(x_k) - x|| / sqrt(mean_k ||x_k - x||^2 / K) on the first ``--bias-numel``
  elements. An unbiased codec gives ~1 (the mean's error is the variance's
  share only); a deterministic one gives sqrt(K). dynamic8's z above 1 is the
  bias ``dion_lp.quant`` documents: the signed map ends at -0.99297, so a
  block's negative absmax element always rounds to -0.99297 absmax (without
  those elements z is 1.00 on both tensors, measured);
- ``quant MB/s``, ``dequant MB/s``: fp32 megabytes (1e6) processed per second,
  median of ``--repeats`` timed calls after one warm-up, on this CPU.

    python -m benchmarks.codecs
    python -m benchmarks.codecs --quick --libs dion_lp,bitsandbytes
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dion_lp import quant

from ._tables import Column, environment, format_table, write_results

__all__ = ["Codec", "codecs_for", "main", "make_tensors", "measure_codec"]

BLOCK = 256
SHAPE = (768, 3072)
DION_FORMATS = ("bf16", "int8", "fp8_e4m3", "fp8_e5m2", "dynamic8")
LIBRARIES = ("dion_lp", "torchao", "bitsandbytes")
INT4_BLOCKS = (128, 256, 512, 1024)
TORCHAO4_BLOCKS = (128, 256)  # 128: torchao AdamW4bit's default


@dataclass(frozen=True)
class Codec:
    """One codec: ``encode(x, generator) -> encoded``, ``decode(encoded) -> fp32``, ``nbytes``."""

    name: str
    library: str
    stochastic: bool
    encode: Callable[[Tensor, torch.Generator], Any]
    decode: Callable[[Any], Tensor]
    nbytes: Callable[[Any], int]


def _tensor_nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _quantizer(fmt: str, block: int, sr: bool) -> Callable[[Tensor, torch.Generator], Any]:
    return lambda x, g: quant.quantize(x, fmt, block_size=block, stochastic=sr, generator=g)


def _dion_codecs(variants: Sequence[tuple[str, str, int]] = ()) -> list[Codec]:
    """dion_lp's codecs, nearest and stochastic, of (name, format, block) ``variants``
    (default: every format of :data:`DION_FORMATS` in blocks of :data:`BLOCK`)."""
    variants = variants or [(fmt, fmt, BLOCK) for fmt in DION_FORMATS]
    return [
        Codec(name, "dion_lp", sr, _quantizer(fmt, block, sr), quant.dequantize, lambda q: q.nbytes)
        for name, fmt, block in variants
        for sr in (False, True)
    ]


def _dion4_codecs() -> list[Codec]:
    int4 = [(f"int4 b{block}", "int4", block) for block in INT4_BLOCKS]
    return _dion_codecs([*int4, *((f"fp4_e2m1 b{b}", "fp4_e2m1", b) for b in (64, 256))])


def _torchao_codecs() -> list[Codec]:
    qu = importlib.import_module("torchao.optim.quant_utils")
    fp8 = importlib.import_module("torchao.optim.subclass_fp8")
    qp = importlib.import_module("torchao.quantization.quant_primitives")
    qmap = torch.tensor(qu.create_dynamic_map(signed=True), dtype=torch.float32)

    def dyn_encode(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, torch.Size]:
        scaled, scale = qu.scale_tensor(x.reshape(-1), BLOCK)
        return qu.quantize_8bit_with_qmap(scaled, qmap), scale, x.shape

    def dyn_decode(e: tuple[Tensor, Tensor, torch.Size]) -> Tensor:
        return qu.dequant_with_qmap(e[0], qmap, e[1]).view(e[2])

    def fp8_encode(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return fp8.quantize_fp8(x.reshape(-1), BLOCK)

    def fp8_decode(e: tuple[Tensor, Tensor]) -> Tensor:
        codes, scale = e
        return (codes.float().view(-1, BLOCK) * scale.view(-1, 1)).view(-1)

    block = (1, BLOCK)

    def int8_encode(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        rows = x.reshape(-1, BLOCK)
        scale, zero = qp.choose_qparams_affine(rows, qp.MappingType.SYMMETRIC, block, torch.int8)
        return qp.quantize_affine(rows, block, scale, zero, torch.int8), scale, zero

    def int8_decode(e: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        return qp.dequantize_affine(e[0], block, e[1], e[2], torch.int8).view(-1)

    return [
        Codec("dynamic8 (optim 8-bit)", "torchao", False, dyn_encode, dyn_decode,
              lambda e: _tensor_nbytes(e[0], e[1], qmap)),
        Codec("fp8_e4m3 (optim fp8)", "torchao", False, fp8_encode, fp8_decode,
              lambda e: _tensor_nbytes(*e)),
        Codec("int8 affine symmetric", "torchao", False, int8_encode, int8_decode,
              lambda e: _tensor_nbytes(e[0], e[1])),  # zero points are all 0: not stored
        Codec("bf16 SR", "torchao", True, lambda x, g: qu._fp32_to_bf16_sr(x),
              lambda e: e.float(), lambda e: _tensor_nbytes(e)),
    ]  # fmt: skip


def _bnb_codecs() -> list[Codec]:
    F = importlib.import_module("bitsandbytes.functional")

    def encode(x: Tensor, g: torch.Generator) -> tuple[Tensor, Any]:
        return F.quantize_blockwise(x, blocksize=BLOCK)

    def decode(e: tuple[Tensor, Any]) -> Tensor:
        return F.dequantize_blockwise(e[0], e[1])

    return [
        Codec("dynamic8 blockwise", "bitsandbytes", False, encode, decode,
              lambda e: _tensor_nbytes(e[0], e[1].absmax)),
    ]  # fmt: skip


def _torchao4_codecs() -> list[Codec]:
    qu = importlib.import_module("torchao.optim.quant_utils")
    s4 = importlib.import_module("torchao.optim.subclass_4bit")
    qp = importlib.import_module("torchao.quantization.quant_primitives")
    qmap = torch.tensor(s4.get_qmap_signed(), dtype=torch.float32)

    def dyn4(block: int) -> Codec:
        def encode(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, torch.Size]:
            scaled, scale = qu.scale_tensor(x.reshape(-1), block)
            codes = qu.quantize_4bit_with_qmap(scaled, qmap)
            return (codes[::2] << 4) | codes[1::2], scale, x.shape  # OptimState4bit's packing

        def decode(e: tuple[Tensor, Tensor, torch.Size]) -> Tensor:
            codes = torch.stack([e[0] >> 4, e[0] & 0b1111], dim=-1)  # its dequantize()
            return qu.dequant_with_qmap(codes, qmap, e[1]).view(e[2])

        return Codec(f"dynamic4 (optim 4-bit) b{block}", "torchao", False, encode, decode,
                     lambda e: _tensor_nbytes(e[0], e[1], qmap))  # fmt: skip

    block, q4 = (1, BLOCK), dict(quant_min=-8, quant_max=7)

    def int4_encode(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        rows = x.reshape(-1, BLOCK)
        scale, zero = qp.choose_qparams_affine(
            rows, qp.MappingType.SYMMETRIC, block, torch.int8, **q4
        )
        return qp.quantize_affine(rows, block, scale, zero, torch.int8, **q4), scale, zero

    def int4_decode(e: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        return qp.dequantize_affine(e[0], block, e[1], e[2], torch.int8, **q4).view(-1)

    affine = Codec("int4 affine symmetric b256", "torchao", False, int4_encode, int4_decode,
                   lambda e: e[0].numel() // 2 + _tensor_nbytes(e[1]))  # fmt: skip
    return [*(dyn4(b) for b in TORCHAO4_BLOCKS), affine]


BUILDERS = {
    8: {"dion_lp": _dion_codecs, "torchao": _torchao_codecs, "bitsandbytes": _bnb_codecs},
    4: {"dion_lp": _dion4_codecs, "torchao": _torchao4_codecs},
}


def codecs_for(libraries: Sequence[str], bits: int = 8) -> tuple[list[Codec], list[dict[str, Any]]]:
    """The ``bits``-bit (8: with bf16; or 4) codecs of ``libraries``, and a row per library
    that could not be loaded (bitsandbytes has no 4-bit optimizer codec: none)."""
    builders, codecs, failed = BUILDERS[bits], [], []
    for lib in libraries:
        if lib not in LIBRARIES:
            raise ValueError(f"Invalid library: {lib!r}; expected one of {LIBRARIES}")
        if lib not in builders:
            continue
        try:
            codecs += builders[lib]()
        except Exception as exc:  # a missing or broken baseline is reported, not fatal
            failed.append({"library": lib, "codec": "*", "status": f"skipped: {exc}"[:200]})
    return codecs, failed


def make_tensors(shape: tuple[int, int], seed: int = 0) -> dict[str, Tensor]:
    """``{"gaussian": N(0, 1), "student-t3": Student-t, 3 dof}`` of ``shape``, fp32, seeded."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(shape, generator=g)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).square().sum(0)
    return {"gaussian": gauss, "student-t3": z / (chi2 / 3).sqrt()}


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_codec(
    codec: Codec, x: Tensor, *, repeats: int, draws: int, bias_numel: int, seed: int = 0
) -> dict[str, Any]:
    """Error, bias (stochastic codecs) and throughput of ``codec`` on ``x`` (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # codecs drawing from the global generator
    enc = codec.encode(x, g)
    y = codec.decode(enc).reshape(x.shape).float()
    err = y - x
    row: dict[str, Any] = {
        "bytes_per_elem": codec.nbytes(enc) / x.numel(),
        "rel_rms": (err.norm() / x.norm()).item(),
        "max_err_rel_absmax": (err.abs().max() / x.abs().max()).item(),
    }
    if codec.stochastic and draws > 1:
        xs = x.reshape(-1)[:bias_numel].contiguous()
        total = torch.zeros_like(xs)
        sq = 0.0
        for _ in range(draws):
            yk = codec.decode(codec.encode(xs, g)).reshape(-1).float()
            total += yk
            sq += (yk - xs).square().sum().item()
        mean_err = (total / draws - xs).norm().item()
        expected = math.sqrt(sq / draws / draws)  # sqrt(E||x_k - x||^2 / K)
        row["bias_z"] = mean_err / expected if expected > 0 else 0.0
        row["draws"] = draws
    mb = x.numel() * 4 / 1e6
    row["quant_mb_s"] = mb / _median_seconds(lambda: codec.encode(x, g), repeats)
    row["dequant_mb_s"] = mb / _median_seconds(lambda: codec.decode(enc), repeats)
    return row


def _dynamic8_parity(x: Tensor) -> dict[str, int] | None:
    """dion_lp dynamic8 against bitsandbytes blockwise, both round-to-nearest, on ``x``.

    Returns:
        ``{"numel", "codes_differ", "dion_lp_closer"}``: elements whose decoded
        values differ, and among them those where dion_lp's value is strictly
        nearer to x (None without bitsandbytes).
    """
    try:
        F = importlib.import_module("bitsandbytes.functional")
    except ImportError:
        return None
    ours = quant.dequantize(quant.quantize(x, "dynamic8", block_size=BLOCK)).view(-1)
    theirs = F.dequantize_blockwise(*F.quantize_blockwise(x, blocksize=BLOCK)).view(-1)
    differ = ours != theirs
    flat = x.reshape(-1)
    closer = (ours - flat).abs() < (theirs - flat).abs()
    return {
        "numel": x.numel(),
        "codes_differ": int(differ.sum()),
        "dion_lp_closer": int((differ & closer).sum()),
    }


COLUMNS = [
    Column("tensor", "tensor"),
    Column("library", "library"),
    Column("codec", "codec"),
    Column("rounding", "rounding"),
    Column("bytes_per_elem", "B/elem", ".4f"),
    Column("rel_rms", "rel RMS", ".2e"),
    Column("max_err_rel_absmax", "max/absmax", ".2e"),
    Column("bias_z", "bias z", ".2f"),
    Column("quant_mb_s", "quant MB/s", ".0f"),
    Column("dequant_mb_s", "dequant MB/s", ".0f"),
    Column("status", "status"),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.codecs", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="64x256 tensors, 2 repeats, 8 draws")
    p.add_argument("--libs", default=",".join(LIBRARIES), help="comma list of libraries")
    p.add_argument("--repeats", type=int, default=7, help="timed calls (median)")
    p.add_argument("--draws", type=int, default=64, help="stochastic draws for the bias")
    p.add_argument("--bias-numel", type=int, default=262_144, help="elements in the bias test")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--out", type=Path, default=Path("results/codecs"))
    p.add_argument("--bits", default="8,4", help="tables: 8 (8-bit and bf16), 4, or both")
    p.add_argument("--no-progress", action="store_true")
    return p


def _measure_all(
    codecs: list[Codec], tensors: dict[str, Tensor], args: argparse.Namespace, bits: int
) -> list[dict[str, Any]]:
    """One row per (tensor, codec): :func:`measure_codec`, or the reason it was skipped."""
    repeats, draws = (2, 8) if args.quick else (args.repeats, args.draws)
    jobs = [(t, c) for t in tensors for c in codecs]
    if not args.no_progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc=f"{bits}-bit codecs", unit="codec", leave=False)
    rows = []
    for tname, codec in jobs:
        row = {
            "tensor": tname,
            "library": codec.library,
            "codec": codec.name,
            "rounding": "stochastic" if codec.stochastic else "nearest",
        }
        try:
            row.update(
                measure_codec(
                    codec, tensors[tname], repeats=repeats, draws=draws, bias_numel=args.bias_numel
                ),
                status="ok",
            )
        except Exception as exc:  # a baseline failing on this CPU is reported, not fatal
            row["status"] = f"skipped: {type(exc).__name__}: {exc}"[:200]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure every codec on every tensor; print the tables; write CSV + JSON per table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (64, 256) if args.quick else SHAPE
    repeats, draws = (2, 8) if args.quick else (args.repeats, args.draws)
    libs = [lib for lib in args.libs.split(",") if lib]
    tensors = make_tensors(shape)
    meta = {
        "command": " ".join(["python -m benchmarks.codecs", *argv]),
        "environment": environment(),
        "shape": list(shape),
        "block_size": BLOCK,
        "repeats": repeats,
        "draws": draws,
        "notes": __doc__,
    }
    header = (
        f"{shape[0]}x{shape[1]} fp32 tensors, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {repeats}, bias over {draws} draws"
    )
    for bits in (int(b) for b in args.bits.split(",") if b):
        if bits not in BUILDERS:
            raise ValueError(f"Invalid bits: {bits!r}; expected 8 or 4")
        codecs, rows = codecs_for(libs, bits)
        rows += _measure_all(codecs, tensors, args, bits)
        name = "codecs" if bits == 8 else "codecs_4bit"
        print(f"\n{bits}-bit codecs: {header}, block {BLOCK} unless named")
        print(format_table(rows, COLUMNS))
        extra: dict[str, Any] = {"int4_blocks": list(INT4_BLOCKS)} if bits == 4 else {}
        if bits == 8:
            extra["dynamic8_vs_bitsandbytes"] = {t: _dynamic8_parity(x) for t, x in tensors.items()}
            print(
                f"\ndion_lp dynamic8 vs bitsandbytes (nearest): {extra['dynamic8_vs_bitsandbytes']}"
            )
        write_results(args.out, name, rows, {**meta, **extra})
        print(f"wrote {args.out}/{name}.{{csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
