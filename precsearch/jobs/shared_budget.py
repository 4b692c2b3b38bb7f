"""One time budget (``search --timeout``) shared by tuning and searching.

A model owner wants a front early and a better one by morning.  So the search
first runs on untuned kernels (oneDNN's convs need no tuning; the TIR kernels
around them run their fallback schedules) for a quarter of the budget, at most
20 minutes, and prints that front.  Then tuning rounds alternate with
searching: each round tunes the kernels heaviest first (by their measured
fallback time, :func:`precsearch.tvm.rank_heaviest_first`) with more trials per
kernel than the round before, for at most half the time left; the front plans
are then measured again with the new records, and the search goes on with
every new plan built tuned.  The last tuning round's search gets all the time
that is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

#: The first (untuned) front gets this share of the budget, at most FIRST_FRONT_MAX_S.
FIRST_FRONT_SHARE = 0.25
FIRST_FRONT_MAX_S = 20 * 60.0
#: A tuning round gets at most this share of the time left.
TUNING_SHARE = 0.5
#: MetaSchedule trials per kernel, round after round (a later round resumes each kernel's records).
TRIALS_PER_KERNEL = (8, 32, 64, 128)
#: A phase shorter than this is not started: extracting the tuning tasks alone takes tens of seconds.
MIN_PHASE_S = 60.0


@dataclass(frozen=True)
class Phase:
    """One step of the shared budget: search or tune, for at most ``time_s``."""

    kind: str  # "search" or "tune"
    time_s: float
    trials_per_kernel: int | None = None  # tune only
    last: bool = False  # the last tuning round: the search after it takes the rest of the budget

    @property
    def name(self) -> str:
        if self.kind == "tune":
            return f"tuning (heaviest kernels first, {self.trials_per_kernel} trials each)"
        return "searching"


class SharedBudget:
    """``timeout_s`` from ``started`` (``clock()``), handed out as search and tuning phases.

    Parameters
    ----------
    timeout_s : float
        The whole job's budget.
    clock : callable
        ``time.monotonic`` (tests pass a fake one).
    """

    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = float(timeout_s)
        self.clock = clock
        self.started = clock()

    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def left_s(self) -> float:
        return max(0.0, self.timeout_s - self.elapsed_s())

    def first_front(self) -> Phase:
        return Phase("search", min(FIRST_FRONT_SHARE * self.timeout_s, FIRST_FRONT_MAX_S))

    def tuning(self, round_index: int) -> Phase | None:
        """The ``round_index``-th tuning round (0 first), or None when too little time is left or no round is."""
        if round_index >= len(TRIALS_PER_KERNEL) or self.left_s() < 2 * MIN_PHASE_S:
            return None
        return Phase("tune", TUNING_SHARE * self.left_s(), TRIALS_PER_KERNEL[round_index],
                     last=round_index == len(TRIALS_PER_KERNEL) - 1)

    def search_after(self, tuning: Phase) -> Phase | None:
        """The search after a tuning round: half the time left, all of it after the last round; None when too
        little is left."""
        left = self.left_s()
        if left < MIN_PHASE_S:
            return None
        return Phase("search", left if tuning.last else 0.5 * left)

    def rest(self) -> Phase | None:
        """A search over all the time left (once no tuning round is due), or None when too little is left."""
        left = self.left_s()
        return Phase("search", left) if left >= MIN_PHASE_S else None
