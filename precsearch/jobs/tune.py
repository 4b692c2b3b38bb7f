"""Tune every kernel any plan of a model can contain, once per model and CPU.

The kernels of a plan depend on its mix only through the neighbours fused into
each conv and the boundary kernels between precisions. Four plans cover them:
all-int8 and all-float give every conv in both precisions, and the two
alternating mixes (even convs float, then odd convs float) put an int8→float and
a float→int8 boundary after every conv. The database matches kernels by their
anchor block, so the records serve every other mix.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from precsearch.tvm import (TuningDatabase, TuningReport, check_trials, database_dir, extract_tuning_tasks,
                            resolve_target, tune_tasks)
from precsearch.files import atomic_write
from precsearch.model import LoadedModel
from precsearch.model.plan import Plan
from precsearch.workspace import Workspace

logger = logging.getLogger(__name__)

DEFAULT_TRIALS_PER_TASK = 32


def representative_plans(model: LoadedModel) -> list[Plan]:
    """All-int8, all-float and the two alternating mixes (fewer when the model has one conv)."""
    capable = model.capable_ids()
    plans = [Plan(frozenset()), Plan(frozenset(capable)), Plan(frozenset(capable[0::2])),
             Plan(frozenset(capable[1::2]))]
    unique = []
    for plan in plans:
        if plan not in unique:
            unique.append(plan)
    return unique


def model_tasks(workspace: Workspace) -> tuple:
    """The workspace model's tuning tasks (:class:`precsearch.tvm.ExtractedTasks`) and the seconds it took to
    extract them (tens of seconds on a 100-conv model: a shared budget extracts them once for every round)."""
    started = time.perf_counter()
    modules = [workspace.fused_module(plan) for plan in representative_plans(workspace.model)]
    extracted = extract_tuning_tasks(modules, resolve_target(workspace.options))
    extract_s = time.perf_counter() - started
    logger.info("%d distinct kernels to tune in %d representative plans (%.1f s)", len(extracted.tasks),
                len(modules), extract_s)
    return extracted, extract_s


def tune_model(workspace: Workspace, *, trials_per_task: int = DEFAULT_TRIALS_PER_TASK,
               timeout_s: float | None = None, progress=None, extracted=None) -> TuningReport:
    """Tune the workspace model's kernels into ``<workdir>/tuning/<cpu>-<cores>c``; resumes where a killed run stopped.

    Kernels are tuned heaviest first (:func:`precsearch.tvm.rank_heaviest_first`), so a run stopped by
    ``timeout_s`` has spent its time where the model spends its own.

    Parameters
    ----------
    progress : callable, optional
        ``progress(done_tasks, total_tasks, task_name, trials_run, elapsed_s)`` after each kernel.
    extracted : optional
        :func:`model_tasks`'s result, when the caller already has it.
    """
    check_trials(trials_per_task)  # before a minute of task extraction
    model, options = workspace.model, workspace.options
    target = resolve_target(options)
    database = TuningDatabase(database_dir(workspace.workdir, target))
    extract_s = 0.0
    if extracted is None:
        extracted, extract_s = model_tasks(workspace)
    tasks = extracted.tasks

    def on_task(done, total, task, trials, elapsed_s):
        if progress is not None:
            progress(done, total, task.name, trials, elapsed_s + extract_s)

    report = tune_tasks(tasks, database, target, trials_per_task=trials_per_task, threads=options.threads,
                        timeout_s=None if timeout_s is None else max(0.0, timeout_s - extract_s), progress=on_task)
    report.time_s += extract_s
    report.tasks_elementwise = extracted.elementwise
    _write_summary(database.directory, model, report, trials_per_task, tasks)
    return report


def _write_summary(directory: Path, model: LoadedModel, report: TuningReport, trials_per_task: int, tasks) -> None:
    """``<model sha>.json`` next to the database: what was tuned for this model, for reports and the README."""
    summary = {
        "model": Path(model.source).name,
        "sha256": model.sha256,
        "trials_per_task": trials_per_task,
        "tasks": len(tasks),
        "vnni_tasks": sum(task.space.startswith("vnni") for task in tasks),
        **report.to_dict(),
    }
    path = directory / f"{model.sha256[:16]}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    summary["time_s_total"] = previous.get("time_s_total", 0.0) + report.time_s
    atomic_write(path, json.dumps(summary, indent=2))
