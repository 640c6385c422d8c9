"""Dion behaves like a torch.optim optimizer: the generic checks of PyTorch's optimizer tests.

Written after PyTorch's test/test_optim.py and
torch.testing._internal.common_optimizers (read, not copied), in every momentum
format: deepcopy and pickle round trips that go on stepping identically, a
state_dict round trip through a freshly built model, add_param_group that
changes nothing when it refuses, no-op steps without gradients, hooks, printing,
param_names. Then what Dion adds: arguments are validated at construction, and
copies of a replicated optimizer (2 gloo ranks) keep or rebind its process group.
(Refused loads: tests/test_checkpoint.py.)
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.distributed as dist
from _dist import spawn_fixture
from _models import MOMENTUM_FORMATS, small_mlp
from torch import nn

import dion_lp
from dion_lp.options import HYPERPARAMETERS

dist_results = spawn_fixture(__name__, world_sizes=(2,))

FORMATS = MOMENTUM_FORMATS
_model = small_mlp


def _opt(model, fmt="fp32", named=False, **kw):
    kw = {**dict(lr=0.02, rank_fraction=0.5, momentum_dtype=fmt, seed=5), **kw}
    kw.setdefault("momentum_residual", fmt != "fp32")
    if named:
        return dion_lp.Dion(dion_lp.param_groups(model, scalar_algorithm="adamw"), **kw)
    groups = [
        {"params": [model[0].weight, model[2].weight], "algorithm": "dion"},
        {"params": [model[0].bias, model[1].weight, model[1].bias], "algorithm": "adamw"},
        {"params": [model[2].bias, model[3].weight, model[3].bias], "algorithm": "lion"},
    ]
    return dion_lp.Dion(groups, **kw)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(16, 96, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _snapshot(opt):
    """Everything about ``opt`` a step or a load could change, copied."""
    states = [
        {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
        if p in opt.state
        else None
        for p in _params(opt)
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {
        "states": states,
        "groups": copy.deepcopy(groups),
        "params": [id(p) for p in _params(opt)],
        "weights": [p.detach().clone() for p in _params(opt)],
        "index": [opt.param_index(p) for p in _params(opt)],
        "seed": opt.seed,
        "stats": opt.comm_stats(),
    }


def _assert_same(a, b, ids=True, stats=True):
    """Two snapshots (or two optimizers' snapshots) hold equal values and dtypes."""
    assert len(a["states"]) == len(b["states"])
    for sa, sb in zip(a["states"], b["states"], strict=True):
        assert (sa is None) == (sb is None)
        assert sa is None or sa.keys() == sb.keys()
        for key in sa or {}:
            va, vb = sa[key], sb[key]
            if torch.is_tensor(va):
                assert va.dtype == vb.dtype and torch.equal(va, vb), key
            else:
                assert va == vb, key
    for wa, wb in zip(a["weights"], b["weights"], strict=True):
        assert torch.equal(wa, wb)
    assert a["groups"] == b["groups"] and a["index"] == b["index"] and a["seed"] == b["seed"]
    assert a["stats"] == b["stats"] or not stats  # a step() call counts, gradients or not
    if ids:
        assert a["params"] == b["params"]


def _pickled(obj, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# --------------------------------------------------------------- copies, pickles
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_goes_on_exactly_like_the_original(fmt, how):
    model = _model()
    opt = _opt(model, fmt, named=True)
    _train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else _pickled((model, opt), how)
    assert {id(p) for p in _params(opt2)} == {id(p) for p in model2.parameters()}
    assert set(vars(opt2)) == set(vars(opt)) and opt2.defaults == opt.defaults
    assert (opt2.process_group, opt2.world_size, opt2.grad_sync) == (None, 1, False)
    _assert_same(_snapshot(opt), _snapshot(opt2), ids=False)
    for p, p2 in zip(_params(opt), _params(opt2), strict=True):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert value.data_ptr() != opt2.state[p2][key].data_ptr(), key
    _train(model, opt, 2, start=2)
    _train(model2, opt2, 2, start=2)
    _assert_same(_snapshot(opt), _snapshot(opt2), ids=False)
    before = _snapshot(opt)
    _train(model2, opt2, 1, start=4)  # the copy's state is its own
    _assert_same(before, _snapshot(opt))
    assert opt2.state_dict()["dion_lp"]["seed"] == 5


def test_copies_drop_hooks_as_torch_does():
    model = _model()
    opt, adamw = _opt(model), torch.optim.AdamW(model.parameters())
    for o in (opt, adamw):
        o.register_step_post_hook(lambda *args: None)
        o.register_load_state_dict_pre_hook(lambda *args: None)
    for how in ("deepcopy", "pickle"):
        ours = copy.deepcopy(opt) if how == "deepcopy" else _pickled(opt, how)
        theirs = copy.deepcopy(adamw) if how == "deepcopy" else _pickled(adamw, how)
        for name in ("_optimizer_step_post_hooks", "_optimizer_load_state_dict_pre_hooks"):
            assert len(getattr(ours, name)) == len(getattr(theirs, name)) == 0


def test_a_pickle_without_dions_record_is_refused():
    opt = _opt(_model())
    new = dion_lp.Dion.__new__(dion_lp.Dion)
    with pytest.raises(ValueError, match="pickle version None.*state_dict"):
        new.__setstate__(torch.optim.Optimizer.__getstate__(opt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_round_trip_through_a_fresh_model(fmt):
    model = _model()
    opt = _opt(model, fmt, named=True)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = _model(seed=1)
    fresh.load_state_dict(saved["model"])
    opt2 = _opt(fresh, fmt, named=True, seed=9)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]
    _train(model, opt, 2, start=3)
    _train(fresh, opt2, 2, start=3)
    _assert_same(_snapshot(opt), _snapshot(opt2), ids=False)


# ------------------------------------------------------------- add_param_group
def _vector():
    return nn.Parameter(torch.randn(8))


def _matrix():
    return nn.Parameter(torch.randn(8, 8))


BAD_GROUPS = {
    "vector in a dion group": (lambda m: {"params": [_vector()]}, "Invalid parameter #0"),
    "bool lr": (lambda m: {"params": [_matrix()], "lr": True}, "Invalid lr: True"),
    "unknown format": (
        lambda m: {"params": [_matrix()], "momentum_dtype": "int3"},
        "Invalid momentum_dtype: 'int3'",
    ),
    "integer tensor": (lambda m: {"params": [torch.zeros(8, 8, dtype=torch.long)]}, "int64"),
    "another device": (
        lambda m: {"params": [nn.Parameter(torch.empty(8, device="meta"))], "algorithm": "lion"},
        "on devices",
    ),
    "names of another length (named optimizer)": (
        lambda m: {"params": [_matrix(), _matrix()], "param_names": ["a"]},
        "Invalid param_names",
    ),
    "names where no group has names": (
        lambda m: {"params": [("w", _matrix())]},
        "names its parameters",
    ),
    "a parameter it has already": (
        lambda m: {"params": [_matrix(), m[0].weight]},
        "more than one parameter group",
    ),
    "a non-leaf tensor": (
        lambda m: {"params": [torch.randn(8, 8, requires_grad=True) * 2]},
        "non-leaf",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
def test_a_refused_group_changes_nothing(case):
    make, match = BAD_GROUPS[case]
    model, twin = _model(), _model()
    named = "named optimizer" in case
    opt, opt_twin = _opt(model, "int8", named=named), _opt(twin, "int8", named=named)
    _train(model, opt, 1)
    _train(twin, opt_twin, 1)
    before = _snapshot(opt)
    group = make(model)
    given = dict(group)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(group)
    _assert_same(before, _snapshot(opt))
    assert group.keys() == given.keys() and all(group[k] is given[k] for k in given)
    assert len(opt._param_index) == len(_params(opt)) == opt._next_index
    _train(model, opt, 1, start=1)
    _train(twin, opt_twin, 1, start=1)
    _assert_same(_snapshot(opt_twin), _snapshot(opt), ids=False)


def test_a_group_joining_named_groups_is_named():
    model = _model()
    opt = _opt(model, named=True)
    extra, other = nn.Parameter(torch.randn(4, 96)), nn.Parameter(torch.randn(4, 96))
    opt.add_param_group({"params": iter([extra]), "algorithm": "adamw"})  # an iterator, too
    opt.add_param_group({"params": [("other", other)], "algorithm": "adamw"})
    g = len(opt.param_groups)
    assert opt.param_groups[-2]["param_names"] == [f"group{g - 2}.param0"]
    assert opt.param_groups[-1]["param_names"] == ["other"]
    assert [opt.param_index(p) for p in (extra, other)] == [8, 9]  # in order
    extra.grad, other.grad = torch.ones_like(extra), torch.ones_like(other)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][-2]["param_names"] == [f"group{g - 2}.param0"]


def test_validation_errors_name_the_argument_and_value():
    model = _model()
    for name in ("lr", "mu", "weight_decay", "eps", "rank_fraction", "rank_multiple_of"):
        for value in (True, False):
            with pytest.raises(ValueError, match=f"Invalid {name}: {value}"):
                _opt(model, **{name: value})
    for betas, bad in (((True, 0.9), "betas\\[0\\]: True"), ((0.9, False), "betas\\[1\\]: False")):
        with pytest.raises(ValueError, match=f"Invalid {bad}"):
            _opt(model, betas=betas)
    for seed in (-1, 2**63, 2**70, True, 1.5, "3"):
        with pytest.raises(ValueError, match="Invalid seed"):
            _opt(model, seed=seed)
    assert set(dion_lp.Dion([nn.Parameter(torch.randn(4, 4))]).defaults) == set(HYPERPARAMETERS)


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_the_largest_seed_steps(fmt):
    model = _model()
    opt = _opt(model, fmt, seed=2**63 - 1)
    _train(model, opt, 2)
    assert opt.state_dict()["dion_lp"]["seed"] == 2**63 - 1


# ------------------------------------------------------- steps, hooks, printing
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_step_without_gradients_changes_nothing(fmt):
    model = _model()
    opt = _opt(model, fmt)
    before = _snapshot(opt)
    opt.step()
    assert not opt.state
    _assert_same(before, _snapshot(opt), stats=False)
    _train(model, opt, 1)
    opt.zero_grad()
    before = _snapshot(opt)
    opt.step()
    _assert_same(before, _snapshot(opt), stats=False)


def test_hooks_run_as_in_torch():
    model = _model()
    opt = _opt(model)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("step_pre"))
    opt.register_step_post_hook(lambda *a: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda *a: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})

    def load_pre(o, sd):  # a pre-hook's result is what loads (and what is checked)
        calls.append("load_pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.5
        sd.pop("extra")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda *a: calls.append("load_post"))
    _train(model, opt, 1)
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls == ["step_pre", "step_post", "sd_pre", "load_pre", "load_post"]
    assert opt.param_groups[0]["lr"] == 0.5 and len(opt._optimizer_load_state_dict_pre_hooks) == 1


def test_printing_shows_every_group():
    text = repr(_opt(_model(), "int8"))
    assert text.startswith("Dion (") and "Parameter Group 2" in text
    assert "momentum_dtype: int8" in text and "algorithm: lion" in text


# ------------------------------------------------------ replicated (2 ranks)
def _replicated(rank, **kw):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 96, generator=gen)), nn.Parameter(torch.randn(96))]
    groups = [{"params": params[:1]}, {"params": params[1:], "algorithm": "adamw"}]
    opt = dion_lp.Dion(groups, lr=0.02, rank_fraction=0.5, momentum_dtype="int8", **kw)
    return params, opt


def _replica_steps(runs, rank, steps, start=0):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        grads = [torch.randn(64, 96, generator=gen), torch.randn(96, generator=gen)]
        for params, opt in runs:  # every rank steps the optimizers in the same order
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()


def case_copies_of_a_replicated_optimizer(rank, world_size):
    params, opt = _replicated(rank, grad_sync=True)
    _replica_steps([(params, opt)], rank, 2)
    deep = copy.deepcopy((params, opt))
    pickled = pickle.loads(pickle.dumps((params, opt)))
    _replica_steps([(params, opt), deep, pickled], rank, 2, start=2)
    groups = [
        (o.process_group is dist.group.WORLD, o.world_size, o._replicas) for o in (deep[1], opt)
    ]
    groups.append((pickled[1].process_group is dist.group.WORLD, pickled[1].world_size, None))
    everyone = dist.new_group(list(range(world_size)))  # a group of every rank: the default's
    _, explicit = _replicated(rank, process_group=everyone)
    restored = pickle.loads(pickle.dumps(explicit))
    groups.append((restored.process_group is dist.group.WORLD, restored.world_size, None))
    groups.append(restored._replicas is dist.group.WORLD)
    weights = [[p.detach().clone() for p in run[0]] for run in ((params, opt), deep, pickled)]
    return weights, groups, pickle.dumps(opt)


def case_a_custom_group(rank, world_size):
    mine = [dist.new_group([r]) for r in range(world_size)][rank]  # every rank makes each
    _, opt = _replicated(rank, process_group=mine)
    with pytest.raises(ValueError, match="Invalid process_group: .*cannot be pickled"):
        pickle.dumps(opt)
    return copy.deepcopy(opt).process_group is mine


def test_copies_of_a_replicated_optimizer_keep_stepping_like_it(dist_results):
    for weights, groups, _ in dist_results["case_copies_of_a_replicated_optimizer"]:
        assert groups[:2] == [(True, 2, None), (True, 2, None)]
        assert groups[2:] == [(True, 2, None), (True, 2, None), True]
        original, deep, pickled = weights
        for a, b, c in zip(original, deep, pickled, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_a_custom_group_is_kept_by_deepcopy_and_refused_by_pickle(dist_results):
    assert dist_results["case_a_custom_group"] == [True, True]


def test_a_replicated_optimizer_unpickled_without_torch_distributed_is_single_process(
    dist_results,
):
    blob = dist_results["case_copies_of_a_replicated_optimizer"][0][2]
    with pytest.warns(UserWarning, match="default process group of 2 ranks.*1 rank"):
        opt = pickle.loads(blob)
    assert (opt.process_group, opt.world_size) == (None, 1)
    for p in _params(opt):
        p.grad = torch.ones_like(p)
    opt.step()
