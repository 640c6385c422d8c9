"""A non-finite gradient on one rank must not poison the DDP hooks' state.

The hooks keep per-parameter error-feedback residuals (and, with
``lowrank_rank``, warm-started factors) from step to step. A NaN batch on one rank
makes the step's mean non-finite on every rank (so the optimizer can raise or
skip, consistently); the state carried to the next step must be what it was
before that step, or every later step would be NaN too.

Independent expectation: the same run in which the poisoned step never happened.
"""

from __future__ import annotations

import pytest
import torch
from _dist import spawn_fixture
from _models import VOCAB, EmbedNet
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dion_lp
from dion_lp import hooks

dist_results = spawn_fixture(__name__, world_sizes=(2, 3))

BATCH, STEPS, POISONED = 12, 5, 2


def _batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(VOCAB, (2, BATCH), generator=gen)


def _train(rank, world_size, kind, poison):
    """STEPS steps; with ``poison`` the last rank's loss is NaN at step POISONED,
    without it that step is left out. Returns (params, hook state dict, grads seen)."""
    torch.manual_seed(0)
    model = DistributedDataParallel(EmbedNet())
    if kind == "compress_wrapper":
        opt = None
        state = hooks.CompressState(comm_dtype="bf16")
        state.bind(model)
        model.register_comm_hook(state, hooks.compress_wrapper(_allreduce))
    elif kind.startswith("compress"):
        opt = None  # no optimizer: the hook alone is under test
        state = hooks.register_ddp(model, None, comm_dtype="fp8_e4m3", lowrank_rank=_rank(kind))
    else:
        opt = dion_lp.Dion(dion_lp.param_groups(model.module), lr=0.01, nonfinite="skip")
        state = hooks.register_ddp(model, opt, comm_dtype="fp8_e4m3", lowrank_rank=_rank(kind))
    seen = []
    for step in range(STEPS):
        if step == POISONED and not poison:
            continue
        x, y = _batch(rank, step)
        loss = nn.functional.cross_entropy(model(x), y)
        if step == POISONED and rank == world_size - 1:
            loss = loss * float("nan")
        loss.backward()
        seen.append({n: p.grad.clone() for n, p in model.module.named_parameters()})
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
    params = [p.detach().clone() for p in model.module.parameters()]
    return params, state.state_dict(), seen


def _rank(kind):
    return 2 if kind.endswith("lowrank") else 0


def _allreduce(process_group, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.allreduce_hook(process_group, bucket)


KINDS = ("dion", "dion_lowrank", "compress", "compress_lowrank", "compress_wrapper")


def case_poisoned(rank, world_size):
    return {
        kind: (_train(rank, world_size, kind, True), _train(rank, world_size, kind, False))
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_nan_step_leaves_the_hook_state_as_it_was(dist_results, kind):
    for (params, saved, seen), (ref_params, ref_saved, ref_seen) in (
        r[kind] for r in dist_results["case_poisoned"]
    ):
        # the poisoned step reached the optimizer as non-finite, on every rank
        poisoned = seen[POISONED]
        assert any(not torch.isfinite(g).all() for g in poisoned.values())
        # ... and nothing after it did; the state is the one of the run without it
        for name, t in saved["residuals"].items():
            assert torch.isfinite(t).all(), name
            assert torch.equal(t, ref_saved["residuals"][name]), name
        for name, t in saved.get("lowrank_q", {}).items():
            assert torch.equal(t, ref_saved["lowrank_q"][name]), name
        after = seen[POISONED + 1 :]
        for got, want in zip(after, ref_seen[POISONED:], strict=True):
            for name in got:
                if kind.startswith("dion") and name == "hidden.weight":
                    continue  # Dion's own gradient stays local: the poisoned rank's is NaN once
                assert torch.equal(got[name], want[name]), name
        if kind.startswith("dion"):  # Dion skipped the step on every rank
            assert all(torch.equal(a, b) for a, b in zip(params, ref_params, strict=True))
