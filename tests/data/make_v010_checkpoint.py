"""Write tests/data/dion_lp_0_1_0.pt: a small optimizer checkpoint made by dion_lp 0.1.0.

The file was made with the 0.1.0 release checked out beside the repo:

    git worktree add --detach /work/v010 07e14e3
    python tests/data/make_v010_checkpoint.py /work/v010

The package is imported from the path given (put first on ``sys.path``), never
from the repo, and must be version 0.1.0. Five groups, one per format and
algorithm combination worth converting (fp32 params, plain tensors, seed 3):

    group  algorithm  momentum   rank_fraction  params
    0      dion       int8       0.5            W1 (48, 96), W2 (128, 64)
    1      dion       fp32       1.0            W3 (32, 24)
    2      dion       fp8_e4m3   0.25           W4 (64, 256)
    3      adamw      int8       -              E (80, 64), b (16,)
    4      lion       bf16       -              N (64, 64)

every group with stochastic_rounding=False, lr 0.02, weight_decay 0.01.
Parameters are ``torch.randn`` after ``torch.manual_seed(0)``, in that order;
each step's gradients are ``randn`` of each shape, in that order, from one
``torch.Generator`` seeded 1. Three steps, then the saved dict:

- ``optimizer``: ``opt.state_dict()`` after 3 steps;
- ``params``: name -> parameter after 3 steps;
- ``decoded``: name -> {buffer: fp32 tensor from 0.1.0's
  ``dion_lp.state.read_buffer(opt.state[p], buffer)``, and ``"Q"``:
  ``state["Q"].float()`` for the Dion matrices}, after 3 steps;
- ``grad4``: name -> the 4th step's gradient (next draws of the same generator);
- ``params_after_4``: name -> parameter after a 4th step with ``grad4`` from the
  saved state;
- ``names``: parameter names in parameter order;
- ``groups``: the hyperparameters given per group (plain python), with ``params``
  the list of the group's names (the optimizer's ``seed=3`` is not a group key).

Everything is a tensor or a plain value: the file loads with
``torch.load(path, weights_only=True)``, which this script checks.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dion_lp_0_1_0.pt"

SHAPES = {
    "W1": (48, 96),
    "W2": (128, 64),
    "W3": (32, 24),
    "W4": (64, 256),
    "E": (80, 64),
    "b": (16,),
    "N": (64, 64),
}
COMMON = dict(stochastic_rounding=False, lr=0.02, weight_decay=0.01)
GROUPS = [
    dict(params=["W1", "W2"], algorithm="dion", momentum_dtype="int8", rank_fraction=0.5),
    dict(params=["W3"], algorithm="dion", momentum_dtype="fp32", rank_fraction=1.0),
    dict(params=["W4"], algorithm="dion", momentum_dtype="fp8_e4m3", rank_fraction=0.25),
    dict(params=["E", "b"], algorithm="adamw", momentum_dtype="int8"),
    dict(params=["N"], algorithm="lion", momentum_dtype="bf16"),
]
SEED = 3


def _import_old(path: str):
    """dion_lp from ``path`` (first on sys.path), checked to be 0.1.0 from there."""
    root = os.path.realpath(path)
    sys.path.insert(0, root)
    import dion_lp.state

    import dion_lp

    assert dion_lp.__version__ == "0.1.0", dion_lp.__version__
    where = os.path.realpath(dion_lp.__file__)
    assert where.startswith(root + os.sep), f"dion_lp imported from {where}, not {root}"
    return dion_lp


def make(old: str, out: Path) -> dict:
    """Build the checkpoint with the dion_lp at ``old`` and save it to ``out``."""
    dion_lp = _import_old(old)
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    params = {name: nn.Parameter(torch.randn(shape)) for name, shape in SHAPES.items()}
    groups = [{**g, **COMMON} for g in GROUPS]
    opt = dion_lp.Dion(
        [{**g, "params": [params[n] for n in g["params"]]} for g in groups], seed=SEED
    )
    names = [n for g in groups for n in g["params"]]
    assert names == list(SHAPES)
    gen = torch.Generator().manual_seed(1)

    def step() -> dict[str, torch.Tensor]:
        grads = {n: torch.randn(SHAPES[n], generator=gen) for n in names}
        for n in names:
            params[n].grad = grads[n].clone()
        opt.step()
        return grads

    for _ in range(3):
        step()
    decoded = {}
    for n in names:
        st = opt.state[params[n]]
        buffers = sorted(k[: -len("_format")] for k in st if k.endswith("_format"))
        decoded[n] = {b: dion_lp.state.read_buffer(st, b) for b in buffers}
        if "Q" in st:
            decoded[n]["Q"] = st["Q"].float()
    # one deep copy of everything taken at step 3: fp32 state is updated in place
    # by the 4th step, and tensors shared between the state and the decoded
    # buffers (fp32 momentum, fp32 Q) stay shared, so they are saved once
    snapshot = copy.deepcopy(
        {
            "optimizer": opt.state_dict(),
            "params": {n: params[n].detach() for n in names},
            "decoded": decoded,
        }
    )
    grad4 = step()
    data = {
        **snapshot,
        "grad4": grad4,
        "params_after_4": {n: params[n].detach().clone() for n in names},
        "names": names,
        "groups": groups,
    }
    torch.save(data, out)
    loaded = torch.load(out, weights_only=True)
    for n in names:
        assert torch.equal(loaded["params_after_4"][n], data["params_after_4"][n])
        for b, t in data["decoded"][n].items():
            assert torch.equal(loaded["decoded"][n][b], t)
            assert t.dtype == torch.float32
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="checkout of dion_lp 0.1.0 (holds dion_lp/)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    data = make(args.old, args.out)
    print(f"wrote {args.out}: {args.out.stat().st_size} bytes")
    print(f"keys: {sorted(data)}")
    for n in data["names"]:
        print(f"  {n}: decoded {sorted(data['decoded'][n])}")


if __name__ == "__main__":
    main()
