"""One machine, one measurement at a time, and no compile beside it.

Workers of a search (``--workers N``, or ``precsearch worker`` started twice on
one machine) compile in parallel but must not time a plan while a neighbour
compiles or times another.  A reader-writer lock over files in the temp folder
does it across processes: compiling holds it shared, measuring exclusive.  The
turnstile file keeps a stream of compiles from starving a waiting measurement
(``flock`` itself promises no fairness).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir())


class CpuLock:
    """A cross-process reader-writer lock: :meth:`shared` to compile, :meth:`exclusive` to measure.

    Parameters
    ----------
    directory : path, optional
        Where the two lock files live (default: the temp folder, so every
        precsearch process of this user on this machine shares them).
    """

    def __init__(self, directory: str | Path | None = None):
        folder = Path(directory) if directory is not None else default_lock_dir()
        folder.mkdir(parents=True, exist_ok=True)
        uid = os.getuid() if hasattr(os, "getuid") else 0
        self.rw_path = folder / f"precsearch-{uid}-cpu.lock"
        self.turnstile_path = folder / f"precsearch-{uid}-cpu.turnstile"

    @contextlib.contextmanager
    def _hold(self, mode: int):
        # Taking the turnstile first, and holding it while waiting, stops new
        # readers from slipping in ahead of a waiting writer.
        turnstile = os.open(self.turnstile_path, os.O_RDWR | os.O_CREAT, 0o666)
        fd = os.open(self.rw_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            try:
                fcntl.flock(fd, mode)
            finally:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            os.close(turnstile)

    def shared(self):
        """Held while compiling or evaluating: any number at once."""
        return self._hold(fcntl.LOCK_SH)

    def exclusive(self):
        """Held while timing: alone on the machine."""
        return self._hold(fcntl.LOCK_EX)


def held_shared(lock: CpuLock | None):
    """``lock.shared()``, or a context that holds nothing where there is no lock (an evaluator that times
    nothing)."""
    return lock.shared() if lock is not None else contextlib.nullcontext()
