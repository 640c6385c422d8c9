"""Resident memory of this process on Linux: the figures the memory benchmarks read.

Peak memory on a CPU is measured as peak RSS: ``VmHWM`` of ``/proc/self/status``
after the high-water mark was reset to the current RSS (``echo 5 >
/proc/self/clear_refs``). With glibc's default allocator, freed heap chunks stay
resident and whether a 16 MiB tensor lands in the heap or in its own mapping
depends on glibc's dynamic mmap threshold, so the figure can jump by tens of MiB
between identical runs. A child started with ``MALLOC_MMAP_THRESHOLD_`` set to
:data:`MMAP_THRESHOLD` maps every larger allocation on its own and unmaps it when
freed: its peak RSS is the peak of the bytes held by live tensors, reproducible
to ~1 MiB. Used by ``benchmarks/transient.py`` and ``examples/step_memory.py``.
"""

from __future__ import annotations

import contextlib
import ctypes

__all__ = ["MMAP_THRESHOLD", "reset_peak", "status_bytes", "trim_heap"]

MMAP_THRESHOLD = 65536  # bytes: the "live tensors" runs map every larger allocation


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Reset the resident-memory high-water mark (``VmHWM``) to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def trim_heap() -> None:
    """Give free heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
