"""state_dict round trips (weights_only loading, bit-exact resume) and refused loads.

A refused load, plain or through DCP (FSDP2 on 2 gloo ranks), raises ValueError
naming the parameter or key, and leaves every state tensor, format record, step,
hyperparameter and counter as it was: the next step is the one of an optimizer
that never saw the load.
"""

from __future__ import annotations

import copy
import io
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _dist import spawn_fixture
from _models import MOMENTUM_FORMATS, small_mlp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dion_lp
from dion_lp import dcp_state_dict, load_dcp_state_dict

dist_results = spawn_fixture(__name__, world_sizes=(2,))

FORMATS = MOMENTUM_FORMATS
_model = small_mlp


def _opt(model, momentum_dtype, residual=False, seed=5):
    groups = [
        {"params": [model[0].weight, model[2].weight], "algorithm": "dion"},
        {"params": [model[0].bias, model[1].weight, model[1].bias], "algorithm": "adamw"},
        {
            "params": [model[2].bias, model[3].weight, model[3].bias],
            "algorithm": "lion",
            "lr": 1e-3,
        },
    ]
    return dion_lp.Dion(
        groups,
        lr=0.02,
        rank_fraction=0.5,
        momentum_dtype=momentum_dtype,
        momentum_residual=residual,
        seed=seed,
    )


def _train(model, opt, steps, start):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(16, 96, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("momentum_dtype", FORMATS)
def test_resume_is_bit_exact(momentum_dtype):
    residual = momentum_dtype != "fp32"
    straight = _model()
    opt = _opt(straight, momentum_dtype, residual)
    _train(straight, opt, 10, 0)

    first = _model()
    opt1 = _opt(first, momentum_dtype, residual)
    _train(first, opt1, 5, 0)
    model_sd, opt_sd = _roundtrip(first.state_dict()), _roundtrip(opt1.state_dict())

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_sd)
    opt2 = _opt(resumed, momentum_dtype, residual, seed=999)
    opt2.load_state_dict(opt_sd)
    _train(resumed, opt2, 5, 5)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for p_a, p_b in zip(straight.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[p_a].items():
            other = opt2.state[p_b][key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype, key
                assert torch.equal(value, other), key
            else:
                assert value == other, key


def test_loading_another_optimizers_state_is_refused():
    model = _model()
    adam = torch.optim.AdamW(model.parameters())
    opt = _opt(model, "fp32")
    with pytest.raises(ValueError, match="not saved by dion_lp.Dion"):
        opt.load_state_dict(adam.state_dict())


def test_loading_a_different_momentum_format_is_refused():
    model = _model()
    opt = _opt(model, "int8")
    _train(model, opt, 1, 0)
    sd = opt.state_dict()
    other = _opt(model, "fp8_e4m3")
    with pytest.raises(ValueError, match="int8"):
        other.load_state_dict(sd)


def test_loading_a_future_version_is_refused():
    model = _model()
    opt = _opt(model, "fp32")
    sd = opt.state_dict()
    sd["dion_lp"]["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------- refused loads
def _named_opt(model, fmt="int8"):
    groups = dion_lp.param_groups(model, scalar_algorithm="adamw")  # sets param_names
    kw = dict(lr=0.02, rank_fraction=0.5, momentum_dtype=fmt, momentum_residual=True, seed=5)
    return dion_lp.Dion(groups, **kw)


def _everything(opt):
    """What a load could change, copied: states, hyperparameters, weights, seed, counters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    states = [
        {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
        for p in params
    ]
    groups = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    weights = [p.detach().clone() for p in params]
    return states, copy.deepcopy(groups), weights, opt.seed, opt.comm_stats()


def _assert_equal(a, b):
    (states_a, *rest_a), (states_b, *rest_b) = a, b
    for sa, sb in zip(states_a, states_b, strict=True):
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if torch.is_tensor(value):
                assert value.dtype == sb[key].dtype and torch.equal(value, sb[key]), key
            else:
                assert value == sb[key], key
    weights_a, weights_b = rest_a.pop(1), rest_b.pop(1)
    assert all(torch.equal(x, y) for x, y in zip(weights_a, weights_b, strict=True))
    assert rest_a == rest_b


def _assert_refused(opt, sd, match):
    before = _everything(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_equal(before, _everything(opt))


def _saved(fmt="int8"):
    model = _model()
    opt = _named_opt(model, fmt)
    _train(model, opt, 1, 0)
    return copy.deepcopy(opt.state_dict())  # state_dict() holds the live per-param dicts


def test_a_wider_model_is_refused_naming_the_parameter():
    sd = _saved()
    wider = _model(hidden=160)
    opt = _named_opt(wider)
    _train(wider, opt, 1, 0)
    _assert_refused(opt, sd, r"parameter '0\.weight' .*\(160, 96\).*'momentum' holds 128 rows")


def test_groups_in_another_order_are_refused_naming_the_parameter():
    model = _model()
    matrices = [model[0].weight, model[2].weight]  # 128 x 96, 80 x 128
    opt = dion_lp.Dion([{"params": [w]} for w in matrices], rank_fraction=0.5)
    swapped = [_model()[2].weight, _model()[0].weight]
    other = dion_lp.Dion([{"params": [w]} for w in swapped], rank_fraction=0.5)
    twin = dion_lp.Dion([{"params": [w]} for w in copy.deepcopy(swapped)], rank_fraction=0.5)
    for o in (opt, other, twin):
        for w in (p for g in o.param_groups for p in g["params"]):
            w.grad = torch.ones_like(w)
        o.step()
    _assert_refused(other, opt.state_dict(), r"parameter #0 of param group 0 of shape \(80, 128\)")
    other.step()
    twin.step()
    _assert_equal(_everything(twin), _everything(other))


def _state_of(sd, name):
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    names = [n for g in sd["param_groups"] for n in g["param_names"]]
    return sd["state"][ids[names.index(name)]]


TAMPERED = {  # what is changed in a saved state dict -> what the error says
    "Q shape": r"'0\.weight' .*: Q is torch.bfloat16 \(96, 47\), the parameter needs",
    "Q dtype": r"Q is torch.float32",
    "residual": r"momentum_residual is torch.bfloat16 \(127, 96\)",
    "codes dtype": r"buffer 'momentum': codes torch.uint8",
    "scales": r"buffer 'momentum': codes",
    "no Q": r"missing entries \['Q'\]",
    "extra entry": r"unexpected \['foo'\]",
    "step": r"step -1",
    "format": r"saved with fmt 'fp8_e4m3'",
    "element-wise": r"'0\.bias' .* buffer 'exp_avg_sq' holds 127 rows",
    "unknown id": r"parameter ids \['99'\] of no param group",
    "bool lr": r"param group 1 of state_dict: Invalid lr: True",
    "no nonfinite": r"param group 1: state_dict has no nonfinite",
    "seed": r"Invalid seed: 1180591620717411303424",
    "counters": r"Invalid state_dict: missing",
}


def _tamper(sd, what):
    dion, adamw = _state_of(sd, "0.weight"), _state_of(sd, "0.bias")
    changes = {
        "Q shape": lambda: dion.update(Q=dion["Q"][:, :-1]),
        "Q dtype": lambda: dion.update(Q=dion["Q"].float()),
        "residual": lambda: dion.update(momentum_residual=dion["momentum_residual"][:-1]),
        "codes dtype": lambda: dion.update(momentum_codes=dion["momentum_codes"].to(torch.uint8)),
        "scales": lambda: dion.update(momentum_scales=dion["momentum_scales"][:, :-1]),
        "no Q": lambda: dion.pop("Q"),
        "extra entry": lambda: dion.update(foo=torch.zeros(1)),
        "step": lambda: dion.update(step=-1),
        "format": lambda: dion["momentum_format"].update(fmt="fp8_e4m3"),
        "element-wise": lambda: adamw.update(exp_avg_sq_codes=adamw["exp_avg_sq_codes"][:-1]),
        "unknown id": lambda: sd["state"].update({99: {}}),
        "bool lr": lambda: sd["param_groups"][1].update(lr=True),
        "no nonfinite": lambda: sd["param_groups"][1].pop("nonfinite"),
        "seed": lambda: sd["dion_lp"].update(seed=2**70),
        "counters": lambda: sd["dion_lp"].update(comm_stats={}),
    }
    changes[what]()
    return sd


@pytest.mark.parametrize("what", list(TAMPERED))
def test_a_tampered_state_is_refused_before_anything_changes(what):
    sd = _tamper(_saved(), what)
    model = _model()
    opt = _named_opt(model)
    _train(model, opt, 2, 0)
    _assert_refused(opt, sd, TAMPERED[what])


# ------------------------------------------------- refused DCP load (2 ranks)
def _fsdp(momentum_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128), nn.LayerNorm(128), nn.Linear(128, 80))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model, _named_opt(model, momentum_dtype)


def _fsdp_step(model, opt, rank, world, step):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 96, generator=gen), torch.randn(16, 80, generator=gen)
    per = 16 // world
    nn.functional.mse_loss(model(x[rank * per :][:per]), y[rank * per :][:per]).backward()
    opt.step()
    opt.zero_grad()


def _local(opt):
    """This rank's state, copied; fp8 codes as bytes (torch cannot pickle float8 tensors)."""
    out = []
    for p in (p for g in opt.param_groups for p in g["params"]):
        st = {}
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                value = value.to_local().clone()
                value = (str(value.dtype), value.view(torch.uint8))
            st[key] = copy.deepcopy(value)
        out.append(st)
    return out


def case_refused_dcp_load(rank, world):
    """An int8 checkpoint loaded into an fp8_e4m3 optimizer, beside a twin never loaded into;
    then a single-process state loaded into it."""
    path = [tempfile.mkdtemp(prefix="dion_lp_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    model, opt = _fsdp("int8")
    _fsdp_step(model, opt, rank, world, 0)
    dcp.save({"optim": dcp_state_dict(opt)}, checkpoint_id=path[0])
    (model, opt), (twin, twin_opt) = _fsdp("fp8_e4m3"), _fsdp("fp8_e4m3")
    for m, o in ((model, opt), (twin, twin_opt)):
        _fsdp_step(m, o, rank, world, 0)
    before = _local(opt)
    sd = {"optim": dcp_state_dict(opt)}
    dcp.load(sd, checkpoint_id=path[0])
    loaded = [st["momentum_format"]["fmt"] for st in sd["optim"]["state"].values() if "Q" in st]
    with pytest.raises(ValueError, match="momentum_dtype='int8'.*fp8_e4m3") as refused:
        load_dcp_state_dict(opt, sd["optim"])
    plain = nn.Sequential(nn.Linear(96, 128), nn.LayerNorm(128), nn.Linear(128, 80))
    plain_opt = _named_opt(plain, "fp8_e4m3")
    _fsdp_step(plain, plain_opt, 0, 1, 0)
    with pytest.raises(ValueError, match="'0.weight'.*plain tensor but the parameter is a DTe"):
        opt.load_state_dict(plain_opt.state_dict())  # a single-process state
    after = _local(opt)
    for m, o in ((model, opt), (twin, twin_opt)):
        _fsdp_step(m, o, rank, world, 1)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0])
    weights = [[p.full_tensor() for p in m.parameters()] for m in (model, twin)]  # collective
    return str(refused.value), loaded, before, after, weights


def test_a_refused_dcp_load_changes_nothing(dist_results):
    for error, loaded, before, after, (stepped, twin) in dist_results["case_refused_dcp_load"]:
        assert "param group 0" in error
        assert loaded == ["int8", "int8"]  # DCP did write, into the handed-out copy
        assert len(before) == len(after) == 6
        for st_before, st_after in zip(before, after, strict=True):
            assert st_before.keys() == st_after.keys()
            for key, value in st_before.items():
                if isinstance(value, tuple):
                    assert value[0] == st_after[key][0], key
                    assert torch.equal(value[1], st_after[key][1]), key
                else:
                    assert value == st_after[key], key
        for a, b in zip(stepped, twin, strict=True):  # the next step: as if never loaded into
            assert torch.equal(a, b)
