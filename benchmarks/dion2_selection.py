"""How often selected-rows Dion2 selects the rows the exact mean would.

``dion2_exchange="selected_rows"`` (:mod:`dion_lp.algorithms.dion2_rows`) agrees
on the slices to update without the mean B itself. This trains the ablation's
model (d 128, its data, lr 0.04 without schedule, Lion 3e-3 on the rest) with W
simulated replicas in one process, the compressed maths in fp32 (each replica its
own batch and momentum; C the exact mean of the selected rows), and at every step
and matrix compares the agreed set with the one the exact mean ``mean_i B_i``
would select, for two rules:

- ``sketch`` (the optimizer's): the row norms of ``mean_i B_i Omega``, Omega a
  Gaussian (long side x 16) matrix: a sketch of the mean itself;
- ``norms`` (the cheaper rule it replaced): the mean of the ranks' own row L1
  norms, S floats.

Columns: ``overlap``, |agreed & exact| / k (mean, min over steps and matrices);
``mass``, the exact mean's row L1 norm captured by the agreed set as a share of
the exact set's (what the update loses when the sets differ).

    python -m benchmarks.dion2_selection                  # W = 2, 4, 8; both rules, ~2 min
    python -m benchmarks.dion2_selection --steps 40 --world-sizes 2 --rules sketch
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from torch import Tensor

import dion_lp
from dion_lp.algorithms.dion2 import newton_schulz

from .data import get_batch
from .model import GPT, GPTConfig

__all__ = ["main", "measure"]

LR, MU, LION_LR = 0.04, 0.95, 3e-3
SKETCH = 16  # columns of the random sketch


def _topk(norms: Tensor, k: int) -> set[int]:
    return set(torch.topk(norms, k).indices.tolist())


def measure(
    world_size: int, steps: int, fraction: float, rule: str = "norms", seed: int = 0
) -> dict[str, float]:
    """Train ``steps`` steps with ``world_size`` simulated replicas; the agreement figures."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(seq_len=64))
    groups = dion_lp.param_groups(model, scalar_algorithm="lion", scalar_lr=LION_LR)
    hidden = groups[0]["params"]
    rest = dion_lp.Dion(groups[1:], lr=LION_LR)
    momenta = [[torch.zeros_like(p) for p in hidden] for _ in range(world_size)]
    overlaps, masses = [], []
    for step in range(steps):
        grads = []
        for rank in range(world_size):
            model.zero_grad()
            x, y = get_batch("train", step, 16, 64, rank=rank, world_size=world_size, seed=seed)
            model(x, y)[1].backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p, *per_rank in zip(model.parameters(), *grads, strict=True):
                p.grad = sum(per_rank) / world_size  # the element-wise groups: averaged
            index = {id(p): i for i, p in enumerate(model.parameters())}
            for j, p in enumerate(hidden):
                B = [momenta[r][j] + grads[r][index[id(p)]] for r in range(world_size)]
                m, n = p.shape
                dim = 0 if m <= n else 1
                k = math.ceil(fraction * p.shape[dim])
                exact_norms = (sum(B) / world_size).abs().sum(dim=1 - dim)
                exact = _topk(exact_norms, k)
                if rule == "norms":
                    agreed = _topk(sum(b.abs().sum(dim=1 - dim) for b in B), k)
                else:  # a Gaussian sketch of the mean: its slices' L2 norms, estimated
                    g = torch.Generator().manual_seed(1000 * step + j)
                    omega = torch.randn(p.shape[1 - dim], SKETCH, generator=g) / SKETCH**0.5
                    sketch = sum((b if dim == 0 else b.T) @ omega for b in B) / world_size
                    agreed = _topk(sketch.square().sum(dim=1), k)
                overlaps.append(len(agreed & exact) / k)
                masses.append(
                    float(exact_norms[list(agreed)].sum() / exact_norms[list(exact)].sum())
                )
                idx = torch.tensor(sorted(agreed))
                C = sum(b.index_select(dim, idx) for b in B) / world_size
                for r in range(world_size):
                    momenta[r][j] = B[r].index_add(dim, idx, C, alpha=-(1 - MU))
                p.mul_(1 - LR * 0.01).index_add_(
                    dim, idx, newton_schulz(C), alpha=-LR * (m / n) ** 0.5
                )
                p.grad = None
        rest.step()
    return {
        "world_size": world_size,
        "overlap_mean": statistics.fmean(overlaps),
        "overlap_min": min(overlaps),
        "mass_mean": statistics.fmean(masses),
        "mass_min": min(masses),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.dion2_selection", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--world-sizes", default="2,4,8", help="comma list of simulated replicas")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--rules", default="norms,sketch", help="norms (the optimizer's), sketch")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("rule     replicas  overlap mean  overlap min  mass mean  mass min")
    for rule in args.rules.split(","):
        for w in (int(v) for v in args.world_sizes.split(",")):
            r = measure(w, args.steps, args.fraction, rule)
            overlap = f"{r['overlap_mean']:>12.3f}  {r['overlap_min']:>11.3f}"
            print(f"{rule:<7}  {w:>8}  {overlap}  {r['mass_mean']:>9.4f}  {r['mass_min']:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
