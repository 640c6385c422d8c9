"""Leaving a spawned gloo rank cleanly.

A rank that returns normally is torn down by interpreter shutdown, and there
gloo's worker threads can still hold work objects whose destruction needs the
GIL: the process then aborts (SIGABRT, "terminate called without an active
exception") after its results were written, roughly one run in ten on this CPU.
The parent sees a failed rank. :func:`exit_rank` frees what can be freed,
destroys the process group while the interpreter is alive, flushes, and exits
without interpreter shutdown.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, NoReturn

import torch.distributed as dist

__all__ = ["exit_rank"]


def exit_rank(queue: Any = None) -> NoReturn:
    """End a rank that finished its work: exit code 0, no interpreter shutdown.

    Args:
        queue: a ``multiprocessing`` queue the rank wrote to; its feeder thread is
            drained first, so no message is lost.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if queue is not None:
        queue.close()
        queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
