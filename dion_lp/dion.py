"""The Dion optimizer: bookkeeping in the class, maths in module functions.

Dion (Ahn, Xu et al., arXiv 2504.05295, Algorithm 1) updates each 2-D weight
with an orthonormalized rank-r factorisation of its momentum, obtained by one
step of power iteration warm-started from the last step's right factor; what
the rank-r step misses stays in the momentum (error feedback). Every other
parameter uses an element-wise rule (AdamW or Lion) in the same optimizer.

One step over the Dion matrices runs in phases so that, when replicas average
their factors, every matrix's factor travels in one coalesced collective:

    phase 1   B = M + G ; P = B Q                 -> mean(P) over replicas
    phase 2   P = Orthonormalize(P) ; R = B^T P   -> mean(R) over replicas
    phase 3   M = B - (1 - mu) P R^T ; Q = ColumnNormalize(R)
              X = X (1 - lr wd) - lr sqrt(d_out / d_in) P Q^T
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import state as qstate
from .checkpoint import STATE_DICT_VERSION, check_loadable, check_loaded_state, copy_value
from .comm import CommStats, check_member, collective, quantized_mean_
from .options import dion_rank, validate_group
from .orthogonalize import column_normalize, orthonormalize
from .scalar import scalar_step_
from .sharded import sharded_step_, synchronize_momenta_
from .sharded_state import is_sharded, local

__all__ = ["Dion", "NonFiniteGradientError"]

# Gradients larger than this are treated as non-finite: AdamW's g^2 overflows fp32
# at 1.8e19 and Dion's products B Q at ~3e38 / sqrt(n).
GRAD_LIMIT = 1e18
# Formats whose behaviour is built; the others are accepted names that raise.
_BUILT_MOMENTUM = ("fp32", "bf16", "int8", "fp8_e4m3", "dynamic8")
_BUILT_COMM = ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2")


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; raised before it touches any state."""


@dataclass
class _Matrix:
    """One Dion matrix during a step (tall orientation)."""

    param: Tensor
    grad: Tensor
    group: dict[str, Any]
    state: dict[str, Any]
    transpose: bool
    exchange_factors: bool  # False: (m + n) r >= m n, so B itself is averaged
    B: Tensor | None = None  # tall m x n, fp32
    P: Tensor | None = None  # tall m x r
    R: Tensor | None = None  # n x r


class Dion(torch.optim.Optimizer):
    """Dion with low-precision state, for 2-D weights; AdamW or Lion for the rest.

    Args:
        params: tensors, named tensors, or param-group dicts. A group's
            ``"algorithm"`` is ``"dion"`` (2-D matrices), ``"adamw"`` or ``"lion"``;
            any keyword below can be overridden per group. Use
            :func:`dion_lp.param_groups` to split a model the usual way.
        lr: learning rate (Dion's update has RMS ~ lr, like Muon's).
        mu: Dion momentum coefficient in [0, 1).
        weight_decay: decoupled: ``X <- X (1 - lr wd)``.
        betas, eps: of the element-wise rules (Lion uses betas, not eps).
        rank_fraction: r = ceil(rank_fraction * min(m, n)), in (0, 1].
        rank_multiple_of: r is rounded up to a multiple of this (>= 1), capped at min(m, n).
        momentum_dtype: storage of the momentum and of the element-wise states:
            "fp32", "bf16", "int8", "fp8_e4m3", "dynamic8".
        comm_dtype: wire format of the factor exchange: "fp32", "bf16",
            "fp8_e4m3", "fp8_e5m2".
        stochastic_rounding: round low-precision state stochastically (unbiased).
        momentum_residual: keep what rounding the momentum dropped in a bf16
            buffer and add it back next step (an ablation of SR alone).
        block_size: quantization block of the 8-bit states.
        process_group: replicas to average factors over. None: the default
            group when torch.distributed is initialised with more than one
            rank (ranks never drift apart silently), else not replicated.
        grad_sync: also average the gradients of the element-wise params (in
            fp32, or bf16 when comm_dtype is 8/16-bit). Leave False under DDP,
            which averages them already.
        seed: seeds the right factors Q (identical on every rank) and the
            stochastic rounding.
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteGradientError`
            naming the parameter; ``"skip"`` leaves that parameter and its state
            untouched this step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        mu: float = 0.95,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        rank_fraction: float = 1.0,
        rank_multiple_of: int = 1,
        momentum_dtype: str = "fp32",
        comm_dtype: str = "fp32",
        stochastic_rounding: bool = True,
        momentum_residual: bool = False,
        block_size: int = 256,
        process_group: Any = None,
        grad_sync: bool = False,
        seed: int = 0,
        algorithm: str = "dion",
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            mu=mu,
            weight_decay=weight_decay,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            rank_fraction=rank_fraction,
            rank_multiple_of=rank_multiple_of,
            momentum_dtype=momentum_dtype,
            comm_dtype=comm_dtype,
            stochastic_rounding=stochastic_rounding,
            momentum_residual=momentum_residual,
            block_size=block_size,
            algorithm=algorithm,
            nonfinite=nonfinite,
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r}; expected an int")
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._next_index = 0
        self._param_index: dict[int, int] = {}
        if not isinstance(grad_sync, bool):
            raise ValueError(f"Invalid grad_sync: {grad_sync!r}; expected a bool")
        self._group, self._world_size = _resolve_process_group(process_group)
        self._replicas = None if process_group is None else self._group  # sharded: HSDP replicas
        self._grad_sync = grad_sync
        self._stats = CommStats()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; fills defaults, validates every hyperparameter and the shapes."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group)
        if group["momentum_dtype"] not in _BUILT_MOMENTUM:
            raise NotImplementedError(f"momentum_dtype={group['momentum_dtype']!r} is not built")
        if group["comm_dtype"] not in _BUILT_COMM:
            raise NotImplementedError(f"comm_dtype={group['comm_dtype']!r} is not built yet")
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"Invalid params: on devices {sorted(map(str, devices))}; dion_lp.Dion needs "
                "all its parameters on one device (use one optimizer per device)"
            )
        for i, p in enumerate(group["params"]):
            self._param_index[id(p)] = self._next_index
            self._next_index += 1
            _check_param(p, group, i)

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices: list[_Matrix] = []
        scalars: list[tuple[dict[str, Any], Tensor, Tensor]] = []
        sharded: list[tuple[dict[str, Any], Tensor, Tensor]] = []  # DTensor (FSDP2) params
        for group, p, grad in self._finite_grads():
            st = self.state[p]
            if is_sharded(p):
                sharded.append((group, p, grad))
                continue
            if group["algorithm"] != "dion":
                scalars.append((group, p, grad))
                continue
            if not st:
                self._init_dion_state(p, group, st)
            m, n = p.shape
            r = st["Q"].shape[1]
            factors = self._world_size > 1 and (m + n) * r < m * n
            matrices.append(_Matrix(p, grad, group, st, transpose=m < n, exchange_factors=factors))
        if self._grad_sync and self._world_size > 1:
            self._sync_scalar_grads(scalars)
        for group, p, grad in scalars:
            scalar_step_(p, grad, group, self.state[p], self._generator(p.device))
        # Replicas exchange every matrix's factors in one collective per phase (one
        # chunk); without replicas one matrix at a time keeps the fp32 working
        # copies of low-precision momenta to one matrix at a time.
        chunks = [matrices] if self._world_size > 1 else [[mat] for mat in matrices]
        for chunk in chunks:
            if chunk:
                self._dion_chunk(chunk)
        if sharded:
            sharded_step_(
                sharded,
                self.state,
                seed=self._seed,
                param_index=self._param_index,
                stats=self._stats,
                grad_sync=self._grad_sync,
                replicate_group=self._replicas,
            )
        self._stats.end_step()
        return loss

    def _finite_grads(self) -> list[tuple[dict[str, Any], Tensor, Tensor]]:
        """(group, param, fp32 grad) of every param to step, non-finite ones handled.

        Replicated: the ranks agree first (one small all-reduce), so they skip or
        raise together and exchange the same matrices; a param with a gradient on
        some ranks only steps everywhere, with zeros where it has none.
        """
        items = [(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])]
        has_grad = [p.grad is not None for _, _, p in items]
        if not any(has_grad) and self._world_size == 1:
            return []
        for (group, i, p), has in zip(items, has_grad, strict=True):
            if has and p.grad.is_sparse:
                raise ValueError(f"Dion does not support sparse gradients ({_name(group, i)})")
        device = items[0][2].device if items else torch.device("cpu")
        flags = torch.zeros(2, len(items), dtype=torch.uint8, device=device)
        flags[0] = torch.tensor(has_grad, dtype=torch.uint8)
        with_grad = [p for (_, _, p), has in zip(items, has_grad, strict=True) if has]
        if with_grad:
            bad = torch.stack([_overflows(local(p.grad)) for p in with_grad])
            flags[1, torch.tensor(has_grad, device=device)] = bad.to(torch.uint8)
        group, world = self._group, self._world_size
        if any(is_sharded(p) for _, _, p in items):  # shards must agree too: every rank
            group, world = None, dist.get_world_size()
        if world > 1:
            with collective("all_reduce of the gradient flags", group):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            self._stats.record_collective("all_reduce", flags.numel(), world)
        any_grad, any_bad = flags.tolist()
        out = []
        for (group, i, p), has, bad in zip(items, any_grad, any_bad, strict=True):
            if not has:
                continue
            if bad:
                if group["nonfinite"] == "raise":
                    where = " on some rank" if self._world_size > 1 else ""
                    raise NonFiniteGradientError(
                        f"non-finite gradient (NaN, Inf, or |g| > {GRAD_LIMIT:.0e}, which "
                        f"overflows fp32 maths) in parameter {_name(group, i)}"
                        f"{where}; nothing was updated. Pass nonfinite='skip' to skip such "
                        "parameters."
                    )
                continue
            grad = (
                p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            )
            out.append((group, p, grad))
        return out

    def _sync_scalar_grads(self, scalars: list[tuple[dict[str, Any], Tensor, Tensor]]) -> None:
        """Average the element-wise params' gradients over the replicas (grad_sync=True)."""
        by_fmt: dict[str, list[Tensor]] = {}
        for group, _, grad in scalars:
            fmt = "fp32" if group["comm_dtype"] == "fp32" else "bf16"
            by_fmt.setdefault(fmt, []).append(grad)
        for fmt, grads in by_fmt.items():
            quantized_mean_(grads, fmt, self._group, self._stats)

    # -------------------------------------------------------------------- dion
    def _init_dion_state(self, p: Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        m, n = p.shape
        r = dion_rank(m, n, group["rank_fraction"], group["rank_multiple_of"])
        fmt = group["momentum_dtype"]
        qstate.init_buffer(st, "momentum", p, fmt, block_size=group["block_size"])
        if group["momentum_residual"] and fmt != "fp32":
            st["momentum_residual"] = torch.zeros_like(p, dtype=torch.bfloat16)
        Q = initial_right_factor(min(m, n), r, seed=self._seed, index=self._param_index[id(p)])
        # Q is stored compactly when the momentum is; it is always used in fp32.
        st["Q"] = Q.to(device=p.device, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
        st["step"] = 0

    def _read_momentum(self, mat: _Matrix) -> Tensor:
        """B = M + G as an fp32 m x n tensor (the state itself when fp32: updated in place)."""
        M = qstate.read_buffer(mat.state, "momentum")
        residual = mat.state.get("momentum_residual")
        if residual is not None:
            M = M.add_(residual)
        return M.add_(mat.grad)

    def _dion_chunk(self, chunk: list[_Matrix]) -> None:
        """Phases 1-3 of the module docstring on a list of matrices.

        Replicated, a matrix whose factors would not be smaller than itself
        ((m + n) r >= m n) has its B averaged instead; its P and R are then
        computed from that mean, and its momentum keeps the local B for the
        error feedback, exactly as with factors.
        """
        replicated = self._world_size > 1
        factors = [mat for mat in chunk if mat.exchange_factors]
        full = [mat for mat in chunk if not mat.exchange_factors]
        for mat in chunk:
            B = self._read_momentum(mat)
            mat.B = B.T if mat.transpose else B
        shared = {id(mat): mat.B for mat in chunk}  # the B that P and R are computed from
        if replicated and full:
            means = [mat.B.clone() for mat in full]
            self._exchange(means, full)
            shared.update({id(mat): B_mean for mat, B_mean in zip(full, means, strict=True)})
        for mat in chunk:
            # P = B Q
            mat.P = shared[id(mat)] @ mat.state["Q"].float()
        if replicated:
            self._exchange([mat.P for mat in factors], factors)
        for mat in chunk:
            # P = Orthonormalize(P) ; R = B^T P
            mat.P = orthonormalize(mat.P)
            mat.R = shared[id(mat)].T @ mat.P
        if replicated:
            self._exchange([mat.R for mat in factors], factors)
        for mat in chunk:
            self._finish_matrix(mat)
            mat.B = mat.P = mat.R = None

    def _exchange(self, tensors: list[Tensor], mats: list[_Matrix]) -> None:
        """Mean over the replicas, in place, one coalesced collective per wire format."""
        by_fmt: dict[str, list[Tensor]] = {}
        for tensor, mat in zip(tensors, mats, strict=True):
            by_fmt.setdefault(mat.group["comm_dtype"], []).append(tensor)
        for fmt, group_tensors in by_fmt.items():
            quantized_mean_(group_tensors, fmt, self._group, self._stats)

    def _finish_matrix(self, mat: _Matrix) -> None:
        group, st = mat.group, mat.state
        B, P, R = mat.B, mat.P, mat.R
        # M = B - (1 - mu) P R^T   (B is the momentum buffer or its fp32 copy)
        B.addmm_(P, R.T, alpha=-(1.0 - group["mu"]))
        M = B.T if mat.transpose else B
        self._write_momentum(st, M, group)
        # Q = ColumnNormalize(R)
        Q_step, Q_next = column_normalize(R, st["Q"])
        st["Q"].copy_(Q_next)
        st["step"] += 1
        # X = X (1 - lr wd) - lr sqrt(d_out / d_in) P Q^T
        d_out, d_in = mat.param.shape
        scale = group["lr"] * math.sqrt(d_out / d_in)
        update = P @ Q_step.T
        _apply_update_(mat.param, update.T if mat.transpose else update, group, scale)

    def _write_momentum(self, st: dict[str, Any], M: Tensor, group: dict[str, Any]) -> None:
        residual = st.get("momentum_residual")
        if st["momentum_format"]["fmt"] == "fp32":
            return  # M is the state tensor itself, already updated in place
        qstate.write_buffer(
            st,
            "momentum",
            M,
            stochastic=group["stochastic_rounding"],
            generator=self._generator(M.device),
        )
        if residual is not None:
            # residual = what this write dropped, added back next step
            residual.copy_(M - qstate.read_buffer(st, "momentum"))

    # ----------------------------------------------------------- bookkeeping
    def _generator(self, device: torch.device) -> torch.Generator:
        """The optimizer's stochastic-rounding generator on ``device`` (seeded lazily)."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed + 0x5EED)
            self._generators[key] = gen
        return gen

    def comm_stats(self) -> dict[str, Any]:
        """Wire bytes this rank sent since construction (nccl-tests bus-bandwidth convention).

        Returns:
            ``{"bytes_sent": int, "steps": int, "last_step": int, "by_kind": {kind: int}}``,
            scales and the per-step agreement on non-finite gradients included.
        """
        return self._stats.as_dict()

    @torch.no_grad()
    def synchronize_for_checkpoint(self) -> None:
        """Replace every rank's momenta by their mean over the replicas (collective).

        Each replica keeps its own Dion momentum; only their mean enters the
        updates (all exchanges are means). After this call every rank holds
        the mean, so any rank's :meth:`state_dict` is the whole state and can be
        loaded on any number of ranks. With fp32 state and exchange the run goes
        on exactly as before, up to float rounding; to resume bit for bit on the
        same world size instead, save each rank's own ``state_dict``.
        """
        if self._world_size == 1:
            return
        momenta, owners = [], []
        for group in self.param_groups:
            if group["algorithm"] != "dion":
                continue
            for p in group["params"]:
                st = self.state.get(p)
                if st and not is_sharded(p):
                    momenta.append(qstate.read_buffer(st, "momentum").clone())
                    owners.append((st, group))
        quantized_mean_(momenta, "fp32", self._group, self._stats)
        synchronize_momenta_(self.param_groups, self.state, self._replicas, self._stats)
        for M, (st, group) in zip(momenta, owners, strict=True):
            if st["momentum_format"]["fmt"] == "fp32":
                qstate.read_buffer(st, "momentum").copy_(M)
            else:
                self._write_momentum(st, M, group)

    def state_bytes(self) -> int:
        """Bytes held by every tensor of the optimizer state (codes, scales, Q, residuals)."""
        total = 0
        for st in self.state.values():
            for value in st.values():
                if isinstance(value, Tensor):
                    value = local(value)  # this rank's shard of a DTensor state
                    total += value.numel() * value.element_size()
        return total

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only; loads with ``torch.load(..., weights_only=True)``."""
        sd = super().state_dict()
        sd["dion_lp"] = {
            "version": STATE_DICT_VERSION,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "comm_stats": self._stats.state_dict(),
            "world_size": self._world_size,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`, keeping every tensor's dtype.

        Raises:
            ValueError: the state was saved by another optimizer or version, for
                other parameters, or with another layout (algorithm, momentum_dtype,
                block_size, rank); nothing is changed then.
        """
        check_loadable(state_dict, self.param_groups)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype: undo it for codes.
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[p] = {k: copy_value(v, p.device) for k, v in saved.items()}
        for group in self.param_groups:
            validate_group(group)
            for st in (self.state[p] for p in group["params"] if p in self.state):
                check_loaded_state(st, group)
        meta = state_dict["dion_lp"]
        if "comm_stats" in meta:
            self._stats.load_state_dict(meta["comm_stats"])
        self._generators = {}
        for key, gen_state in meta.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(gen_state.clone())


def _resolve_process_group(process_group: Any) -> tuple[Any, int]:
    """(group, world size): the default group when initialised with > 1 rank and none given."""
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialised or dist.get_world_size() == 1:
            return None, 1
        return dist.group.WORLD, dist.get_world_size()
    if not initialised:
        raise ValueError(
            f"Invalid process_group: {process_group!r}; torch.distributed is not initialised"
        )
    check_member(process_group, "process_group")
    return process_group, dist.get_world_size(process_group)


def initial_right_factor(n: int, r: int, *, seed: int, index: int) -> Tensor:
    """The seeded random start of Q for the parameter at position ``index``.

    Drawn on the CPU from a generator seeded by ``(seed, index)``, so it is the
    same on every rank and every device, whatever order states are created in.

    Returns:
        Shape (n, r), float32, unit-norm columns.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + index) % (2**63))
    Q = torch.randn(n, r, generator=gen, dtype=torch.float32)
    return Q / torch.linalg.vector_norm(Q, dim=0, keepdim=True)


def _apply_update_(X: Tensor, update: Tensor, group: dict[str, Any], scale: float) -> None:
    """X = X (1 - lr wd) - scale * update, in fp32, written in X's dtype."""
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if X.dtype == torch.float32:
        X.mul_(decay).add_(update, alpha=-scale)
    else:
        X.copy_(X.float().mul_(decay).add_(update, alpha=-scale))


def _check_param(p: Tensor, group: dict[str, Any], i: int) -> None:
    """Reject parameters the group's algorithm cannot handle, naming them."""
    if not p.is_floating_point():
        raise ValueError(f"Invalid parameter {_name(group, i)}: dtype {p.dtype} is not floating")
    if group["algorithm"] != "dion":
        return
    if p.ndim != 2:
        raise ValueError(
            f"Invalid parameter {_name(group, i)} in a dion group: shape {tuple(p.shape)}; "
            "Dion takes 2-D matrices, put other tensors in an 'adamw' or 'lion' group "
            "(dion_lp.param_groups does this)"
        )
    if min(p.shape) < 2:
        raise ValueError(
            f"Invalid parameter {_name(group, i)} in a dion group: shape {tuple(p.shape)} "
            "has a dimension of 1; such vectors belong to an 'adamw' or 'lion' group"
        )


def _overflows(grad: Tensor) -> Tensor:
    """0-d bool: does ``grad`` hold NaN, Inf or an entry above GRAD_LIMIT in magnitude?"""
    if grad.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=grad.device)
    return ~(grad.abs().amax() <= GRAD_LIMIT)  # NaN compares False: caught too


def _name(group: dict[str, Any], i: int) -> str:
    names = group.get("param_names")
    return f"{names[i]!r}" if names else f"#{i} of its param group"
