"""Optimizer state of sharded (DTensor) parameters: layout, 8-bit buffers, DCP checkpoints.

Under FSDP2 (``fully_shard``) every parameter is a DTensor split along one tensor
dimension ``d`` over the *shard* dimension of a device mesh (and, for HSDP,
replicated over a *replicate* dimension). Its optimizer state stays sharded the
same way and is kept as DTensors, so ``torch.distributed.checkpoint`` (DCP) can
save it on one mesh and load it on another.

Shard-major layout. A buffer of a parameter sharded along ``d`` is stored as a
2-D tensor of ``rows = shape[d]`` rows of ``row_numel`` (product of the other
dims) elements, rows in the order of dim ``d``; globally a DTensor sharded
``Shard(0)`` over the shard mesh dimension, so each rank holds the rows of its
own shard (a view of the local shard for ``d = 0``, its transpose for a 2-D
``d = 1``).

8-bit buffers are quantized row by row: each row is cut into
``nb = ceil(row_numel / block_size)`` blocks of ``row_block = ceil(row_numel / nb)``
elements (the row padded with zeros to ``nb * row_block``), one float32 scale per
block (scales: a ``(rows, nb)`` DTensor sharded like the codes). Block boundaries
therefore never depend on how the rows are split over ranks: with nearest
rounding a buffer's codes are bitwise the same on any mesh size, and a
checkpoint reshards exactly. (This is not the flat-block layout of
:mod:`dion_lp.state`, so the 8-bit numerics differ slightly from unsharded
Dion whenever ``row_numel`` is not a multiple of ``block_size``.) Rows shorter
than :data:`MIN_ROW_NUMEL` (e.g. 1-D biases, rows of 1) would need a scale per
handful of elements: such buffers, and buffers of fewer than
:data:`dion_lp.state.MIN_QUANT_NUMEL` elements in total (counted globally, so the
choice is the same on every rank), are stored in fp32.

Stochastic rounding of sharded buffers draws from a generator re-seeded every step
from ``(seed, parameter index, step, shard rank)``: a run resumed from a
checkpoint on the same mesh rounds exactly as the uninterrupted run, with no
generator state to save. Its random draws do depend on the shard rank, so on
another mesh size stochastic rounding is equal in distribution, not bitwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import quant
from .options import dion_rank
from .scalar import SCALAR_STATE, apply_rule_, scalar_format
from .state import storage_format

try:  # torch.distributed.tensor is missing from builds without distributed support
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "LAYOUT_VERSION",
    "MIN_ROW_NUMEL",
    "ShardSpec",
    "check_buffer",
    "dcp_state_dict",
    "from_shard_major",
    "init_buffer",
    "init_param_state",
    "init_state",
    "is_sharded",
    "load_dcp_state_dict",
    "local",
    "long_sharded",
    "read_buffer",
    "rounding_generator",
    "scalar_step_",
    "shard_spec",
    "state_dtensor",
    "to_shard_major",
    "write_buffer",
]

LAYOUT_VERSION = 1
MIN_ROW_NUMEL = 32  # shorter rows: 8-bit would cost a 4-byte scale per < 32 codes


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a parameter or state tensor that :mod:`dion_lp.sharded` handles)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (aliasing it), else ``t``."""
    return t.to_local() if is_sharded(t) else t


@dataclass(frozen=True)
class ShardSpec:
    """How one DTensor parameter is split over its mesh.

    Attributes:
        mesh: the DeviceMesh.
        shard_mesh_dim: the mesh dimension whose ranks hold different shards.
        shard_dim: the tensor dimension split over them.
        shard_group, shard_size, shard_rank: that mesh dimension's process group.
        replicate_group, replicate_size: HSDP's replicate mesh dimension (None, 1 without).
        global_shape: the parameter's full shape.
        start, length: this rank's slice ``[start, start + length)`` of ``shard_dim``
            (``torch.chunk`` sizes: ``ceil(rows / shard_size)``, the last ones shorter
            or empty).
    """

    mesh: Any
    shard_mesh_dim: int
    shard_dim: int
    shard_group: Any
    shard_size: int
    shard_rank: int
    replicate_group: Any
    replicate_size: int
    global_shape: tuple[int, ...]
    start: int
    length: int

    @property
    def rows(self) -> int:
        """Rows of the shard-major layout: the global extent of ``shard_dim``."""
        return self.global_shape[self.shard_dim]

    @property
    def row_numel(self) -> int:
        """Elements per row of the shard-major layout (product of the other dims)."""
        return math.prod(self.global_shape) // max(self.rows, 1)

    def placements(self, sharded: bool) -> tuple[Any, ...]:
        """``Shard(0)`` on the shard mesh dim when ``sharded``; ``Replicate()`` elsewhere."""
        out: list[Any] = [Replicate()] * self.mesh.ndim
        if sharded:
            out[self.shard_mesh_dim] = Shard(0)
        return tuple(out)


def shard_spec(p: Tensor) -> ShardSpec:
    """The :class:`ShardSpec` of a DTensor parameter.

    Supported placements: exactly one ``Shard(d)`` mesh dimension (FSDP2), plus at
    most one ``Replicate()`` mesh dimension (HSDP).

    Raises:
        NotImplementedError: any other placement (FSDP + TP, strided or partial
            placements, several replicate dimensions), naming what is supported.
    """
    placements = tuple(p.placements)
    shards = [i for i, pl in enumerate(placements) if pl.is_shard()]
    others = [i for i, pl in enumerate(placements) if not pl.is_shard()]
    plain = all(type(placements[i]) is Shard for i in shards)
    if len(shards) != 1 or not plain or any(not placements[i].is_replicate() for i in others):
        raise NotImplementedError(
            f"sharded Dion supports a parameter sharded along one tensor dimension over one "
            f"mesh dimension (FSDP2 Shard(0) or Shard(1)), optionally replicated over one "
            f"more (HSDP); got placements {placements}"
        )
    if len(others) > 1:
        raise NotImplementedError(
            f"sharded Dion supports at most one replicate mesh dimension (HSDP); got {placements}"
        )
    mesh, mesh_dim = p.device_mesh, shards[0]
    shard_dim = placements[mesh_dim].dim
    group = mesh.get_group(mesh_dim)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = p.shape[shard_dim]
    chunk = -(-rows // size)
    start = min(rank * chunk, rows)
    length = max(0, min(chunk, rows - start))
    if p.to_local().shape[shard_dim] != length:
        raise NotImplementedError(
            f"sharded Dion expects torch.chunk-style shards ({length} of {rows} rows on shard "
            f"rank {rank}), got a local shard of shape {tuple(p.to_local().shape)}"
        )
    rep_group = mesh.get_group(others[0]) if others else None
    return ShardSpec(
        mesh=mesh,
        shard_mesh_dim=mesh_dim,
        shard_dim=shard_dim,
        shard_group=group,
        shard_size=size,
        shard_rank=rank,
        replicate_group=rep_group,
        replicate_size=dist.get_world_size(rep_group) if others else 1,
        global_shape=tuple(p.shape),
        start=start,
        length=length,
    )


def to_shard_major(x: Tensor, shard_dim: int) -> Tensor:
    """A local shard as ``(length, row_numel)`` rows along ``shard_dim`` (a view when possible)."""
    if x.ndim == 2:
        return x if shard_dim == 0 else x.T
    return x.movedim(shard_dim, 0).reshape(x.shape[shard_dim], -1)


def from_shard_major(y: Tensor, shard_dim: int, local_shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_shard_major`: a view of the ``(length, row_numel)`` ``y``."""
    if len(local_shape) == 2:
        return y if shard_dim == 0 else y.T
    moved = (local_shape[shard_dim], *[s for i, s in enumerate(local_shape) if i != shard_dim])
    return y.reshape(moved).movedim(0, shard_dim)


def state_dtensor(x: Tensor, spec: ShardSpec, global_shape: tuple[int, int], sharded: bool) -> Any:
    """Wrap this rank's 2-D state tensor ``x`` as a DTensor of ``global_shape`` on ``spec.mesh``.

    ``sharded``: rows split like the parameter's shard dim (``Shard(0)``); else replicated.
    """
    return DTensor.from_local(
        x,
        spec.mesh,
        spec.placements(sharded),
        run_check=False,
        shape=torch.Size(global_shape),
        stride=(global_shape[1], 1),
    )


def _row_blocks(row_numel: int, block_size: int) -> tuple[int, int]:
    """(blocks per row, elements per block) of the row-wise 8-bit layout."""
    nb = max(1, -(-row_numel // block_size))
    return nb, -(-row_numel // nb)


def stored_format(fmt: str, rows: int, row_numel: int) -> str:
    """The format a sharded buffer asked for in ``fmt`` is stored in (see the module docstring)."""
    stored = storage_format(fmt, rows * row_numel)
    if stored in quant.SCALED_FORMATS and row_numel < MIN_ROW_NUMEL:
        return "fp32"
    return stored


def init_buffer(
    st: dict[str, Any], name: str, spec: ShardSpec, fmt: str, block_size: int, device: Any
) -> None:
    """Create a zero buffer ``name`` for a parameter of ``spec``, in the shard-major layout.

    Writes ``{name}_codes`` (DTensor ``(rows, width)``), ``{name}_scales`` (DTensor
    ``(rows, nb)``, scaled formats only) and ``{name}_sharded`` (the layout record).
    """
    quant.check_block_size(block_size)
    rows, U = spec.rows, spec.row_numel
    stored = stored_format(fmt, rows, U)
    scaled = stored in quant.SCALED_FORMATS
    nb, eb = _row_blocks(U, block_size) if scaled else (0, U)
    width = nb * eb if scaled else U
    codes = torch.zeros(spec.length, width, dtype=quant.code_dtype(stored), device=device)
    st[f"{name}_codes"] = state_dtensor(codes, spec, (rows, width), sharded=True)
    if scaled:
        scales = torch.zeros(spec.length, nb, dtype=torch.float32, device=device)
        # zero is not code 0 of every codebook (dynamic8): encode it
        zeros = torch.zeros(codes.numel(), dtype=torch.float32, device=device)
        quant.encode_(zeros, codes.view(-1), scales.view(-1), stored, eb)
        st[f"{name}_scales"] = state_dtensor(scales, spec, (rows, nb), sharded=True)
    st[f"{name}_sharded"] = {
        "fmt": stored,
        "block_size": block_size,
        "row_block": eb,
        "row_numel": U,
        "shard_dim": spec.shard_dim,
        "version": LAYOUT_VERSION,
    }


def read_buffer(st: dict[str, Any], name: str) -> Tensor:
    """This rank's rows of buffer ``name`` in fp32, ``(length, row_numel)``.

    For fp32 buffers this is the stored local tensor itself (update it in place).
    """
    info = st[f"{name}_sharded"]
    codes = local(st[f"{name}_codes"])
    if info["fmt"] == "fp32":
        return codes
    scales = st.get(f"{name}_scales")
    scales = None if scales is None else local(scales).reshape(-1)
    flat = quant.decode(codes.reshape(-1), scales, info["fmt"], info["row_block"], codes.numel())
    return flat.view(codes.shape)[:, : info["row_numel"]]


def write_buffer(
    st: dict[str, Any],
    name: str,
    x: Tensor,
    *,
    stochastic: bool,
    generator: torch.Generator | None,
) -> None:
    """Quantize ``x`` (``(length, row_numel)``, any float dtype) into buffer ``name`` in place."""
    info = st[f"{name}_sharded"]
    codes = local(st[f"{name}_codes"])
    if info["fmt"] == "fp32":
        if x.data_ptr() != codes.data_ptr() or x.stride() != codes.stride():
            codes.copy_(x)
        return
    if codes.shape[1] != x.shape[1]:  # pad each row to whole blocks
        x = torch.nn.functional.pad(x.float(), (0, codes.shape[1] - x.shape[1]))
    scales = st.get(f"{name}_scales")
    scales = None if scales is None else local(scales).view(-1)
    quant.encode_(
        x.reshape(-1),
        codes.view(-1),
        scales,
        info["fmt"],
        info["row_block"],
        stochastic,
        generator,
    )


def check_buffer(st: dict[str, Any], name: str, fmt: str, block_size: int) -> None:
    """Raise ``ValueError`` unless sharded buffer ``name`` has the layout this run would create.

    Args:
        st: a loaded per-parameter state.
        name: buffer name.
        fmt: the format this run asks for.
        block_size: the block size this run asks for.
    """
    info = st[f"{name}_sharded"]
    codes = st.get(f"{name}_codes")
    if info.get("version") != LAYOUT_VERSION or codes is None or codes.ndim != 2:
        raise ValueError(
            f"Invalid sharded state buffer {name!r}: layout version {info.get('version')!r}, "
            f"this dion_lp reads version {LAYOUT_VERSION}"
        )
    rows, U = codes.shape[0], info["row_numel"]
    want = stored_format(fmt, rows, U)
    if info["fmt"] != want:
        raise ValueError(
            f"Invalid sharded state buffer {name!r}: saved with fmt {info['fmt']!r}, "
            f"but this run uses fmt {want!r} (requested {fmt!r})"
        )
    scaled = want in quant.SCALED_FORMATS
    if scaled and info["block_size"] != block_size:
        raise ValueError(
            f"Invalid sharded state buffer {name!r}: saved with block_size "
            f"{info['block_size']!r}, but this run uses block_size {block_size!r}"
        )
    nb, eb = _row_blocks(U, block_size) if scaled else (0, U)
    scales = st.get(f"{name}_scales")
    bad_scales = scaled and (scales is None or tuple(scales.shape) != (rows, nb))
    width = nb * eb if scaled else U
    if codes.dtype != quant.code_dtype(want) or codes.shape[1] != width or bad_scales:
        raise ValueError(
            f"Invalid sharded state buffer {name!r}: codes {codes.dtype} {tuple(codes.shape)} "
            f"do not match fmt {want!r} with rows of {U} elements"
        )


def rounding_generator(
    seed: int, index: int, step: int, spec: ShardSpec, device: Any
) -> torch.Generator:
    """The stochastic-rounding generator of one sharded buffer write (see the module docstring)."""
    gen = torch.Generator(device=device)
    key = ((seed * 1_000_003 + index) * 1_000_033 + step) * 65_537 + spec.shard_rank
    gen.manual_seed(key % (2**63))
    return gen


def long_sharded(spec: ShardSpec) -> bool:
    """Whether the sharded dim is the long dim of the tall orientation (rows of T)."""
    m, n = spec.global_shape
    return spec.shard_dim == (1 if m < n else 0)


# ---------------------------------------------------------------- parameter state
def init_param_state(
    p: Tensor, group: dict[str, Any], st: dict[str, Any], *, seed: int, index: int
) -> None:
    """Create the state of the DTensor parameter ``p`` (Dion or element-wise), sharded like it."""
    spec = shard_spec(p)
    device = local(p).device
    fmt, block = group["momentum_dtype"], group["block_size"]
    if group["algorithm"] != "dion":
        for name, unsigned in SCALAR_STATE[group["algorithm"]].items():
            init_buffer(st, name, spec, scalar_format(fmt, unsigned=unsigned), block, device)
        st["step"] = 0
        return
    from .dion import initial_right_factor  # dion imports this module

    m, n = spec.global_shape
    r = dion_rank(m, n, group["rank_fraction"], group["rank_multiple_of"])
    init_buffer(st, "momentum", spec, fmt, block, device)
    if group["momentum_residual"] and fmt != "fp32":
        residual = torch.zeros(spec.length, spec.row_numel, dtype=torch.bfloat16, device=device)
        st["momentum_residual"] = state_dtensor(
            residual, spec, (spec.rows, spec.row_numel), sharded=True
        )
    S = min(m, n)
    Q = initial_right_factor(S, r, seed=seed, index=index)
    Q = Q.to(device=device, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
    if long_sharded(spec):
        st["Q"] = state_dtensor(Q, spec, (S, r), sharded=False)
    else:  # Q's rows are the sharded dim: keep this rank's rows
        st["Q"] = state_dtensor(
            Q[spec.start : spec.start + spec.length].clone(), spec, (S, r), True
        )
    st["step"] = 0


def scalar_step_(p: Tensor, grad: Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
    """AdamW or Lion on this rank's shard, states read from and written to their shards."""
    spec = shard_spec(p)
    X = local(p)
    names = SCALAR_STATE[group["algorithm"]]
    st["step"] += 1
    bufs = {
        name: from_shard_major(read_buffer(st, name), spec.shard_dim, X.shape) for name in names
    }
    apply_rule_(X, grad, bufs, group, st["step"])
    for name, buf in bufs.items():
        if st[f"{name}_sharded"]["fmt"] != "fp32":
            # nearest rounding keeps element-wise states split-independent and reproducible
            write_buffer(
                st, name, to_shard_major(buf, spec.shard_dim), stochastic=False, generator=None
            )


# -------------------------------------------------------------- checkpoints
def init_state(opt: Any) -> None:
    """Create every missing parameter state of the :class:`dion_lp.Dion` ``opt`` without stepping.

    Zero momenta, the seeded Q, step 0: what the first step would create. Needed
    before loading a checkpoint in place (DCP loads into existing tensors).
    """
    from . import state as qstate

    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if st:
                continue
            if is_sharded(p):
                init_param_state(p, group, st, seed=opt._seed, index=opt._param_index[id(p)])
            elif group["algorithm"] == "dion":
                opt._init_dion_state(p, group, st)
            else:
                for name, unsigned in SCALAR_STATE[group["algorithm"]].items():
                    fmt = scalar_format(group["momentum_dtype"], unsigned=unsigned)
                    qstate.init_buffer(st, name, p, fmt, block_size=group["block_size"])
                st["step"] = 0


def dcp_state_dict(opt: Any) -> dict[str, Any]:
    """``opt.state_dict()`` in the form ``torch.distributed.checkpoint`` saves and loads in place.

    Creates any missing state first (:func:`init_state`) and keys the per-parameter
    states by ``str(index)`` (DCP restores non-tensor values under string keys
    only). Sharded states are DTensors, so a checkpoint saved on one mesh loads on
    a mesh of another size (resharded by DCP); the parameters must be sharded
    along the same dim (Shard(0) vs Shard(1)) as when saved. Plain tensors (the
    unsharded params' states, the generators of unsharded stochastic rounding)
    are saved once, from one rank.

    Usage::

        dcp.save({"model": model.state_dict(), "optim": dcp_state_dict(opt)}, checkpoint_id=d)
        sd = {"model": model.state_dict(), "optim": dcp_state_dict(opt)}   # any mesh size
        dcp.load(sd, checkpoint_id=d)
        model.load_state_dict(sd["model"]); load_dcp_state_dict(opt, sd["optim"])
    """
    init_state(opt)
    sd = opt.state_dict()
    sd["state"] = {str(k): v for k, v in sd["state"].items()}
    return sd


def load_dcp_state_dict(opt: Any, state_dict: dict[str, Any]) -> None:
    """Load a state dict of :func:`dcp_state_dict` form into ``opt`` (checked as on load)."""
    sd = dict(state_dict)
    sd["state"] = {int(k): v for k, v in state_dict["state"].items()}
    opt.load_state_dict(sd)
