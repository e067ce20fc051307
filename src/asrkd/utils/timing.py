"""Timing helpers shared by ``asrkd bench`` and the scripts in benchmarks/.

Standard library only: ``benchmarks/nemo_compare.py`` loads this file by path inside NeMo's
virtual environment, where asrkd is not installed."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path


def run_times(
    fn: Callable[[], object], repeats: int, warmup: int = 1, min_seconds: float = 0.0,
    max_repeats: int = 50,
) -> list[float]:
    """Wall times of the timed runs of ``fn()``, after ``warmup`` untimed runs.

    Runs at least ``repeats`` times and keeps going until the timed runs add up to
    ``min_seconds`` (at most ``max_repeats`` runs), as :mod:`timeit`'s autorange does: a call
    of half a second timed three times let two runs of the same architecture differ by a third
    on this 2-core VM, while the minimum over ~2 s of runs is stable.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(1, repeats) or (sum(times) < min_seconds
                                           and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(
    fn: Callable[[], object], repeats: int, warmup: int = 1, min_seconds: float = 0.0,
    max_repeats: int = 50,
) -> float:
    """The fastest of :func:`run_times` (same arguments): the figure every benchmark reports."""
    return min(run_times(fn, repeats, warmup, min_seconds, max_repeats))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space, in MB.

    Reads ``VmHWM`` from /proc/self/status. ``getrusage``'s ``ru_maxrss`` is not used on
    Linux: it survives ``execve``, so a child spawned by a large parent reports the parent's
    peak (measured: 2.3 GB instead of the child's own 1.05 GB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


__all__ = ["best_time", "cpu_model", "peak_rss_mb", "run_times"]
