"""``search`` and ``worker``: the whole overnight job as one call, from an opened storage to the written report.

The first worker prepares the workspace, measures the ONNX Runtime baselines
once per study, starts the extra local workers (``precsearch worker``
processes), runs its own share of the trials, re-measures the front and writes
the report after every trial and at the end.  A joining worker reads the
study's stored settings, so every worker builds the same plans the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from precsearch.model import LoadedModel, open_model
from precsearch.report.writer import REPORT_DIR, collect, write_report
from precsearch.study.config import SearchConfig, resolve_settings
from precsearch.study.evaluator import make_evaluator
from precsearch.study.record import StudyAttrs
from precsearch.errors import ConfigError
from precsearch.model.plan import BF16
from precsearch.study.search import (THREE_STATES, TWO_STATES, SearchProgress, SearchSummary, StudyHandle,
                                     measure_baselines, open_study, remeasure_front, run_worker, seed_plans,
                                     summarize_study)
from precsearch.study.guided import GuidedProposals
from precsearch.jobs.shared_budget import SharedBudget
from precsearch.study.sensitivity import CSV_NAME, layer_noise, most_sensitive, noise_from_table
from precsearch.study.storage import StorageError, open_storage, redact_url

logger = logging.getLogger(__name__)

# The search's own runs stay cheap; the front is timed again with this many times more runs before the report.
REMEASURE_FACTOR = 4


@dataclass(frozen=True)
class SearchRun:
    """How a search job ended: the study's summary, the opened study and where the report is."""

    summary: SearchSummary
    handle: StudyHandle
    report_dir: Path


def resolve_metric(model: LoadedModel, metric: str | None) -> str:
    """``metric`` checked against the model's first output, or the default for that output's shape."""
    return resolve_settings(model, SearchConfig(model=model.source, metric=metric)).metric


def write_study_report(study, workdir: Path, out_dir: Path | None = None) -> Path:
    """The study's CSV, plots and HTML report in ``out_dir`` (``<workdir>/report``); its folder."""
    out_dir = out_dir or workdir / REPORT_DIR
    write_report(collect(study, workdir=workdir), out_dir)
    return out_dir


def search_precisions(config: SearchConfig) -> tuple[str, ...]:
    """Each conv's choices for a new study of ``config``: bf16 too where ``config.bf16`` and this CPU allow it."""
    from precsearch.tvm import CompileOptions, bf16_unsupported_reason

    if config.bf16 == "off":
        return TWO_STATES
    reason = "ONNX Runtime's quantizer has no bf16 convs" if config.backend != "tvm" else \
        bf16_unsupported_reason(CompileOptions(threads=config.threads, conv_backend=config.conv_backend))
    if not reason:
        return THREE_STATES
    if config.bf16 == "on":
        raise ConfigError(f"--bf16 on: {reason}")
    logger.warning("each conv is searched as int8 or float (no bf16): %s", reason)
    return TWO_STATES


def run_search(config: SearchConfig, model: LoadedModel, preset: str | None, *, workdir: str | Path,
               storage_url: str, study_name: str | None = None, remeasure_repeats: int | None = None,
               status: Callable[[str], None] | None = None,
               progress: Callable[[SearchProgress], None] | None = None,
               front: Callable[[SearchSummary, StudyHandle], None] | None = None) -> SearchRun:
    """Run (or resume) the search ``config`` describes and write its report; killed, it resumes with the same call.

    With ``config.shares_time_with_tuning`` the search and the tuning of its kernels share ``config.timeout_s``
    (:mod:`precsearch.jobs.shared_budget`): an untuned front first, then tuning rounds between search phases.

    Parameters
    ----------
    config : SearchConfig
        Its ``metric`` may be None: the model's default metric is used.
    storage_url : str
        Optuna storage (SQLite or PostgreSQL); extra workers get it through the environment.
    status : callable, optional
        ``status(line)`` for each phase (preparing, baselines, workers started, re-measuring).
    progress : callable, optional
        ``progress(SearchProgress)`` after every trial of this worker.
    front : callable, optional
        ``front(summary, handle)`` with the study's front whenever a shared budget's phase ends (the first,
        untuned front; the front re-measured after each tuning round).
    """
    say = status or (lambda line: None)
    workdir = Path(workdir)
    storage = open_storage(storage_url, heartbeat_interval_s=config.heartbeat_interval_s,
                           grace_period_s=config.grace_period_s, max_retry=config.max_retry)
    config = resolve_settings(model, config)  # the study stores concrete values: a later default changes nothing
    metric = config.metric
    study_name = study_name or f"precsearch-{Path(config.model).stem}-{metric}"
    handle = open_study(config, model, storage, storage_url, study_name, metric,
                        precisions=search_precisions(config))
    sensitive = most_sensitive(workdir, model, config.sensitivity_k) if (workdir / CSV_NAME).is_file() else []
    seeds = seed_plans(model, sensitive, config.sensitivity_k, config.backends, handle.precisions)
    say(f"study {study_name!r} in {redact_url(storage_url)}; each conv {' / '.join(handle.precisions)}; "
        "preparing calibration, inputs and the float reference...")
    evaluator = make_evaluator(config, model, workdir, preset, metric)
    if not StudyAttrs(handle.study).baselines:
        say("measuring ONNX Runtime float and int8 (the report's baselines)...")
    measure_baselines(handle, evaluator)
    guide = None
    if config.guided:
        say("measuring each conv's quantization noise alone (the guided estimate's prior)...")
        bf16_noise = _layer_noise(handle, evaluator.workspace, workdir, "bf16") if BF16 in handle.precisions \
            else None
        guide = GuidedProposals(model, _layer_noise(handle, evaluator.workspace, workdir), backends=config.backends,
                                higher_is_better=handle.higher_is_better, metric=metric, bf16_noise=bf16_noise)

    children: list = []
    shared = SharedBudget(config.timeout_s) if config.shares_time_with_tuning else None
    phase = {"name": "searching"}
    repeats = remeasure_repeats or REMEASURE_FACTOR * config.repeats

    def on_trial(snapshot: SearchProgress) -> None:
        if progress is not None:
            name = phase["name"] if shared is None else \
                f"{phase['name']} ({shared.left_s() / 60:.0f} of {shared.timeout_s / 60:.0f} min left in all)"
            progress(dataclasses.replace(snapshot, phase=name))
        write_study_report(handle.study, workdir)
        # Extra workers start after this worker's first plan: its peak memory is then what one build of this
        # model takes, which bounds how many can run at once.
        if config.workers > 1 and not children:
            count, why = worker_capacity(config.workers, peak_rss_bytes(), available_memory_bytes(), os.cpu_count())
            if why:
                say(why)
            children.extend(_start_workers(count, study_name, workdir, storage_url, say) or [None])

    def search(timeout_s: float | None = None, name: str = "searching") -> SearchSummary:
        phase["name"] = name
        summary = run_worker(handle, model, evaluator, seeds=seeds, progress=on_trial, guide=guide,
                             timeout_s=timeout_s)
        # a shared budget's phases are one search: its time counts from the budget's start, tuning included
        return summary if shared is None else dataclasses.replace(summary, elapsed_s=shared.elapsed_s())

    try:
        if shared is None:
            summary = search()
        else:
            summary = _search_and_tune(shared, handle, evaluator, search, say=say, repeats=repeats,
                                       front=front, workdir=workdir)
    except KeyboardInterrupt:
        # The trial in flight is already failed as "interrupted"; the report shows it so.
        write_study_report(handle.study, workdir)
        raise
    finally:
        for child in children:
            if child is not None:
                child.wait()
    remeasure_front(handle, evaluator, repeats=repeats, progress=say,
                    tuning_records=_tuning_records(evaluator.workspace) if shared is not None else None)
    report_dir = write_study_report(handle.study, workdir)
    return SearchRun(summary=summarize_study(handle, summary), handle=handle, report_dir=report_dir)


def _search_and_tune(shared: SharedBudget, handle: StudyHandle, evaluator, search, *, say, repeats: int,
                     front, workdir: Path) -> SearchSummary:
    """The search phases and tuning rounds of one shared time budget; the last search phase's summary."""
    from precsearch.jobs.tune import model_tasks, tune_model
    from precsearch.measure import CpuLock

    workspace = evaluator.workspace
    first = shared.first_front()
    tuned_already = workspace.database is not None
    say(f"time budget {_duration(shared.timeout_s)} shared by searching and tuning: the first front from "
        f"{'the tuning database in the workdir' if tuned_already else 'untuned kernels'} within "
        f"{_duration(first.time_s)}")
    summary = search(first.time_s, "searching" + ("" if tuned_already else " (untuned kernels)"))
    _show_front(handle, summary, front, workdir)
    extracted = None
    for round_index in itertools.count():
        tuning = shared.tuning(round_index)
        if tuning is None:
            break
        say(f"{tuning.name}: at most {_duration(tuning.time_s)}")
        if extracted is None:
            extracted, extract_s = model_tasks(workspace)
            if not extracted.tasks:
                say("no kernel of this model has anything to tune (convs on oneDNN, element-wise kernels keep "
                    "their fallback schedules): searching for the rest of the time")
                break
        else:
            extract_s = 0.0
        records_before = _tuning_records(workspace)
        # Exclusive: no worker of this machine compiles or times a plan while MetaSchedule times candidates.
        with CpuLock().exclusive():
            report = tune_model(workspace, trials_per_task=tuning.trials_per_kernel,
                                timeout_s=max(1.0, tuning.time_s - extract_s), extracted=extracted)
        records = _tuning_records(workspace)
        say(f"tuned {report.tasks_tuned} of {report.tasks_total} kernels ({report.trials_run} trials, "
            f"{report.time_s / 60:.1f} min); {records - records_before} new records")
        if records != records_before:
            remeasure_front(handle, evaluator, repeats=repeats, progress=say, tuning_records=records)
            _show_front(handle, summary, front, workdir)
        search_phase = shared.search_after(tuning)
        if search_phase is None:
            return summary
        summary = search(search_phase.time_s, "searching (tuned kernels)")
        if tuning.last:
            return summary
    rest = shared.rest()
    if rest is not None:
        summary = search(rest.time_s, "searching")
    return summary


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _tuning_records(workspace) -> int:
    database = workspace.database
    return 0 if database is None else len(database)


def _show_front(handle: StudyHandle, summary: SearchSummary, front, workdir: Path) -> None:
    write_study_report(handle.study, workdir)
    if front is not None:
        front(summarize_study(handle, summary), handle)


def _layer_noise(handle: StudyHandle, workspace, workdir: Path, precision: str = "int8") -> dict[str, float]:
    """The study's stored per-conv noise (of each conv alone int8, or alone bf16), else ``sensitivity.csv``'s,
    else measured now (and stored)."""
    attrs = StudyAttrs(handle.study)
    stored = attrs.layer_noise if precision == "int8" else attrs.bf16_layer_noise
    if stored:
        return stored
    noise = noise_from_table(workdir, workspace.model, precision) or layer_noise(workspace, precision=precision)
    attrs.set(StudyAttrs.LAYER_NOISE if precision == "int8" else StudyAttrs.BF16_LAYER_NOISE, noise)
    return noise


def worker_capacity(requested: int, peak_rss_bytes: int, available_bytes: int | None,
                    cores: int | None) -> tuple[int, str]:
    """How many workers (this one included) this machine runs at once, and why fewer than ``requested`` (or "").

    Each worker builds plans at this process's peak memory (an untuned build of a 100-conv detector at 800×608
    peaks near 6 GB), so the extra ones get at most 90 % of the memory available now; and they compile in
    parallel but measure one at a time, so more workers than cores only slow every measurement down.
    """
    count, reasons = requested, []
    if cores and count > cores:
        count = cores
        reasons.append(f"{cores} cores")
    if available_bytes is not None and peak_rss_bytes > 0:
        extra = int(0.9 * available_bytes // peak_rss_bytes)
        if 1 + extra < count:
            count = 1 + extra
            reasons.append(f"{available_bytes / 2**30:.1f} GiB available, {peak_rss_bytes / 2**30:.1f} GiB per worker")
    if count == requested:
        return count, ""
    return count, f"running {count} of the {requested} workers asked for: {' and '.join(reasons)}"


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts kilobytes


def available_memory_bytes() -> int | None:
    """Memory the kernel could give new processes now (MemAvailable), None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _start_workers(count: int, study_name: str, workdir: Path, storage_url: str, say) -> list:
    children = []
    env = dict(os.environ, PRECSEARCH_STORAGE=storage_url)  # not on the command line, where ps shows it
    for index in range(1, count):
        log_path = workdir / f"worker-{index}.log"
        with open(log_path, "w") as log:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "precsearch", "worker", "--study", study_name, "--workdir", str(workdir),
                 "--index", str(index)], env=env, stdout=subprocess.DEVNULL, stderr=log))
        say(f"started worker {index} (pid {children[-1].pid}, log {log_path})")
    return children


def join_search(study_name: str, *, workdir: str | Path, storage_url: str, worker_index: int,
                progress: Callable[[SearchProgress], None] | None = None) -> SearchRun:
    """Join the running study ``study_name`` as one more worker, with the settings the study was made with."""
    import optuna

    workdir = Path(workdir)
    storage = open_storage(storage_url)
    try:
        stored = StudyAttrs(optuna.load_study(study_name=study_name, storage=storage)).config
    except KeyError:
        raise StorageError(f"The study {study_name!r} does not exist in {redact_url(storage_url)}.") from None
    if stored is None:
        raise StorageError(f"The study {study_name!r} in {redact_url(storage_url)} was not made by precsearch.")
    config = SearchConfig.from_dict(stored)
    storage = open_storage(storage_url, heartbeat_interval_s=config.heartbeat_interval_s,
                           grace_period_s=config.grace_period_s, max_retry=config.max_retry)
    model, preset = open_model(config.model, config.input_shapes)
    handle = open_study(config, model, storage, storage_url, study_name, config.metric, create=False)
    evaluator = make_evaluator(config, model, workdir, preset, config.metric)
    summary = run_worker(handle, model, evaluator, worker_index=worker_index, progress=progress)
    return SearchRun(summary=summary, handle=handle, report_dir=workdir / REPORT_DIR)
