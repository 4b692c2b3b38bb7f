"""How busy other processes kept the machine while something was timed.

precsearch's :class:`~precsearch.measure.CpuLock` keeps its own processes from
building while one of them times, but not a process outside precsearch.  On a
2-core machine any other busy process makes each 2-thread parallel region wait
for a scheduler time slice (a profile taken beside one read 4 ms per kernel, 0.2
alone).  The lock cannot prevent that; a measurement can at least say it
happened, and be taken again.  The CPU times come from psutil.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import psutil

from ._latency import Latency

#: Other processes keeping at least this many cores busy during a timing make it "loaded".
LOADED_CORES = 0.5


def _process_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except (psutil.Error, OSError):
            pass  # gone meanwhile
    return total


class CpuLoad:
    """CPU time used since it was made by every process except ``pids`` (default: this one)."""

    def __init__(self, pids: Iterable[int] | None = None):
        self.pids = set(pids) if pids is not None else {os.getpid()}
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        return sum(times), idle, _process_seconds(self.pids)  # every core's seconds, idle ones, ours

    def others_busy_cores(self) -> float:
        """Cores kept busy on average since then by processes not in ``pids``."""
        (total0, idle0, ours0), (total1, idle1, ours1) = self.start, self._sample()
        elapsed = max(total1 - total0, 1e-9)  # seconds summed over every core
        busy = elapsed - (idle1 - idle0) - (ours1 - ours0)
        return (psutil.cpu_count() or 1) * max(0.0, busy / elapsed)


def time_unloaded(measure: Callable[[], object], retakes: int = 1) -> tuple[object, float]:
    """``measure()``, taken again up to ``retakes`` times while other processes kept
    :data:`LOADED_CORES` busy during it; the least loaded measurement and that load (cores)."""
    best = None
    for _ in range(retakes + 1):
        load = CpuLoad()
        value = measure()
        busy = load.others_busy_cores()
        if best is None or busy < best[1]:
            best = (value, busy)
        if busy < LOADED_CORES:
            break
    return best


def latency_unloaded(measure: Callable[[], Latency]) -> Latency:
    """:func:`time_unloaded` of a timing: the kept :class:`Latency` with the load it was taken under."""
    latency, busy = time_unloaded(measure)
    return dataclasses.replace(latency, others_busy_cores=round(busy, 2))
