"""A rank that dies or hangs mid-step: the survivors raise CollectiveError, never hang.

The shared harness (``_dist.py``) treats a dead rank as a failure, so these tests
spawn their own small groups: one per scenario, with a 5 s process-group
timeout. The faulty rank dies (``os._exit``) or hangs (blocks on a pipe the
parent closes at the end) at a chosen point of the step; every survivor reports
the exception it got and how long it waited. The parent waits on the pipes
only, never longer than ``DEADLINE``, and kills whatever is left.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dion_lp

PG_TIMEOUT = 5.0  # seconds: the process group's timeout in every scenario
DEADLINE = 90.0  # seconds for a whole scenario, process start-up included

pytestmark = pytest.mark.timeout(4 * DEADLINE)


def _fault(kind: str, hold: Connection) -> None:
    """The faulty rank's end: die at once, or hang until the parent closes ``hold``."""
    if kind == "die":
        os._exit(3)
    try:
        hold.recv()  # blocks; EOFError when the parent closes its end
    finally:
        os._exit(3)


def _replicated_step(rank: int, world: int, where: str, fault: str, hold: Connection) -> None:
    """Two good steps of replicated Dion (fp8 exchange), then the faulty rank fails."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48, bias=False), nn.Linear(48, 16))
    opt = dion_lp.Dion(
        dion_lp.param_groups(model),
        lr=0.01,
        grad_sync=True,
        comm_dtype="fp8_e4m3",
        momentum_dtype="int8",
    )
    for step in range(3):
        torch.manual_seed(100 * step + rank)  # different data on every rank
        model(torch.randn(8, 32)).square().mean().backward()
        if step == 2 and rank == world - 1:
            if where == "before_step":
                _fault(fault, hold)
            if where == "exchange":  # after the flags all-reduce, inside the factor exchange
                import dion_lp.layouts.local as local_layout

                local_layout.quantized_mean_ = lambda *a, **k: _fault(fault, hold)
        opt.step()
        opt.zero_grad()


def _ddp_backward(rank: int, world: int, where: str, fault: str, hold: Connection) -> None:
    """DDP + dion_lp.register_ddp: the faulty rank fails before its third backward."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 48, bias=False), nn.Linear(48, 16)))
    opt = dion_lp.Dion(dion_lp.param_groups(model.module), lr=0.01, comm_dtype="fp8_e4m3")
    dion_lp.register_ddp(model, opt, comm_dtype="bf16")
    for step in range(3):
        torch.manual_seed(100 * step + rank)
        loss = model(torch.randn(8, 32)).square().mean()
        if step == 2 and rank == world - 1:
            _fault(fault, hold)
        loss.backward()
        opt.step()
        opt.zero_grad()


SCENARIOS = {"replicated": _replicated_step, "ddp": _ddp_backward}


def _worker(
    rank: int, world: int, store: str, scenario: str, where: str, fault: str, conn: Connection
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT),
    )
    start = time.monotonic()
    report: dict[str, Any] = {"rank": rank, "error": None}
    try:
        SCENARIOS[scenario](rank, world, where, fault, conn)
    except Exception as err:  # what a survivor sees is the result
        report.update(error=type(err).__name__, message=str(err))
    report["seconds"] = time.monotonic() - start
    conn.send(report)
    # no destroy_process_group(): its barrier would wait for the dead rank
    os._exit(0)


def _run(scenario: str, where: str, fault: str, world: int) -> list[dict[str, Any]]:
    """Reports of the survivors (ranks 0..world-2), each within DEADLINE."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs, parents = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            args = (rank, world, store, scenario, where, fault, child)
            procs.append(ctx.Process(target=_worker, args=args, daemon=True))
            procs[-1].start()
            child.close()
            parents.append(parent)
        reports: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + DEADLINE
        try:
            waiting = parents[:-1]  # the survivors
            while waiting and time.monotonic() < deadline:
                for conn in wait(waiting, timeout=deadline - time.monotonic()):
                    waiting.remove(conn)
                    try:
                        report = conn.recv()
                    except EOFError:  # a survivor died without reporting
                        continue
                    reports[report["rank"]] = report
        finally:
            for conn in parents:
                conn.close()  # releases a hanging rank
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    missing = sorted(set(range(world - 1)) - set(reports))
    assert not missing, f"survivor ranks {missing} neither raised nor finished in {DEADLINE} s"
    return [reports[r] for r in range(world - 1)]


@pytest.mark.parametrize(
    "world,where,fault",
    [(3, "exchange", "die"), (2, "before_step", "die"), (2, "exchange", "hang")],
)
def test_replicated_survivors_raise_collective_error(world, where, fault):
    for report in _run("replicated", where, fault, world):
        assert report["error"] == "CollectiveError", report
        message = report["message"]
        assert f"of {world}" in message and "restart every rank" in message, message
        assert "process group's timeout" in message
        assert report["seconds"] < PG_TIMEOUT + 20  # bounded by the timeout, not forever
        if fault == "hang":  # nobody closed a socket: only the timeout can release it
            assert report["seconds"] >= PG_TIMEOUT - 0.5, report
            assert "Timed out" in message, message


def test_ddp_survivor_raises_from_backward_when_a_rank_dies():
    (report,) = _run("ddp", "backward", "die", 2)
    assert report["error"] == "CollectiveError", report  # raised from the hook, by backward()
    assert "restart every rank" in report["message"], report
    assert report["seconds"] < PG_TIMEOUT + 20
