"""Multi-process test harness: spawn N gloo ranks once, run many cases, collect results.

Starting a process costs seconds, so a test module spawns its ranks once per world
size and runs every case in them. A case is a module-level function
``case_<name>(rank, world_size) -> result`` (result: anything picklable, e.g.
CPU tensors). Each test then asserts on the per-rank results::

    from _dist import spawn_fixture

    dist_results = spawn_fixture(__name__, world_sizes=(2, 3))

    def case_sum(rank, world_size):
        t = torch.tensor([float(rank)])
        torch.distributed.all_reduce(t)
        return t

    def test_sum(dist_results):
        for t in dist_results["case_sum"]:  # one result per rank
            assert t.item() == sum(range(dist_results.world_size))

How it stays fast and never hangs:

- ranks are ``spawn``-ed processes joined by a gloo process group over a
  FileStore in a fresh temporary directory (no port to race for);
- results come back pickled (by value) over one pipe per rank; the parent waits
  on the pipes only (no sleeps, no polling loops) until every rank says it is
  done, a pipe closes early (a rank died), or the hard ``timeout`` passes, and
  then kills whatever is left;
- a case that raises is reported with its traceback; the ranks then meet at a
  store barrier before the next case, so a rank that failed early never pairs
  its next collectives with a peer still blocked in the failed case (that peer
  is released by the process-group timeout, ``collective_timeout``);
- every rank calls ``torch.set_num_threads(1)`` and ends with
  ``dist.destroy_process_group()``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["CaseError", "CaseResults", "case_names", "run_cases", "spawn_fixture"]

CaseSpec = tuple[str, str, str]  # (module name, function name, module file)


class CaseError(AssertionError):
    """A case raised on some rank, or did not finish; carries every rank's report."""


class CaseResults(dict):
    """``{case_name: [result of rank 0, rank 1, ...]}`` for the cases that passed on all ranks.

    Looking up a case that failed (or never ran because a rank died or the run
    timed out) raises :class:`CaseError` with the tracebacks, so the test
    asserting on it fails with the real cause.
    """

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size
        self.failures: dict[str, str] = {}
        self.run_error: str | None = None

    def __missing__(self, name: str) -> Any:
        if name in self.failures:
            raise CaseError(f"{name} failed (world_size={self.world_size}):\n{self.failures[name]}")
        reason = self.run_error or "no such case was run"
        raise CaseError(f"{name} has no result (world_size={self.world_size}): {reason}")


def case_names(module: Any) -> list[str]:
    """Names of the ``case_*`` functions defined in ``module``, in source order."""
    found = [
        fn
        for name, fn in vars(module).items()
        if name.startswith("case_") and inspect.isfunction(fn) and fn.__module__ == module.__name__
    ]
    found.sort(key=lambda fn: fn.__code__.co_firstlineno)
    return [fn.__name__ for fn in found]


def _import(module_name: str, path: str | None) -> ModuleType:
    """The module, imported by name, or from its file (pytest's importlib import mode)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        if path is None:
            raise
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _case_specs(cases: str | Sequence[Callable[..., Any]]) -> list[CaseSpec]:
    if isinstance(cases, str):
        module = _import(cases, None)
        return [(cases, name, module.__file__) for name in case_names(module)]
    specs = []
    for fn in cases:
        if "." in fn.__qualname__:
            raise ValueError(f"case {fn.__qualname__} must be a module-level function")
        specs.append((fn.__module__, fn.__name__, inspect.getfile(fn)))
    names = [name for _, name, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique: {names}")
    return specs


# ----------------------------------------------------------------------------- rank side


def _store_barrier(store: dist.Store, key: str, world_size: int) -> None:
    """Wait until every rank reached ``key`` (uses the store, not a collective)."""
    if store.add(key, 1) == world_size:
        store.set(f"{key}/open", b"1")
    store.wait([f"{key}/open"])


def _run_one(spec: CaseSpec, rank: int, world_size: int) -> bytes:
    module_name, name, path = spec
    try:
        fn = getattr(_import(module_name, path), name)
        return pickle.dumps(("ok", name, fn(rank, world_size)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # pytest's Failed/Skipped are BaseExceptions
        return pickle.dumps(("error", name, traceback.format_exc()))


def _rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    specs: list[CaseSpec],
    collective_timeout: float,
    conn: Connection,
) -> None:
    """Entry point of one spawned rank: init gloo, run every case, report, tear down."""
    torch.set_num_threads(1)
    timeout = timedelta(seconds=collective_timeout)
    try:
        store = dist.FileStore(store_path, world_size)
        store.set_timeout(timeout)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        try:
            for index, spec in enumerate(specs):
                conn.send_bytes(_run_one(spec, rank, world_size))
                _store_barrier(store, f"_dist/case{index}", world_size)
        finally:
            dist.destroy_process_group()
        conn.send_bytes(pickle.dumps(("done", None, None)))
    except BaseException:  # report anything, the parent fails the run
        conn.send_bytes(pickle.dumps(("fatal", None, traceback.format_exc())))
    finally:
        conn.close()


# ----------------------------------------------------------------------------- parent side


_Reports = dict[str, dict[int, tuple[str, Any]]]  # case name -> rank -> (status, value)


def _read(conn: Connection, rank: int, reports: _Reports, problems: list[str]) -> bool:
    """Handle one message from ``rank``; True when the rank is finished (or gone)."""
    try:
        status, name, value = pickle.loads(conn.recv_bytes())
    except EOFError:
        problems.append(f"rank {rank} exited without finishing (crashed?)")
        return True
    if status == "fatal":
        problems.append(f"rank {rank} failed outside a case:\n{value}")
    if status in ("done", "fatal"):
        return True
    reports.setdefault(name, {})[rank] = (status, value)
    return False


def _collect(conns: dict[int, Connection], deadline: float) -> tuple[_Reports, list[str]]:
    """Read every rank's reports until all are done, one died, or the deadline passed.

    A rank that dies (or fails outside a case) leaves the others unable to finish
    any collective, so the run stops at once: what they already sent is kept,
    and the caller kills them.
    """
    reports: _Reports = {}
    problems: list[str] = []
    open_conns = {conn: rank for rank, conn in conns.items()}
    while open_conns and not problems:
        remaining = deadline - time.monotonic()
        ready = wait(list(open_conns), timeout=remaining) if remaining > 0 else []
        if not ready:
            problems.append("timed out")
        for conn in ready:
            if _read(conn, open_conns[conn], reports, problems):
                del open_conns[conn]
    stopped = []
    for conn, rank in open_conns.items():  # keep what the survivors already sent
        finished = False
        while not finished and conn.poll():
            finished = _read(conn, rank, reports, problems)
        if not finished:
            stopped.append(rank)
    if stopped:
        problems.append(f"ranks {stopped} had not finished and were killed")
    return reports, problems


def _stop(processes: list[Any]) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join()


def run_cases(
    world_size: int,
    cases: str | Sequence[Callable[..., Any]],
    *,
    timeout: float = 120.0,
    collective_timeout: float = 30.0,
) -> CaseResults:
    """Spawn ``world_size`` gloo ranks once and run every case in each of them, in order.

    Args:
        world_size: number of ranks (processes).
        cases: a module name (runs its ``case_*`` functions in source order) or a
            list of module-level functions ``fn(rank, world_size) -> picklable``.
        timeout: hard limit in seconds for the whole run; stragglers are killed.
        collective_timeout: process-group timeout: a collective (or the store
            barrier between cases) blocked this long raises instead of hanging.

    Returns:
        :class:`CaseResults`: ``results[name][rank]``; failed cases raise on lookup.
    """
    specs = _case_specs(cases)
    reports, problems = _spawn_and_collect(world_size, specs, timeout, collective_timeout)
    results = CaseResults(world_size)
    results.run_error = "\n".join(problems) or None
    for _, name, _ in specs:
        per_rank = reports.get(name, {})
        errors = [f"--- rank {r}:\n{v}" for r, (s, v) in sorted(per_rank.items()) if s != "ok"]
        missing = [r for r in range(world_size) if r not in per_rank]
        if missing:
            errors.append(f"--- ranks {missing} did not report: {results.run_error}")
        if errors:
            results.failures[name] = "\n".join(errors)
        else:
            results[name] = [per_rank[r][1] for r in range(world_size)]
    return results


def _spawn_and_collect(
    world_size: int, specs: list[CaseSpec], timeout: float, collective_timeout: float
) -> tuple[_Reports, list[str]]:
    """Start the ranks, gather their reports, and leave no process or file behind."""
    ctx = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="dion_lp_dist_")
    store_path = os.path.join(tmpdir, "store")
    processes, conns = [], {}
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            args = (rank, world_size, store_path, specs, collective_timeout, child_end)
            proc = ctx.Process(target=_rank_main, args=args, daemon=True)
            proc.start()
            child_end.close()  # the parent's copy: EOF on parent_end once the rank exits
            processes.append(proc)
            conns[rank] = parent_end
        reports, problems = _collect(conns, time.monotonic() + timeout)
    finally:
        _stop(processes)
        for conn in conns.values():
            conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    if problems:
        problems.append(f"exit codes: {[proc.exitcode for proc in processes]}")
    return reports, problems


def spawn_fixture(
    module_name: str,
    world_sizes: Sequence[int] = (2,),
    *,
    timeout: float = 120.0,
    name: str = "dist_results",
) -> Any:
    """A module-scoped pytest fixture running ``module_name``'s cases once per world size.

    Assign it at module level under the returned fixture's name::

        dist_results = spawn_fixture(__name__, (2, 3, 4))

    Tests taking ``dist_results`` run once per world size (``[world2]``, ...), and
    the ranks are spawned once per world size for the whole module.
    """

    @pytest.fixture(scope="module", params=list(world_sizes), ids=lambda n: f"world{n}", name=name)
    def _fixture(request: pytest.FixtureRequest) -> CaseResults:
        return run_cases(request.param, module_name, timeout=timeout)

    return _fixture
