"""The Dion optimizer class: param groups, dispatch to the algorithms, state_dict.

Dion (Ahn, Xu et al., arXiv 2504.05295, Algorithm 1) updates each 2-D weight
with an orthonormalized rank-r factorisation of its momentum
(:mod:`dion_lp.algorithms.dion`); every other parameter uses an element-wise
rule, AdamW or Lion (:mod:`dion_lp.algorithms.elementwise`), in the same
optimizer. The step runs over a layout: whole matrices, optionally averaged
over replicas (:mod:`dion_lp.layouts.local`), or FSDP2 shards
(:mod:`dion_lp.layouts.sharded`). This class only sorts parameters into those.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _pickling, checkpoint
from .algorithms.dion import DionMatrix, dion_step_, init_dion_state
from .algorithms.dion2 import dion2_step_
from .algorithms.dion2_rows import dion2_rows_step_
from .algorithms.elementwise import elementwise_step_
from .dist.accounting import CommStats
from .dist.collectives import check_member, quantized_mean_
from .dist.dtensor import local
from .gradients import finite_gradients
from .groups import checked_group
from .layouts.local import LocalLayout
from .layouts.placement import placement
from .layouts.sharded import ShardedLayout, check_replicas
from .options import check_seed, owns_exchange

__all__ = ["Dion"]


class Dion(torch.optim.Optimizer):
    """Dion with low-precision state, for 2-D weights; AdamW or Lion for the rest.

    Args:
        params: tensors, named tensors, or param-group dicts. A group's
            ``"algorithm"`` is ``"dion"`` (2-D matrices), ``"dion2"``, ``"nordion2"``
            or ``"muon"`` (2-D matrices, whole: not FSDP2; :mod:`dion_lp.algorithms.dion2`),
            ``"adamw"`` or ``"lion"``; any keyword below can be overridden per
            group. Use :func:`dion_lp.param_groups` to split a model the usual way.
        lr: learning rate (Dion's update has RMS ~ lr, like Muon's).
        mu: Dion momentum coefficient in [0, 1); for "dion2" / "nordion2" the decay
            of the selected slices of the momentum (their ``ef_decay``), for "muon"
            its momentum.
        weight_decay: decoupled: ``X <- X (1 - lr wd)``.
        betas, eps: of the element-wise rules (Lion uses betas, not eps);
            "nordion2" uses ``betas[1]`` for its per-row second moment.
        rank_fraction: r = ceil(rank_fraction * min(m, n)), in (0, 1]; for "dion2"
            the fraction of slices (rows or columns, along the short side) updated.
        rank_multiple_of: r is rounded up to a multiple of this (>= 1), capped at min(m, n).
        momentum_dtype: storage of the momentum and of the element-wise states:
            "fp32", "bf16", "int8", "fp8_e4m3", "dynamic8", "int4" or "fp4_e2m1"
            (two codes a byte; AdamW's second moment then stays in the unsigned
            dynamic8).
        comm_dtype: wire format of the factor exchange: "fp32", "bf16",
            "fp8_e4m3", "fp8_e5m2".
        stochastic_rounding: round low-precision state stochastically (unbiased).
        weight_rounding: how an update is written into a bf16 parameter:
            ``"nearest"`` (default; updates under half a bf16 step are lost) or
            ``"stochastic"`` (unbiased: kept in expectation; the random bits of
            the state codecs, so resume stays exact). fp32 parameters are
            updated exactly either way; float16 ones only with "nearest".
        dion2_exchange: how replicas share a "dion2" / "nordion2" matrix:
            ``"mean_gradient"`` (default: its gradient is averaged whole, by DDP,
            the hook or ``grad_sync``) or ``"selected_rows"`` (each rank keeps its
            own momentum; only a 16-column sketch and the selected rows travel,
            the rows in ``comm_dtype``: :mod:`dion_lp.algorithms.dion2_rows`).
        momentum_residual: keep what rounding the momentum dropped in a bf16
            buffer and add it back next step (an ablation of SR alone).
        block_size: quantization block of the 8-bit states (elements per scale
            along a row).
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

    Copies: ``copy.deepcopy`` copies everything (state, groups, seed, parameter
    indices, counters) but the process group, which the copy shares: it is
    replicated over the same ranks. ``pickle`` / ``torch.save`` keep the process
    group only when it is the default group; the restored optimizer averages over
    the default group of the process that restores it (single-process when
    torch.distributed is not initialised there; a warning says when the world
    size changed). Pickling a Dion on any other group raises ``ValueError``:
    save its ``state_dict()`` instead. Hooks are not copied (as torch's).
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
        weight_rounding: str = "nearest",
        dion2_exchange: str = "mean_gradient",
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
            weight_rounding=weight_rounding,
            dion2_exchange=dion2_exchange,
            momentum_residual=momentum_residual,
            block_size=block_size,
            algorithm=algorithm,
            nonfinite=nonfinite,
        )
        if not isinstance(grad_sync, bool):
            raise ValueError(f"Invalid grad_sync: {grad_sync!r}; expected a bool")
        self._seed = check_seed(seed)
        self._next_index = 0
        self._param_index: dict[int, int] = {}
        self._group, self._world_size = _resolve_process_group(process_group)
        self._replicas = None if process_group is None else self._group  # sharded: HSDP replicas
        self._grad_sync = grad_sync
        self._stats = CommStats()
        super().__init__(params, defaults)

    # ------------------------------------------------------------ properties
    @property
    def process_group(self) -> Any:
        """The replicas' process group (None when not replicated)."""
        return self._group

    @property
    def world_size(self) -> int:
        """Number of replicas that average Dion's factors (1: not replicated)."""
        return self._world_size

    @property
    def grad_sync(self) -> bool:
        """Whether Dion averages the element-wise params' gradients itself."""
        return self._grad_sync

    @property
    def seed(self) -> int:
        """The seed of Q and of the stochastic rounding."""
        return self._seed

    def param_index(self, p: Tensor) -> int:
        """The position of ``p`` in this optimizer (seeds its Q and its rounding)."""
        return self._param_index[id(p)]

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does, once every check passed.

        The defaults are filled in, then every hyperparameter, every parameter and
        their device are checked (:func:`dion_lp.groups.checked_group`); a refused
        group leaves the optimizer (and ``param_group``) as they were. A group
        without ``param_names`` joining groups with names
        (:func:`dion_lp.param_groups`) is named ``"group{g}.param{i}"``.

        Raises:
            ValueError: naming the argument or parameter and its value.
        """
        param_group.update(checked_group(param_group, self.defaults, self.param_groups))
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._param_index[id(p)] = self._next_index
            self._next_index += 1

    # ----------------------------------------------------------------- copies
    def __getstate__(self) -> dict[str, Any]:
        """Everything but hooks; the process group only if it is the default one (see class doc)."""
        return _pickling.get_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _pickling.set_state(self, state)

    def __deepcopy__(self, memo: dict[int, Any]) -> Dion:
        """A copy with its own state and parameters (memo-shared), sharing the process group."""
        return _pickling.deepcopy_optimizer(self, memo)

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.

        Raises:
            RuntimeError: :func:`dion_lp.step_in_backward` steps this optimizer
                inside ``backward()`` (a second step here would step twice).
        """
        if getattr(self, "_in_backward", None) is not None:
            raise RuntimeError(
                "Dion.step() called while dion_lp.step_in_backward(opt) is active: every "
                "parameter is stepped inside backward() as its gradient arrives, so remove "
                "the opt.step() call from the loop (or call handle.remove() to step here)"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_params(self._finite_grads())
        self._stats.end_step()
        return loss

    @torch.no_grad()
    def _step_params(self, items: list[tuple[dict[str, Any], Tensor, Tensor]]) -> None:
        """Step the given (group, param, grad) triples (:meth:`_finite_grads`) in place.

        In one process parameters are independent (each Dion matrix steps alone):
        stepping subsets, in any order, gives the bits of one whole step
        (:func:`dion_lp.step_in_backward`). Closing the step in the byte counters
        is the caller's (``self._stats.end_step()``).
        """
        local_mats: list[DionMatrix] = []
        shard_parts: dict[tuple[int, ...], list[DionMatrix]] = {}
        per_param = []
        for group, p, grad in items:
            place, index, st = placement(p), self._param_index[id(p)], self.state[p]
            if place.sharded:
                check_replicas(place, self._replicas)
            if group["algorithm"] != "dion":
                per_param.append((group, p, local(grad), place, index))
                continue
            if not st:
                init_dion_state(p, group, st, seed=self._seed, index=index, place=place)
            mat = DionMatrix(p, local(grad), group, st, index, place)
            if place.sharded:
                key = tuple(dist.get_process_group_ranks(place.shard_group))
                shard_parts.setdefault(key, []).append(mat)
            else:
                local_mats.append(mat)
        compressed = self._world_size > 1 and any(owns_exchange(item[0]) for item in per_param)
        if compressed:  # selected-rows Dion2: its gradients stay local, its rows travel
            rows = [item for item in per_param if owns_exchange(item[0])]
            per_param = [item for item in per_param if not owns_exchange(item[0])]
            items = [(g, p, grad, self.state[p], i) for g, p, grad, _, i in rows]
            dion2_rows_step_(items, self._group, self._stats, seed=self._seed)
        self._sync_per_param_grads(per_param)
        for group, p, grad, place, index in per_param:  # element-wise rules, Dion2, Muon
            rule = elementwise_step_ if group["algorithm"] in ("adamw", "lion") else dion2_step_
            rule(p, grad, group, self.state[p], place=place, seed=self._seed, index=index)
        layout = LocalLayout(self._group, self._world_size, self._stats)
        # Replicas exchange every matrix's factors in one collective per phase; without
        # replicas one matrix at a time bounds the fp32 working copies of the momenta.
        chunks = [local_mats] if self._world_size > 1 else [[mat] for mat in local_mats]
        for chunk in chunks:
            if chunk:
                dion_step_(chunk, layout, seed=self._seed)
        for part in shard_parts.values():
            sharded = ShardedLayout(part[0].place.shard_group, self._replicas, self._stats)
            dion_step_(part, sharded, seed=self._seed)

    def _finite_grads(self) -> list[tuple[dict[str, Any], Tensor, Tensor]]:
        """(group, param, grad) of every param to step (:func:`finite_gradients`)."""
        return finite_gradients(self.param_groups, self._group, self._world_size, self._stats)

    def _sync_per_param_grads(self, items: list[tuple[Any, ...]]) -> None:
        """Average the gradients of the params stepped one at a time (element-wise rules,
        Dion2 and Muon with averaged gradients) over the replicas (grad_sync=True).

        Plain params average over the optimizer's group; sharded ones over the HSDP
        replicas given as ``process_group``.
        """
        if not self._grad_sync:
            return
        by_key: dict[tuple[bool, str], list[Tensor]] = {}
        items[:] = [(g, p, grad.float(), pl, i) for g, p, grad, pl, i in items]  # averaged in fp32
        for group, _, grad, place, _ in items:
            fmt = "fp32" if group["comm_dtype"] == "fp32" else "bf16"
            by_key.setdefault((place.sharded, fmt), []).append(grad)
        for (sharded, fmt), grads in by_key.items():
            over = self._replicas if sharded else self._group
            if over is not None and (sharded or self._world_size > 1):
                quantized_mean_(grads, fmt, over, self._stats)

    # ----------------------------------------------------------- bookkeeping
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
        same world size instead, save each rank's own ``state_dict``. Plain FSDP
        and native HSDP momenta are single global momenta already: not sent.
        """
        checkpoint.synchronize_momenta(self, self._group, self._replicas, self._stats)

    def state_bytes(self) -> int:
        """Bytes of every tensor of this rank's optimizer state (codes, scales, Q, residuals)."""
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
            "version": checkpoint.STATE_DICT_VERSION,
            "comm_stats": self._stats.state_dict(),
            "world_size": self._world_size,
            "seed": self._seed,  # the rounding bits are a function of it: resume needs it
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`, keeping every tensor's dtype.

        Everything is checked before anything changes
        (:func:`dion_lp.checkpoint.check_loadable`).

        Raises:
            ValueError: the state was saved by another optimizer or version, for
                other parameters (another count, shape, or order of groups), or with
                another layout (algorithm, momentum_dtype, block_size, rank); the
                message names the parameter or key. A state dict of dion_lp 0.1.0 is
                refused with the converter to use
                (:func:`dion_lp.checkpoint.upgrade_state_dict`).
        """
        self._load_state_dict(state_dict, copy=True)

    def _load_state_dict(self, state_dict: dict[str, Any], *, copy: bool) -> None:
        """:meth:`load_state_dict`; ``copy=False`` adopts the state tensors (fresh DCP ones)."""
        state_dict = state_dict.copy()  # torch's load pre-hooks run first, as torch runs them
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        state_dict = checkpoint.with_added_hyperparameters(state_dict)
        checkpoint.check_loadable(state_dict, self.param_groups)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        hooks, self._optimizer_load_state_dict_pre_hooks = (
            self._optimizer_load_state_dict_pre_hooks,
            OrderedDict(),
        )
        try:  # the pre-hooks ran already
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        # torch casts floating state to the parameter's dtype: undo it for codes.
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[p] = {
                    k: checkpoint.copy_value(v, local(p).device, copy) for k, v in saved.items()
                }
        meta = state_dict["dion_lp"]
        if "comm_stats" in meta:
            self._stats.load_state_dict(meta["comm_stats"])
        if "seed" in meta:
            self._seed = int(meta["seed"])


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
