"""The persistent tuning database: MetaSchedule's JSON files in one directory per CPU and core count.

Kernels are compared by their anchor block (the conv), so a conv tuned next to
an int8 requantize is found again next to a float add in a mixed plan; with the
default structural equality most convs of a mixed plan miss.
"""

from __future__ import annotations

import json
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from precsearch.errors import ConfigError
from precsearch.files import atomic_write
from ._options import resolve_target

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
EXACT_WORKLOAD_FILE = "exact_workload.json"
EXACT_RECORD_FILE = "exact_tuning_record.json"
FINISHED_FILE = "finished_tasks.json"
FALLBACK_FILE = "fallback_ms.json"
LOG_FILE = "tuning.log"


class TuningDatabase:
    """MetaSchedule's JSON database in ``directory``, comparing kernels by anchor block.

    Records are specific to a target, so keep one directory per target
    (:func:`database_dir`).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"The tuning database directory {str(self.directory)!r} cannot be created: "
                              f"{exc.strerror}.") from exc
        self.ms_database = ms.database.JSONDatabase(
            path_workload=str(self.directory / WORKLOAD_FILE),
            path_tuning_record=str(self.directory / RECORD_FILE),
            allow_missing=True,
            module_equality="anchor-block",
        )
        # Kernels tuned in their own form go to a second database with exact
        # equality: filed under an anchor-block workload, their traces name blocks
        # that workload lacks, and the JSON database then refuses to load at all.
        self.exact_database = ms.database.JSONDatabase(
            path_workload=str(self.directory / EXACT_WORKLOAD_FILE),
            path_tuning_record=str(self.directory / EXACT_RECORD_FILE),
            allow_missing=True,
            module_equality="structural",
        )

    def __len__(self) -> int:
        return len(self.ms_database) + len(self.exact_database)

    def finished_budget(self, mod: tvm.IRModule) -> int:
        """The largest trial budget a finished tuning of exactly this kernel had (0 if never finished).

        Record counts alone cannot tell a finished task: small search spaces
        (a reshape, a transpose) run out of candidates after a trial or two.
        """
        return int(self._finished().get(_kernel_key(mod), 0))

    def mark_finished(self, mod: tvm.IRModule, trials: int) -> None:
        finished = self._finished()
        key = _kernel_key(mod)
        finished[key] = max(trials, int(finished.get(key, 0)))
        atomic_write(self.directory / FINISHED_FILE, json.dumps(finished, indent=0, sort_keys=True))

    def _finished(self) -> dict:
        path = self.directory / FINISHED_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def fallback_ms(self, mod: tvm.IRModule) -> float | None:
        """The measured time of this kernel's fallback schedule (its record is in the database), or None."""
        path = self.directory / FALLBACK_FILE
        times = json.loads(path.read_text()) if path.is_file() else {}
        return times.get(_kernel_key(mod))

    def set_fallback_ms(self, mod: tvm.IRModule, time_ms: float) -> None:
        """Remember the fallback's time: it ranks the kernels of later runs without measuring (or committing) it
        again."""
        path = self.directory / FALLBACK_FILE
        times = json.loads(path.read_text()) if path.is_file() else {}
        times[_kernel_key(mod)] = time_ms
        atomic_write(path, json.dumps(times, indent=0, sort_keys=True))

    def records_for(self, mod: tvm.IRModule, limit: int) -> int:
        """How many tuning records (at most ``limit``) the database holds for this kernel."""
        if not self.ms_database.has_workload(mod):
            return 0
        return len(self.ms_database.get_top_k(self.ms_database.commit_workload(mod), limit))


def _kernel_key(mod: tvm.IRModule) -> str:
    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def database_dir(workdir: str | Path, target: tvm.target.Target) -> Path:
    """``<workdir>/tuning/<cpu>-<cores>c``: records hold for one CPU model and core count."""
    cpu = str(target.attrs.get("mcpu", "generic"))
    cores = int(target.attrs.get("num-cores", 0) or 0)
    return Path(workdir) / "tuning" / f"{cpu}-{cores}c"


def open_database(workdir: str | Path, options) -> TuningDatabase | None:
    """The tuning database of this CPU in ``workdir``, or None when nothing was tuned there yet.

    ``options`` is a :class:`~precsearch.tvm.CompileOptions`: its target names the CPU.
    """
    directory = database_dir(workdir, resolve_target(options))
    if not (directory / RECORD_FILE).is_file():
        return None
    return TuningDatabase(directory)


def database_stamp(workdir: str | Path, options) -> tuple:
    """(size, mtime) of each record file of the tuning database in ``workdir`` (None where missing): it changes
    whenever a record is filed, so a holder of an opened database knows when to read it again."""
    directory = database_dir(workdir, resolve_target(options))
    stamps = []
    for name in (RECORD_FILE, EXACT_RECORD_FILE):
        try:
            status = (directory / name).stat()
        except FileNotFoundError:
            stamps.append(None)
            continue
        stamps.append((status.st_size, status.st_mtime_ns))
    return tuple(stamps)
