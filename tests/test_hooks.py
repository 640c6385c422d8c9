"""dion_lp.hooks: DDP comm hooks on 2 and 3 gloo ranks, each rank with its own data.

Independent expectations: the parent process regenerates every rank's batches
and runs single-process Dion on the hand-averaged gradients (the synchronous
semantics the hook + replicated Dion must reproduce) and counts wire bytes from
wrapped torch.distributed collectives rather than from the library's own
counters. compress_hook's numerics are in test_compress_hook.py.
"""

from __future__ import annotations

import contextlib
import io
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 - the usual name
from _collectives import recorded_collectives
from _dist import spawn_fixture
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: N817

import dion_lp
from dion_lp import hooks
from dion_lp.dist.accounting import collective_bytes, mean_bytes

dist_results = spawn_fixture(__name__, world_sizes=(2, 3))

IN, OUT, BATCH = 8, 4, 16
STEPS = 4
CAP_MB = 2048 / 2**20  # 2 KiB buckets: the model spans 3 buckets, each mixing Dion and not
VARIANTS = {
    "plain": {},
    "bucket_view": {"gradient_as_bucket_view": True},
    "static_graph": {"static_graph": True},
    "unused": {"find_unused_parameters": True},
    "no_sync": {},  # two micro-batches, the first under ddp.no_sync()
}


class Net(nn.Module):
    """Dion matrices (inp, hidden, extra weights) next to vectors, a norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, 32)
        self.norm = nn.LayerNorm(32)
        self.hidden = nn.Linear(32, 32)
        self.extra = nn.Linear(32, 32)
        self.head = nn.Linear(32, OUT)

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = F.gelu(self.hidden(self.norm(F.gelu(self.inp(x)))))
        if use_extra:  # gelu after the branch: extra's gradient is not of the head's rank
            h = F.gelu(h + self.extra(h))
        return self.head(h)


def _model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _dion(model: nn.Module, comm_dtype: str = "fp32", **kw) -> dion_lp.Dion:
    groups = dion_lp.param_groups(
        model, scalar_algorithm="adamw", scalar_lr=1e-3, rank_fraction=0.25
    )
    return dion_lp.Dion(groups, lr=0.02, mu=0.9, weight_decay=0.1, comm_dtype=comm_dtype, **kw)


def _data(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    x = torch.randn(BATCH, IN, generator=gen) * (1 + rank)
    return x, torch.randn(BATCH, OUT, generator=gen)


def _use_extra(variant: str, rank: int, step: int) -> bool:
    """ "unused": extra is used by some ranks only, and at step 3 by none (globally unused)."""
    if variant != "unused":
        return True
    return step != 3 and (rank + step) % 2 == 0


def _micro(variant: str) -> int:
    return 2 if variant == "no_sync" else 1


def _ddp_step(ddp: DDP, opt: torch.optim.Optimizer, rank: int, step: int, variant: str) -> None:
    micro = _micro(variant)
    for k in range(micro):
        x, y = _data(rank, step, k)
        ctx = ddp.no_sync() if k < micro - 1 else contextlib.nullcontext()
        with ctx:
            F.mse_loss(ddp(x, _use_extra(variant, rank, step)), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- cases
def _train_dion(rank, variant, steps, hook_comm="fp32", comm="fp32", seed=0, **dion_kw):
    model = _model(seed)
    opt = _dion(model, comm, **dion_kw)
    ddp = DDP(model, bucket_cap_mb=CAP_MB, **VARIANTS[variant])
    state = hooks.DionHookState(opt, comm_dtype=hook_comm)
    ddp.register_comm_hook(state, hooks.dion_hook)
    for step in range(steps):
        _ddp_step(ddp, opt, rank, step, variant)
    return model, opt, ddp, state


def case_equivalence(rank, world_size):
    """fp32 everywhere: DDP + dion_hook + replicated Dion, under each DDP option."""
    out = {}
    for variant in VARIANTS:
        model, opt, _, state = _train_dion(rank, variant, STEPS)
        assert opt.world_size == world_size
        out[variant] = (_params(model), state.comm_stats())
    return out


def case_bytes(rank, world_size):
    """Per step: the buckets (non-Dion numel, Dion numel) and every collective of backward."""
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = _dion(model, "fp8_e4m3")
    ddp = DDP(model, bucket_cap_mb=CAP_MB)
    state = hooks.DionHookState(opt, comm_dtype="fp8_e4m3")
    buckets = []

    def spy(state, bucket):  # no annotations: this module's are strings, DDP checks them
        # Dion's matrices, by the rule of dion_lp.param_groups: hidden 2-D weights, no head
        dion = [p.ndim == 2 and not names[id(p)].startswith("head") for p in bucket.parameters()]
        numels = [p.numel() for p in bucket.parameters()]
        pairs = list(zip(numels, dion, strict=True))
        buckets[-1].append((sum(n for n, d in pairs if not d), sum(n for n, d in pairs if d)))
        return hooks.dion_hook(state, bucket)

    ddp.register_comm_hook(state, spy)
    steps = []
    for step in range(3):
        buckets.append([])
        x, y = _data(rank, step)
        with recorded_collectives() as log:
            F.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append((buckets[-1], log, state.comm_stats()["last_step"]))
    return steps


def _checkpoint(model, opt, state) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, buf
    )
    return buf.getvalue()


def _resume(rank, blob, build, variant, first, steps, load_hook=True):
    model, opt, ddp, state = build(seed=123)  # another init: loading must restore it
    sd = torch.load(io.BytesIO(blob), weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["opt"])
    if load_hook:
        state.load_state_dict(sd["hook"])
    for step in range(first, first + steps):
        _ddp_step(ddp, opt, rank, step, variant)
    return _params(model)


# kind: (hook's comm_dtype, Dion's comm_dtype, momentum_dtype); every lossy format once
RESUME_RECIPES = {
    "dion": ("fp8_e4m3", "fp8_e4m3", "int8"),
    "dion_bf16": ("bf16", "bf16", "bf16"),
    "dion_fp8_momentum": ("fp8_e5m2", "fp8_e5m2", "fp8_e4m3"),
    "dion_dynamic8": ("bf16", "fp32", "dynamic8"),
    "adamw": ("fp8_e5m2", None, None),
}


def case_save_restore(rank, world_size):
    out = {}
    for kind, recipe in RESUME_RECIPES.items():
        for variant in ("unused", "plain"):

            def build(seed=0, kind=kind, variant=variant, recipe=recipe):
                hook_fmt, dion_fmt, momentum_dtype = recipe
                model = _model(seed)
                if kind == "adamw":
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
                else:
                    opt = _dion(model, dion_fmt, momentum_dtype=momentum_dtype)
                ddp = DDP(model, bucket_cap_mb=CAP_MB, **VARIANTS[variant])
                return model, opt, ddp, dion_lp.register_ddp(ddp, opt, comm_dtype=hook_fmt)

            model, opt, ddp, state = build()
            for step in range(3):
                _ddp_step(ddp, opt, rank, step, variant)
            blob = _checkpoint(model, opt, state)
            norm = state.residual_norm()
            for step in range(3, 6):
                _ddp_step(ddp, opt, rank, step, variant)
            resumed = _resume(rank, blob, build, variant, 3, 3)
            no_hook_state = _resume(rank, blob, build, variant, 3, 3, load_hook=False)
            out[kind, variant] = (
                type(state).__name__,
                norm,
                _params(model),
                resumed,
                no_hook_state,
            )
    return out


def case_pickle(rank, world_size):
    model = _model()
    opt = _dion(model)
    ddp = DDP(model)
    state = dion_lp.register_ddp(ddp, opt, comm_dtype="bf16")
    _ddp_step(ddp, opt, rank, 0, "plain")
    clone = pickle.loads(pickle.dumps(state))
    out = {"pg": clone.process_group, "optimizer": clone.optimizer}
    out["residuals"] = all(
        torch.equal(clone.residuals[k], r) for k, r in state.residuals.items()
    ) and set(clone.residuals) == set(state.residuals)
    try:
        clone.owned()
    except ValueError as err:
        out["error"] = str(err)
    clone.optimizer = opt
    out["owned"] = clone.owned() == state.owned()
    compress = hooks.CompressState(dist.group.WORLD, inner_state=dist.group.WORLD)
    compress.bind(ddp)
    clone = pickle.loads(pickle.dumps(compress))
    out["compress"] = (clone.process_group, clone.inner_state, clone.comm_dtype)
    return out


def case_register_errors(rank, world_size):
    singles = [dist.new_group([r]) for r in range(world_size)]  # collective: all ranks, in order
    out = {}
    model = _model()
    ddp = DDP(model)
    for name, opt in (
        ("grad_sync", _dion(model, grad_sync=True)),
        ("not_replicated", _dion(model, process_group=singles[rank])),
    ):
        try:
            dion_lp.register_ddp(ddp, opt)
            out[name] = "registered"
        except ValueError as err:
            out[name] = str(err)
    out["adamw"] = type(dion_lp.register_ddp(ddp, torch.optim.AdamW(model.parameters()))).__name__
    return out


# ----------------------------------------------------------------------------- reference
@contextlib.contextmanager
def _one_thread():
    """Tiny ops are far faster on one thread (no pool wake-ups), as in the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def _reference(world_size: int, variant: str, steps: int = STEPS) -> list[torch.Tensor]:
    """Single-process Dion on the hand-averaged gradients of every rank's batches."""
    model = _model()
    opt = _dion(model)
    params = list(model.parameters())
    for step in range(steps):
        per_rank = []
        for r in range(world_size):
            model.zero_grad(set_to_none=True)
            for k in range(_micro(variant)):
                x, y = _data(r, step, k)
                F.mse_loss(model(x, _use_extra(variant, r, step)), y).backward()
            per_rank.append([None if p.grad is None else p.grad.clone() for p in params])
        for i, p in enumerate(params):
            grads = [g[i] for g in per_rank]
            if all(g is None for g in grads):
                p.grad = None
            else:
                p.grad = sum(torch.zeros_like(p) if g is None else g for g in grads) / world_size
        opt.step()
    return _params(model)


def _assert_identical_across_ranks(per_rank):
    for other in per_rank[1:]:
        for a, b in zip(per_rank[0], other, strict=True):
            assert torch.equal(a, b)


def _non_dion() -> list[torch.Tensor]:
    model = _model()
    dion = {
        id(p) for g in _dion(model).param_groups if g["algorithm"] == "dion" for p in g["params"]
    }
    return [p for p in model.parameters() if id(p) not in dion]


def _non_dion_numel() -> int:
    return sum(p.numel() for p in _non_dion())


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dion_hook_equals_single_process_on_averaged_gradients(dist_results, variant):
    per_rank = [r[variant][0] for r in dist_results["case_equivalence"]]
    _assert_identical_across_ranks(per_rank)
    expected = _reference(dist_results.world_size, variant)
    for got, want in zip(per_rank[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dion_hook_bytes_are_those_of_the_non_dion_slices_only(dist_results):
    N = dist_results.world_size
    for steps in dist_results["case_bytes"]:
        layouts = [tuple(buckets) for buckets, _, _ in steps]
        assert len(layouts[0]) == 1 and len(layouts[1]) == 3  # DDP rebuilt its buckets
        assert sum(n for n, _ in layouts[1]) == _non_dion_numel()
        assert all(n > 0 and d > 0 for n, d in layouts[1])  # every bucket mixes
        for buckets, log, last_step in steps:
            # whatever the buckets: one coalesced mean of the step's non-Dion numel, and
            # one uint8 flag per non-Dion gradient (non-finite anywhere?), no more
            flags = collective_bytes("all_reduce", len(_non_dion()), N)
            expected = mean_bytes(_non_dion_numel(), "fp8_e4m3", N) + flags
            measured = sum(collective_bytes(kind, nbytes, N) for kind, nbytes, _ in log)
            assert measured == expected == last_step
            kinds = sorted(kind for kind, _, _ in log)
            assert kinds == ["all_gather", "all_reduce", "all_to_all"]
            assert {dtype for _, _, dtype in log} == {torch.uint8}  # flags, fp8 codes + scales
            # averaging the Dion slices too would cost several times more
            everything = mean_bytes(sum(n + d for n, d in buckets), "fp8_e4m3", N)
            assert measured < 0.25 * everything


@pytest.mark.parametrize("variant", ["unused", "plain"])
@pytest.mark.parametrize("kind", list(RESUME_RECIPES))
def test_save_restore_resumes_identically(dist_results, kind, variant):
    """Bitwise. "unused" (find_unused_parameters) keeps DDP's buckets; in "plain" the
    re-wrapped model starts from other buckets than the continued run's rebuilt ones."""
    for out in dist_results["case_save_restore"]:
        name, norm, continued, resumed, no_hook_state = out[kind, variant]
        assert name == ("CompressState" if kind == "adamw" else "DionHookState")
        assert norm > 0  # there was error-feedback state to save
        assert all(torch.equal(a, b) for a, b in zip(continued, resumed, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(continued, no_hook_state, strict=True))


def test_pickle_drops_the_process_group_and_optimizer(dist_results):
    for out in dist_results["case_pickle"]:
        assert out["pg"] is None and out["optimizer"] is None and out["residuals"]
        assert "set state.optimizer" in out["error"] and out["owned"]
        assert out["compress"] == (None, None, "fp8_e4m3")


def test_register_ddp_picks_the_hook_and_rejects_misconfigured_dion(dist_results):
    for out in dist_results["case_register_errors"]:
        assert "grad_sync=True" in out["grad_sync"]
        assert "replicated over 1 rank" in out["not_replicated"]
        assert out["adamw"] == "CompressState"


# ----------------------------------------------------------------------------- single process
def test_argument_validation_names_the_argument():
    with pytest.raises(ValueError, match="Invalid comm_dtype: 'fp16'"):
        hooks.CompressState(comm_dtype="fp16")
    with pytest.raises(ValueError, match="Invalid error_feedback: 'yes'"):
        hooks.CompressState(error_feedback="yes")
    with pytest.raises(ValueError, match="Invalid warmup_steps: -1"):
        hooks.CompressState(warmup_steps=-1)
    with pytest.raises(ValueError, match="Invalid block_size: 0"):
        hooks.CompressState(block_size=0)
    with pytest.raises(ValueError, match="Invalid process_group: .*not initialised"):
        hooks.CompressState(process_group=object())
    with pytest.raises(ValueError, match="Invalid optimizer: object"):
        hooks.DionHookState(object())
    with pytest.raises(ValueError, match="Invalid ddp_model: Linear"):
        dion_lp.register_ddp(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="Invalid hook: 3"):
        hooks.compress_wrapper(3)
    with pytest.raises(ValueError, match="Invalid module: int"):
        hooks.CompressState().bind(3)


def test_hook_names_avoid_the_ones_torch_special_cases():
    special = {"bf16_compress_hook", "fp16_compress_hook", "bf16_compress_wrapper_hook"}
    names = {hooks.dion_hook.__name__, hooks.compress_hook.__name__}
    names.add(hooks.compress_wrapper(default_hooks.allreduce_hook).__name__)
    assert not names & special


def test_state_dict_is_weights_only_loadable_and_checked():
    state = hooks.CompressState(comm_dtype="bf16")
    state.bind(nn.Linear(3, 2))
    state.residuals["weight"] = torch.randn(2, 3)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    other = hooks.CompressState(comm_dtype="bf16")
    other.bind(nn.Linear(3, 2))
    other.load_state_dict(sd)
    assert torch.equal(other.residuals["weight"], state.residuals["weight"])
    with pytest.raises(ValueError, match="comm_dtype='bf16'"):
        hooks.CompressState(comm_dtype="fp8_e4m3").load_state_dict(sd)
    with pytest.raises(ValueError, match="kind='CompressState'"):
        hooks.DionHookState(_dion(_model())).load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown parameters \\['weight'\\]"):
        bound = hooks.CompressState(comm_dtype="bf16")
        bound.bind(nn.Sequential(nn.Linear(3, 2)))
        bound.load_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"kind": "CompressState"})
