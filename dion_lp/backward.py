"""The optimizer step inside backward: each parameter steps as soon as its gradient is whole.

torch's "optimizer step in backward" pattern (used by torchtune): a
post-accumulate-grad hook on every parameter runs that parameter's update and
frees its gradient, so the gradients of the whole model never coexist; peak
gradient memory drops from the whole model to about one parameter. It fits Dion
in one process: without replicas each Dion matrix is stepped alone
(:meth:`dion_lp.Dion.step`), and AdamW / Lion are element-wise, so a step taken
one parameter at a time, in the order backward reaches them, gives the ordinary
step's bits: every rounding bit is a function of (seed, parameter, the
parameter's own step count, buffer), never of the order. ::

    opt = dion_lp.Dion(dion_lp.param_groups(model), momentum_dtype="int8")
    with dion_lp.step_in_backward(opt, model):
        for batch in loader:
            loss_fn(model(batch)).backward()  # steps every parameter; no opt.step()
            scheduler.step()  # LR schedulers work: each hook reads its current group

What cannot work, and is refused where it can be detected:

- Anything needing every gradient at once. Clipping by global norm needs the norm
  of all gradients before the first update, but the first parameter is updated
  (and its gradient freed) before the last gradient exists; ``clip_grad_norm_``
  after ``backward()`` finds no gradients and silently returns 0. The optimizer's
  step pre/post hooks (where clipping or EMA updates are usually registered) would
  never run: an optimizer with such hooks is refused. Clip per parameter inside
  the model instead (e.g. ``p.register_hook(lambda g: g.clamp(-c, c))``), or use
  the ordinary loop.
- More than one process. Replicas (``opt.world_size > 1``) exchange every matrix's
  factors in one collective per step, FSDP2 shards (DTensor parameters) orthonormalize
  across ranks, ``grad_sync=True`` averages the element-wise gradients in one
  collective, and DDP (or FSDP) all-reduces gradients in buckets as backward runs:
  each needs the ranks to step the same parameters together, which hooks firing
  in each rank's own order cannot promise.
- Reentrant activation checkpointing (``use_reentrant=True``) runs a backward
  inside the backward; each would count as a backward pass (the default,
  non-reentrant checkpointing, is fine).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from .dist.dtensor import is_sharded
from .gradients import NonFiniteGradientError, finite_gradients
from .optimizer import Dion

__all__ = ["StepInBackward", "step_in_backward"]


def step_in_backward(
    opt: Dion, model: nn.Module | None = None, *, accumulation_steps: int = 1
) -> StepInBackward:
    """Step every parameter of ``opt`` inside ``backward()``, as its gradient is accumulated.

    Each parameter of ``opt`` that requires grad (Dion matrices of any (m, n), and
    element-wise params of any shape) gets a post-accumulate-grad hook. On every
    ``accumulation_steps``-th backward pass (one that reaches at least one of the
    optimizer's parameters) the hook checks the gradient as :meth:`Dion.step` does
    (:func:`dion_lp.gradients.finite_gradients`), steps the parameter with the
    hyperparameters its group holds at that moment, and sets its ``.grad`` to
    None; on the other passes the gradient accumulates in ``.grad``. At the end of
    the stepping pass, any parameter of ``opt`` still holding a gradient (one that
    received gradients earlier in the window but not in this pass, or one added
    with ``add_param_group`` after this call, hence without a hook) is stepped
    too. Parameters, states, ``state_dict()`` and ``comm_stats()`` equal those of
    ``accumulation_steps`` x ``loss.backward()``, then ``opt.step()``, ``opt.zero_grad()``,
    bit for bit; ``comm_stats()["steps"]`` counts optimizer steps, as that loop does.

    ``opt.step()`` raises ``RuntimeError`` while the handle is active: a loop that
    still calls it would otherwise step twice (an error is cheaper to find than a
    silent no-op that hides which of the two loops runs). ``opt.zero_grad()`` is
    harmless (in the middle of an accumulation window it drops the accumulated
    gradients, as in the ordinary loop). Non-finite gradients: with
    ``nonfinite="raise"`` the hook raises :class:`NonFiniteGradientError` out of
    ``backward()`` naming the parameter before anything of it changes (parameters
    reached earlier in that pass are stepped already; call ``opt.zero_grad()``
    before the next batch, which starts a new accumulation window); with ``"skip"``
    that parameter is left as it is and its gradient dropped. The optimizer's step
    hooks would not run (refused, see below).

    Args:
        opt: the single-process :class:`dion_lp.Dion` to step.
        model: the model being trained (optional): only checked, to refuse DDP or
            FSDP wrappers around or inside it.
        accumulation_steps: backward passes per optimizer step (>= 1).

    Returns:
        A :class:`StepInBackward` handle; ``handle.remove()`` (or leaving its
        ``with`` block) restores the ordinary ``opt.step()``.

    Raises:
        ValueError: naming the argument and the reason, when ``opt`` is not a Dion,
            is replicated (``world_size > 1``), has ``grad_sync=True``, holds a
            DTensor (FSDP2) parameter, has step pre/post hooks (e.g. clipping by
            global norm) or already steps in backward; when ``model`` is wrapped in
            DistributedDataParallel or FSDP; when ``accumulation_steps`` is not an
            integer >= 1.
    """
    _check_optimizer(opt)
    _check_model(model)
    if (
        isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int)
        or accumulation_steps < 1
    ):
        raise ValueError(
            f"Invalid accumulation_steps: {accumulation_steps!r}; expected an integer >= 1"
        )
    return StepInBackward(opt, accumulation_steps)


class StepInBackward:
    """The hooks :func:`step_in_backward` registered; ``remove()`` them (or use ``with``).

    Removing the hooks in the middle of an accumulation window leaves the
    accumulated gradients in ``.grad``, for an ordinary ``opt.step()`` to take.
    """

    def __init__(self, opt: Dion, accumulation_steps: int) -> None:
        self._opt = opt
        self._accumulation_steps = accumulation_steps
        self._backwards = 0  # finished backward passes that reached a parameter
        self._task: int | None = None  # autograd graph task of the pass under way
        self._where: dict[int, tuple[int, int]] = {}  # id(p) -> (group index, position)
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for group in opt.param_groups
            for p in group["params"]
            if p.requires_grad
        ]
        opt._in_backward = self  # Dion.step() refuses to run while this is set

    @property
    def accumulation_steps(self) -> int:
        """Backward passes per optimizer step."""
        return self._accumulation_steps

    @property
    def backwards(self) -> int:
        """Backward passes that reached the optimizer's parameters since registration.

        A pass aborted by :class:`NonFiniteGradientError` counts (it ends its window).
        """
        return self._backwards

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (False after :meth:`remove`)."""
        return getattr(self._opt, "_in_backward", None) is self

    def remove(self) -> None:
        """Remove every hook; ``opt.step()`` works again. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.active:
            del self._opt._in_backward

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    # ------------------------------------------------------------- in backward
    def _on_grad(self, p: Tensor) -> None:
        """Post-accumulate-grad hook of ``p``: step it on a stepping pass, else let it add up."""
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first hook of a new backward pass
            self._task = task
            Variable._execution_engine.queue_callback(self._end_backward)
        if (self._backwards + 1) % self._accumulation_steps:
            return
        where = self._locate(p)
        if where is not None:
            self._step_one(p, *where)

    def _step_one(self, p: Tensor, g: int, i: int) -> None:
        """Check and step parameter ``i`` of group ``g`` (``p``), then free its gradient."""
        group = self._opt.param_groups[g]
        names = group.get("param_names")
        label = names[i] if names else f"#{i} of param group {g}"
        alone = {**group, "params": [p], "param_names": [label]}
        try:
            found = finite_gradients([alone], None, 1, self._opt._stats)
        except NonFiniteGradientError as err:
            self._task = None  # this pass ends here, and with it the accumulation window
            self._backwards += 1  # it was the window's last pass: counted as finished
            message = str(err).replace(
                "nothing was updated",
                "it was not updated (parameters whose gradients arrived earlier in this "
                "backward pass were; call opt.zero_grad() before the next pass)",
            )
            raise NonFiniteGradientError(message) from None
        self._opt._step_params([(group, p, grad) for _, p, grad in found])
        p.grad = None  # stepped, or skipped (nonfinite="skip"): opt.zero_grad()'s None

    def _end_backward(self) -> None:
        """End of a backward pass: on a stepping pass, step the leftovers and close the step."""
        self._task = None
        self._backwards += 1
        if self._backwards % self._accumulation_steps:
            return
        opt = self._opt
        left = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if left:  # gradients from earlier passes of the window only, or params without hooks
            opt._step_params(opt._finite_grads())
            for p in left:
                p.grad = None
        opt._stats.end_step()
        opt._opt_called = True  # as torch's LR schedulers mark a step (no "step() first" warning)

    def _locate(self, p: Tensor) -> tuple[int, int] | None:
        """(group index, position) of ``p`` in the optimizer now; None if it left it."""
        groups = self._opt.param_groups
        where = self._where.get(id(p))
        if where is not None:
            g, i = where
            if g < len(groups) and i < len(groups[g]["params"]) and groups[g]["params"][i] is p:
                return where
        self._where = {
            id(q): (g, i) for g, group in enumerate(groups) for i, q in enumerate(group["params"])
        }
        return self._where.get(id(p))


def _check_optimizer(opt: Any) -> None:
    """Refuse what cannot step one parameter at a time in one process (ValueError)."""
    if not isinstance(opt, Dion):
        raise ValueError(f"Invalid opt: a {type(opt).__name__}; expected a dion_lp.Dion")
    if getattr(opt, "_in_backward", None) is not None:
        raise ValueError(
            "Invalid opt: it steps in backward already (an active step_in_backward handle); "
            "remove that handle first, or every parameter would step twice"
        )
    if opt.world_size > 1:
        raise ValueError(
            f"Invalid opt: replicated over world_size={opt.world_size} ranks; replicas "
            "exchange every matrix's factors in one collective per step, which needs every "
            "gradient at once (step_in_backward is for one process)"
        )
    if opt.grad_sync:
        raise ValueError(
            "Invalid opt: grad_sync=True averages the element-wise gradients over replicas "
            "in one collective per step (step_in_backward is for one process)"
        )
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if is_sharded(p):
                names = group.get("param_names")
                name = repr(names[i]) if names else f"#{i} of param group {g}"
                raise ValueError(
                    f"Invalid opt: parameter {name} is a DTensor (FSDP2 shard); sharded Dion "
                    "orthonormalizes across the shard ranks, which must step together "
                    "(step_in_backward is for one process)"
                )
    pre, post = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    if pre or post:
        raise ValueError(
            f"Invalid opt: it has {pre} step pre-hook(s) and {post} step post-hook(s), "
            "which would never run (no opt.step() call); e.g. clipping by global norm "
            "needs every gradient at once, but each is freed as its parameter steps"
        )


def _check_model(model: Any) -> None:
    """Refuse a model that is not a Module, or is or holds a DDP / FSDP wrapper (ValueError)."""
    if model is None:
        return
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: a {type(model).__name__}; expected a torch.nn.Module")
    for name, module in model.named_modules():
        if isinstance(module, _wrappers()):
            where = "the model itself" if not name else f"its submodule {name!r}"
            raise ValueError(
                f"Invalid model: {where} is a {type(module).__name__}, which reduces "
                "gradients across ranks as backward runs (step_in_backward is for one "
                "process; step with opt.step() under DDP / FSDP)"
            )


def _wrappers() -> tuple[type, ...]:
    """The data-parallel wrapper classes this torch build has."""
    found: list[type] = [nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return tuple(found)
    return (*found, FullyShardedDataParallel, FSDPModule)
