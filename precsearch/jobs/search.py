"""``search`` and ``worker``: the whole overnight job as one call, from an opened storage to the written report.

The first worker prepares the workspace, measures the ONNX Runtime baselines
once per study, starts the extra local workers (``precsearch worker``
processes), runs its own share of the trials, re-measures the front and writes
the report after every trial and at the end.  A joining worker reads the
study's stored settings, so every worker builds the same plans the same way.
"""

from __future__ import annotations

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
               progress: Callable[[SearchProgress], None] | None = None) -> SearchRun:
    """Run (or resume) the search ``config`` describes and write its report; killed, it resumes with the same call.

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

    def on_trial(snapshot: SearchProgress) -> None:
        if progress is not None:
            progress(snapshot)
        write_study_report(handle.study, workdir)
        # Extra workers start after this worker's first plan: its peak memory is then what one build of this
        # model takes, which bounds how many can run at once.
        if config.workers > 1 and not children:
            count, why = worker_capacity(config.workers, peak_rss_bytes(), available_memory_bytes(), os.cpu_count())
            if why:
                say(why)
            children.extend(_start_workers(count, study_name, workdir, storage_url, say) or [None])

    try:
        summary = run_worker(handle, model, evaluator, seeds=seeds, progress=on_trial, guide=guide)
    except KeyboardInterrupt:
        # The trial in flight is already failed as "interrupted"; the report shows it so.
        write_study_report(handle.study, workdir)
        raise
    finally:
        for child in children:
            if child is not None:
                child.wait()
    remeasure_front(handle, evaluator, repeats=remeasure_repeats or REMEASURE_FACTOR * config.repeats, progress=say)
    report_dir = write_study_report(handle.study, workdir)
    return SearchRun(summary=summarize_study(handle, summary), handle=handle, report_dir=report_dir)


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
