"""dion_lp.step_in_backward: the step inside backward equals the ordinary loop bit for bit.

Every test runs the same model twice from the same seed, once with
``loss.backward(); opt.step(); opt.zero_grad()`` and once with the step inside
backward, and compares the parameters and every tensor of ``opt.state_dict()``
(and the byte counters) with ``torch.equal``. Then the refusals, and a count of
the gradients that coexist during backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from _dist import spawn_fixture
from _models import MOMENTUM_FORMATS, small_mlp
from torch import nn

import dion_lp

dist_results = spawn_fixture(__name__, world_sizes=(2,))


class Branchy(nn.Module):
    """small_mlp plus a side matrix used on odd micro-batches only (2-D: Dion's)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = small_mlp(seed=0)
        self.side = nn.Linear(96, 96, bias=False)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.mlp(self.side(x) if step % 2 else x)


def _opt(model, fmt="fp32", named=False, **kw):
    """Dion matrices, an AdamW group and a Lion group; ``named``: via dion_lp.param_groups."""
    kw = {**dict(lr=0.02, rank_fraction=0.5, momentum_dtype=fmt, seed=3), **kw}
    kw.setdefault("momentum_residual", fmt != "fp32")
    if named:
        return dion_lp.Dion(dion_lp.param_groups(model, scalar_algorithm="adamw"), **kw)
    mlp = model.mlp if isinstance(model, Branchy) else model
    dion = [mlp[0].weight, mlp[2].weight] + ([model.side.weight] if mlp is not model else [])
    groups = [
        {"params": dion, "algorithm": "dion"},
        {"params": [mlp[0].bias, mlp[1].weight, mlp[1].bias], "algorithm": "adamw"},
        {"params": [mlp[2].bias, mlp[3].weight, mlp[3].bias], "algorithm": "lion", "lr": 1e-3},
    ]
    return dion_lp.Dion(groups, **kw)


def _loss(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 96, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    out = model(x, step) if isinstance(model, Branchy) else model(x)
    return nn.functional.cross_entropy(out, y)


def _ordinary(model, opt, steps, accumulation_steps=1, scheduler=None):
    for step in range(steps):
        for micro in range(accumulation_steps):
            _loss(model, step * accumulation_steps + micro).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _in_backward(model, opt, steps, accumulation_steps=1, scheduler=None):
    with dion_lp.step_in_backward(opt, model, accumulation_steps=accumulation_steps) as handle:
        for step in range(steps):
            for micro in range(accumulation_steps):
                _loss(model, step * accumulation_steps + micro).backward()
            if scheduler is not None:
                scheduler.step()
        assert handle.backwards == steps * accumulation_steps
    assert not handle.active


def _assert_equal(a, b, where="state_dict"):
    """Equal nested dicts / lists / tensors (tensors bit for bit, same dtype)."""
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_run(model, opt, model2, opt2):
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2), name
        assert p2.grad is None, name
    _assert_equal(opt.state_dict(), opt2.state_dict())
    assert opt.comm_stats() == opt2.comm_stats()


def _twins(make_model=small_mlp, **kw):
    model = make_model()
    model2 = copy.deepcopy(model)
    return model, _opt(model, **kw), model2, _opt(model2, **kw)


@pytest.mark.parametrize("fmt", MOMENTUM_FORMATS)
def test_equals_the_ordinary_loop_bit_for_bit(fmt):
    model, opt, model2, opt2 = _twins(fmt=fmt)
    _ordinary(model, opt, 3)
    _in_backward(model2, opt2, 3)
    _assert_same_run(model, opt, model2, opt2)
    assert opt2.comm_stats()["steps"] == 3  # one step per backward pass
    _ordinary(model, opt, 1)  # after remove(): the ordinary loop again
    _ordinary(model2, opt2, 1)
    _assert_same_run(model, opt, model2, opt2)


@pytest.mark.parametrize("fmt", ["fp32", "int8", "dynamic8"])
def test_accumulation_equals_the_ordinary_accumulating_loop(fmt):
    """The side matrix gets gradients on odd micro-batches only: with 2 per step the last
    micro-batch of each step reaches it; with 3 the first step (micro-batches 0, 1, 2) ends
    without it, so it is stepped at the end of the pass from micro-batch 1's gradient."""
    for accumulation_steps in (2, 3):
        model, opt, model2, opt2 = _twins(Branchy, fmt=fmt)
        _ordinary(model, opt, 2, accumulation_steps)
        _in_backward(model2, opt2, 2, accumulation_steps)
        _assert_same_run(model, opt, model2, opt2)
        assert opt2.comm_stats()["steps"] == 2  # one per optimizer step, as in the loop


def test_a_scheduler_and_group_changes_are_read_by_the_hooks():
    model, opt, model2, opt2 = _twins(fmt="int8")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    _ordinary(model, opt, 3, scheduler=sched)
    _in_backward(model2, opt2, 3, scheduler=sched2)
    _assert_same_run(model, opt, model2, opt2)
    for o in (opt, opt2):  # a hyperparameter changed by hand, and a group added later
        o.param_groups[1]["weight_decay"] = 0.5
        extra = nn.Parameter(torch.ones(5))
        o.add_param_group({"params": [extra], "algorithm": "lion"})
    for o in (opt, opt2):
        o.param_groups[-1]["params"][0].grad = torch.full((5,), 0.5)
    _ordinary(model, opt, 1)
    _in_backward(model2, opt2, 1)  # the extra parameter has no hook: stepped at the end
    _assert_same_run(model, opt, model2, opt2)
    assert torch.equal(opt.param_groups[-1]["params"][0], opt2.param_groups[-1]["params"][0])


def test_step_refuses_while_active_and_works_after_remove():
    model, opt, _, _ = _twins()
    handle = dion_lp.step_in_backward(opt)
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match=r"step\(\) called while dion_lp.step_in_backward"):
        opt.step()
    copy.deepcopy(opt).step()  # copies never step in backward (hooks are not copied)
    handle.remove()
    handle.remove()  # idempotent
    assert set(vars(opt)) == set(vars(_opt(small_mlp()))) | {"_opt_called"}
    _loss(model, 1).backward()
    opt.step()
    assert opt.comm_stats()["steps"] == 2


def test_a_nonfinite_gradient_raises_naming_it_before_it_changes():
    model = small_mlp()
    opt = _opt(model, "int8", named=True)
    _in_backward(model, opt, 1)
    bad = model[2].weight
    before = bad.detach().clone(), copy.deepcopy(dict(opt.state[bad]))
    hook = bad.register_hook(lambda g: g * float("nan"))
    with dion_lp.step_in_backward(opt, model, accumulation_steps=2) as handle:
        _loss(model, 1).backward()  # accumulates
        with pytest.raises(
            dion_lp.NonFiniteGradientError, match=r"'2\.weight'.*it was not updated"
        ):
            _loss(model, 2).backward()
        assert handle.backwards == 2  # the aborted pass ended its window
        assert torch.equal(bad, before[0])
        _assert_equal(dict(opt.state[bad]), before[1])
        assert opt.comm_stats()["steps"] == 1  # as step() raising: no step counted
        opt.zero_grad()
        hook.remove()
        _loss(model, 3).backward()  # a new window: accumulates, then steps
        assert opt.state[bad]["step"] == 1
        _loss(model, 4).backward()
    assert opt.state[bad]["step"] == 2 and opt.comm_stats()["steps"] == 2


def test_a_nonfinite_gradient_is_skipped_as_step_skips_it():
    model, opt, model2, opt2 = _twins(fmt="fp8_e4m3", nonfinite="skip")
    for m in (model, model2):
        m[0].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([3]), float("inf")))
    _ordinary(model, opt, 2)
    _in_backward(model2, opt2, 2)
    _assert_same_run(model, opt, model2, opt2)
    assert not opt2.state[model2[0].weight]  # never stepped: no state, as with step()


def test_gradients_do_not_coexist():
    """At most one parameter holds a gradient at any moment of the stepping backward."""
    model = small_mlp()
    params = list(model.parameters())
    live = []
    for p in params:  # registered first: runs before the stepping hook, grad still there
        p.register_post_accumulate_grad_hook(
            lambda _: live.append(sum(q.grad is not None for q in params))
        )
    opt = _opt(model)
    _loss(model, 0).backward()
    assert max(live) == len(params) == 8  # the ordinary backward: every gradient at the end
    opt.zero_grad()
    live.clear()
    with dion_lp.step_in_backward(opt, model):
        _loss(model, 1).backward()
    assert len(live) == len(params) and max(live) == 1
    assert all(p.grad is None for p in params)


def test_refusals_name_the_argument():
    model = small_mlp()
    opt = _opt(model)
    cases = [
        (dict(opt=torch.optim.SGD(model.parameters(), lr=0.1)), "Invalid opt: a SGD"),
        (dict(opt=_opt(model, grad_sync=True)), "Invalid opt: grad_sync=True"),
        (dict(opt=opt, model=model, accumulation_steps=0), "Invalid accumulation_steps: 0"),
        (dict(opt=opt, accumulation_steps=True), "Invalid accumulation_steps: True"),
        (dict(opt=opt, model=object()), "Invalid model: a object"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            dion_lp.step_in_backward(**kwargs)
    with dion_lp.step_in_backward(opt), pytest.raises(ValueError, match="already"):
        dion_lp.step_in_backward(opt)
    handle = opt.register_step_pre_hook(lambda *args: None)  # e.g. clipping
    with pytest.raises(ValueError, match="1 step pre-hook.*clipping by global norm"):
        dion_lp.step_in_backward(opt)
    handle.remove()
    dion_lp.step_in_backward(opt).remove()


@pytest.fixture
def one_rank_group():
    """torch.distributed on one gloo rank in this process, destroyed afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_models_and_dtensor_parameters_are_refused(one_rank_group):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    model = small_mlp()
    opt = _opt(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match="the model itself is a DistributedDataParallel"):
        dion_lp.step_in_backward(opt, ddp)
    with pytest.raises(ValueError, match="submodule 'inner' is a DistributedDataParallel"):
        dion_lp.step_in_backward(opt, nn.ModuleDict({"inner": ddp}))
    mesh = init_device_mesh("cpu", (1,))
    weight = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    sharded = dion_lp.Dion([{"params": [weight], "param_names": ["w"]}])
    with pytest.raises(ValueError, match="parameter 'w' is a DTensor"):
        dion_lp.step_in_backward(sharded)


def test_a_replicated_optimizer_is_refused(monkeypatch):
    """Fast stand-in for the 2-rank test below (``-m slow``): the same check, faked."""
    opt = _opt(small_mlp())
    monkeypatch.setattr(type(opt), "world_size", property(lambda self: 3))
    with pytest.raises(ValueError, match="replicated over world_size=3 ranks"):
        dion_lp.step_in_backward(opt)


def case_a_replicated_optimizer_is_refused(rank, world_size):
    opt = _opt(small_mlp())  # the default group of 2 gloo ranks: replicated
    try:
        dion_lp.step_in_backward(opt)
    except ValueError as err:
        return opt.world_size, str(err)
    return opt.world_size, None


@pytest.mark.slow  # spawning 2 ranks costs ~12 s on 2 cores
def test_a_replicated_optimizer_is_refused_on_two_ranks(dist_results):
    for world_size, message in dist_results["case_a_replicated_optimizer_is_refused"]:
        assert world_size == 2
        assert message is not None and "replicated over world_size=2 ranks" in message
