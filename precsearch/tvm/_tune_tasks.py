"""Kernel tuning with MetaSchedule: which kernels to tune, and tuning them into the database.

Tuning happens once per distinct kernel, never inside a plan's build: the tasks
of a handful of representative plans (all-int8, all-float and the two
alternating mixes, whose boundaries cover every int8/float transition) are
extracted, deduplicated, and tuned task by task into MetaSchedule's JSON
database (:mod:`._tune_database`).

Each task is tuned by its own ``tune_tasks`` call so that a killed run keeps every
finished task (records are appended to the JSON files as they are measured) and
the next run skips tasks that already have their budget of records.

Every tuned kernel also gets a record of its fallback schedule (the one a build
gives a kernel without records), measured like MetaSchedule's candidates, so a
build applies a tuned schedule only where it measured faster than the fallback.
Purely element-wise kernels are not tuned at all: they keep the fallback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.ir.utils import derived_object

from precsearch.errors import ConfigError
from . import _intrinsics
from ._fallback_schedule import fallback_schedule, target_cores
from ._naming import kernel_layer
from ._trace import tvm_error_line
from ._tune_apply import pin_anchor_record
from ._tune_database import LOG_FILE, TuningDatabase

logger = logging.getLogger(__name__)

_INT8_CONV_BLOCK = "conv2d_NCHWc_int8"  # the compute name of topi.nn.conv2d_NCHWc_int8
_DEVICE_TYPE = "cpu"  # the runner's device for an LLVM target (the runner does not take "llvm")


@dataclass(frozen=True)
class TuningTask:
    """One distinct kernel to tune."""

    name: str
    mod: tvm.IRModule
    weight: int
    space: str  # "vnni16", "vnni8" or "default": the search space it is tuned in
    layer_index: int | None
    primary: bool = True  # first kernel of its anchor block; others reuse its records when they replay


@dataclass
class TuningReport:
    """What a tuning run did."""

    tasks_total: int
    tasks_tuned: int
    tasks_skipped: int  # already tuned by an earlier run
    tasks_covered: int  # served by records of another kernel with the same anchor block
    trials_run: int
    records: int
    time_s: float
    finished: bool
    tasks_elementwise: int = 0  # element-wise kernels left out of the tasks (they keep the fallback schedule)
    kernel_share_ms: dict = field(default_factory=dict)  # ranked kernel -> fallback ms x calls, heaviest first

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ExtractedTasks:
    """The kernels to tune, and how many element-wise kernels were left out."""

    tasks: list[TuningTask]
    elementwise: int


def extract_tuning_tasks(modules, target: tvm.target.Target) -> ExtractedTasks:
    """Structurally distinct kernels of the given fused modules; the first of each anchor block is primary.

    Primary kernels come first. The others share a conv (or other anchor block)
    with a primary one and are tuned only when none of its records replays on
    them (see :func:`tune_tasks`). Kernels without a reduction are left out
    (:func:`is_elementwise`).
    """
    exact = ms.database.MemoryDatabase(module_equality="structural")
    anchors = ms.database.MemoryDatabase(module_equality="anchor-block")
    tasks: list[TuningTask] = []
    elementwise = 0
    for mod in modules:
        for extracted in ms.relax_integration.extract_tasks(mod, target, module_equality="structural"):
            kernel = extracted.dispatched[0]
            if exact.has_workload(kernel):
                continue
            exact.commit_workload(kernel)
            if is_elementwise(kernel):
                elementwise += 1
                continue
            primary = not anchors.has_workload(kernel)
            anchors.commit_workload(kernel)
            tasks.append(TuningTask(name=extracted.task_name, mod=kernel, weight=int(extracted.weight),
                                    space=_space_of(kernel, target), primary=primary,
                                    layer_index=kernel_layer(extracted.task_name, kernel["main"])))
    logger.info("%d kernels to tune; %d element-wise kernels keep the fallback schedule", len(tasks), elementwise)
    return ExtractedTasks(sorted(tasks, key=lambda task: not task.primary), elementwise)


def is_elementwise(kernel: tvm.IRModule) -> bool:
    """Whether no block of ``kernel`` has a reduction iterator (a layout transform, concat, cast, activation).

    Why they are not tuned: such a kernel is one pass over memory, which the fallback schedule already runs
    in parallel and vectorized; there is no loop nest for tiling to improve, and leaving them out spends the
    tuning time on the kernels that have one.
    """
    schedule = tvm.s_tir.Schedule(kernel)
    pending = list(schedule.get_child_blocks(schedule.get_sblock("root")))
    while pending:
        block = pending.pop()
        if any(int(iter_var.iter_type) == tvm.tirx.IterVar.CommReduce for iter_var in schedule.get(block).iter_vars):
            return False
        pending.extend(schedule.get_child_blocks(block))
    return True


def _space_of(kernel: tvm.IRModule, target: tvm.target.Target) -> str:
    """VNNI tiling for a blocked int8 conv whose output block matches an intrinsic; default otherwise."""
    from tvm.target import codegen

    schedule = tvm.s_tir.Schedule(kernel)
    try:
        block = schedule.get_sblock(_INT8_CONV_BLOCK)
    except Exception:  # noqa: BLE001 — no int8 conv in this kernel
        return "default"
    lanes = int(schedule.get(block).writes[0].source.shape[-1])
    with target:
        has_vnni = bool(codegen.target_has_features("avx512vnni"))
        has_vl = bool(codegen.target_has_features("avx512vl"))
    if not has_vnni or lanes not in _intrinsics.VNNI_BY_LANES or (lanes == 8 and not has_vl):
        return "default"
    return f"vnni{lanes}"


def _space_generator(space: str):
    if space == "default":
        return ms.space_generator.PostOrderApply(sch_rules="llvm", postprocs="llvm", mutator_probs="llvm")
    intrin = _intrinsics.VNNI_BY_LANES[int(space[len("vnni"):])]
    # TVM's LLVM rules with the multi-level tiling swapped for its tensorizing
    # variant (what 0.2x's x86 "vnni" rule set did; 0.27 dropped it).
    rules = [
        ms.schedule_rule.MultiLevelTilingWithIntrin(
            intrin, structure="SSRSRS", tile_binds=None, max_innermost_factor=64, vector_load_lens=None,
            reuse_read=None, reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global"))
        if type(rule).__name__ == "MultiLevelTiling" else rule
        for rule in ms.schedule_rule.ScheduleRule.create("llvm")
    ]
    # RewriteLayout is left out: it rewrites the weight layout the intrinsic's tile reads.
    postprocs = [
        ms.postproc.DisallowDynamicLoop(),
        ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(),
        ms.postproc.RewriteTensorize(vectorize_init_loop=True),
    ]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs="llvm")


@derived_object
class InProcessBuilder(PyBuilder):
    """Compile candidates in this process.

    MetaSchedule's LocalBuilder starts a fresh process pool for every batch, and
    each worker re-imports all of TVM's tensor intrinsics (~12 s per batch on two
    cores); compiling in-process costs well under a second per batch.
    """

    def build(self, build_inputs):
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        from tvm.support.tar import tar

        results = []
        for item in build_inputs:
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                library = tvm.compile(mod, target=item.target)
                path = os.path.join(tempfile.mkdtemp(prefix="precsearch-ms-"), "kernel." + tar.output_format)
                library.export_library(path, fcompile=tar)
                results.append(BuilderResult(path, None))
            except Exception as exc:  # noqa: BLE001 — a failed candidate is MetaSchedule's to record
                results.append(BuilderResult(None, tvm_error_line(exc)))
        return results


def check_trials(trials_per_task) -> None:
    if not isinstance(trials_per_task, int) or trials_per_task < 1:
        raise ConfigError(f"The 'trials' parameter of tune must be a positive int; got {trials_per_task!r} instead.")


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 to ``path`` while MetaSchedule runs.

    Its C++ side writes thousands of warnings straight to stderr ("Tensorize
    failed" for every candidate whose tiles miss the intrinsic, "Unknown schedule
    rule" for topi's conv annotation), which would bury the progress lines.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def local_runner(threads: int):
    """MetaSchedule's LocalRunner timing candidates on ``threads`` threads, as deployment runs them.

    Its worker is a fresh process, and TVM's runtime sizes a fresh pool as
    hardware threads / 2 ("ignore hyper-threading"): 1 thread on these 2-core
    machines, so every kernel was tuned single-threaded.  The worker inherits
    ``TVM_NUM_THREADS``, which that sizing honours.
    """
    os.environ["TVM_NUM_THREADS"] = str(threads)
    return ms.runner.LocalRunner(timeout_sec=30, evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False))


def runtime_threads() -> int:
    """The TVM runtime's thread count in this process (run in a runner's worker by the tests)."""
    return int(tvm.get_global_func("runtime.NumThreads")())


def tune_tasks(tasks: list[TuningTask], database: TuningDatabase, target: tvm.target.Target, *,
               trials_per_task: int, threads: int = 2, timeout_s: float | None = None, progress=None,
               seed: int = 0, heaviest_first: bool = True) -> TuningReport:
    """Tune, one at a time, every primary kernel with fewer than ``trials_per_task`` records, then every
    other kernel that none of its anchor block's records replays on.

    Each kernel tuned (or covered by another kernel's record) also gets a record of its fallback schedule
    (:func:`commit_fallback_record`), so a build applies a tuned schedule only where it measured faster than
    the fallback. That record counts toward ``trials_per_task`` when a later run resumes the kernel.

    Parameters
    ----------
    progress : callable, optional
        Called as ``progress(done_tasks, total_tasks, task, trials_run, elapsed_s)`` after each task.
    timeout_s : float, optional
        Stop starting new tasks after this long; what was recorded stays.
    heaviest_first : bool
        Measure every primary kernel's fallback first (the record it needs anyway) and tune the kernels in
        order of fallback time × calls per inference, so a run cut short by ``timeout_s`` has spent its time
        where the model spends its own.
    """
    check_trials(trials_per_task)
    started = time.perf_counter()
    builder = InProcessBuilder()
    runner = local_runner(threads)
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=threads)
    tuned = skipped = covered_count = trials_run = 0
    finished = True
    work_dir = tempfile.mkdtemp(prefix="precsearch-tune-")
    share_ms: dict[str, float] = {}
    if heaviest_first:
        tasks, share_ms = rank_heaviest_first(tasks, database, target, builder, runner, trials_per_task,
                                              deadline=None if timeout_s is None else started + timeout_s)
    for done, task in enumerate(tasks, start=1):
        # Records are filed by anchor block, so only a primary kernel can count them as its own.
        existing = tuned_records(database, task, trials_per_task)
        done_before = database.finished_budget(task.mod) >= trials_per_task or existing >= trials_per_task
        covered = not done_before and not task.primary and pin_anchor_record(database, task.mod, target)
        if done_before or covered:
            if covered:
                # the pinned record carries the other kernel's time: let this kernel's fallback compete with it
                commit_fallback_record(task, database, target, builder, runner)
                database.mark_finished(task.mod, trials_per_task)
            covered_count += covered
            skipped += done_before
            if progress:
                progress(done, len(tasks), task, 0, time.perf_counter() - started)
            continue
        if timeout_s is not None and time.perf_counter() - started > timeout_s:
            finished = False
            logger.info("tuning time limit reached after %d of %d tasks", done - 1, len(tasks))
            break
        before = len(database)
        succeeded = _tune_one(task, database, target, trials_per_task - existing, builder=builder, runner=runner,
                              cost_model=cost_model, work_dir=work_dir, seed=seed + done, threads=threads)
        trials = len(database) - before
        if database.fallback_ms(task.mod) is None:  # not measured while ranking
            # also when tuning failed: a record that was measured before the failure must still beat the fallback
            commit_fallback_record(task, database, target, builder, runner)
        if succeeded:
            database.mark_finished(task.mod, trials_per_task)
        trials_run += trials
        tuned += 1
        if progress:
            progress(done, len(tasks), task, trials, time.perf_counter() - started)
    return TuningReport(tasks_total=len(tasks), tasks_tuned=tuned, tasks_skipped=skipped,
                        tasks_covered=covered_count, trials_run=trials_run,
                        records=len(database), time_s=time.perf_counter() - started, finished=finished,
                        kernel_share_ms=share_ms)


def rank_heaviest_first(tasks: list[TuningTask], database: TuningDatabase, target: tvm.target.Target, builder,
                        runner, trials_per_task: int, *, deadline: float | None = None
                        ) -> tuple[list[TuningTask], dict[str, float]]:
    """``tasks`` in the order to tune them, and each ranked kernel's fallback time × calls (ms per inference).

    Kernels already tuned to ``trials_per_task`` come first (they are skipped at once); then the primary
    kernels, heaviest first, by their fallback schedule's time measured as MetaSchedule measures candidates
    (committed as the kernel's fallback record, and remembered, so a later run ranks without measuring); then
    the kernels that share an anchor block with a primary one, in their order (they are tuned only when none of
    its records replays on them). Why the fallback's time and not a profile of a built model: it is the
    kernel's time exactly as extracted (a profile names the fused functions of one build, which a task's name
    does not match across plans), and its record is needed anyway. Past ``deadline`` nothing more is measured:
    the kernels not yet ranked keep their order after the ranked ones.
    """
    done, ranked, unranked, others = [], [], [], []
    shares: list[float] = []
    for task in tasks:
        if database.finished_budget(task.mod) >= trials_per_task or \
                tuned_records(database, task, trials_per_task) >= trials_per_task:
            done.append(task)
            continue
        if not task.primary:
            others.append(task)
            continue
        fallback_ms = database.fallback_ms(task.mod)
        if fallback_ms is None and (deadline is None or time.perf_counter() < deadline):
            run_secs = commit_fallback_record(task, database, target, builder, runner)
            if run_secs:
                fallback_ms = 1e3 * sum(run_secs) / len(run_secs)
                database.set_fallback_ms(task.mod, fallback_ms)
        if fallback_ms is None:
            unranked.append(task)
            continue
        shares.append(fallback_ms * max(task.weight, 1))
        ranked.append(task)
    order = sorted(range(len(ranked)), key=lambda index: -shares[index])
    share_ms = {}
    for index in order:  # two kernels may share a name (extracted from different plans): the heavier is shown
        share_ms.setdefault(ranked[index].name, shares[index])
    if order:
        logger.info("tuning heaviest first: %s", ", ".join(f"{ranked[i].name} {shares[i]:.3f} ms" for i in order[:5]))
    return done + [ranked[index] for index in order] + unranked + others, share_ms


def tuned_records(database: TuningDatabase, task: TuningTask, limit: int) -> int:
    """How many of a primary kernel's records (at most ``limit``) are MetaSchedule's, not its fallback's.

    Only a fallback measured by :func:`rank_heaviest_first` is known to be among them (its time is
    remembered); one filed by an older run counts as a trial, as it always did.
    """
    if not task.primary:
        return 0
    fallback = database.fallback_ms(task.mod) is not None
    return max(0, database.records_for(task.mod, limit + fallback) - fallback)


def _tune_one(task: TuningTask, database: TuningDatabase, target: tvm.target.Target, budget: int, *, builder,
              runner, cost_model, work_dir: str, seed: int, threads: int) -> bool:
    """Run MetaSchedule on one kernel with ``budget`` trials into its database; False when it failed."""
    context = ms.TuneContext(
        mod=task.mod, target=target, space_generator=_space_generator(task.space),
        search_strategy=ms.search_strategy.EvolutionarySearch(population_size=256, init_min_unmeasured=32,
                                                              genetic_num_iters=3),
        task_name=task.name, rand_state=seed, num_threads=threads)
    try:
        with _stderr_to(database.directory / LOG_FILE):
            ms.tune.tune_tasks(tasks=[context], task_weights=[1.0], work_dir=work_dir, max_trials_global=budget,
                               max_trials_per_task=budget, num_trials_per_iter=min(budget, 16), builder=builder,
                               runner=runner, database=_database_of(task, database), cost_model=cost_model,
                               task_scheduler="round-robin",
                               module_equality="anchor-block" if task.primary else "structural")
    except Exception as exc:  # noqa: BLE001 — one untunable kernel must not stop the others
        logger.warning("tuning %s failed: %s", task.name, tvm_error_line(exc))
        return False
    return True


def _database_of(task: TuningTask, database: TuningDatabase):
    """Where a task's records go: filed by anchor block for a primary kernel, by the exact kernel otherwise."""
    return database.ms_database if task.primary else database.exact_database


def commit_fallback_record(task: TuningTask, database: TuningDatabase, target: tvm.target.Target, builder,
                           runner) -> list[float] | None:
    """Measure the kernel's fallback schedule as MetaSchedule measures candidates; file it as a tuning record.

    Why: a build applies a kernel's fastest record in place of the fallback schedule
    (:class:`~._tune_apply.ApplyTuning`), and a record from a few trials is often much slower than the
    fallback (measured: a tuned MobileNetV3 build at twice the untuned latency). With the fallback's own
    record among the kernel's records, the fastest one is a tuned schedule only where it beat the fallback.
    The same builder and runner make the times comparable. Where the fallback changes nothing, the record
    is the unscheduled kernel (:func:`fallback_trace_schedule`), which is then what a build runs.

    Returns the measured run_secs, or None when the fallback could not be built or run (nothing committed).
    """
    schedule = fallback_trace_schedule(task.mod, target)
    run_secs = measure_schedule(schedule, target, builder, runner)
    if run_secs is None:
        logger.warning("the fallback schedule of %s could not be measured; its tuned records stand unchecked",
                       task.name)
        return None
    ms_database = _database_of(task, database)
    ms_database.commit_tuning_record(ms.database.TuningRecord(
        trace=schedule.trace, workload=ms_database.commit_workload(task.mod), run_secs=run_secs, target=target,
        args_info=ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
    logger.info("%s: fallback schedule %.4f ms", task.name, 1e3 * sum(run_secs) / len(run_secs))
    return run_secs


def fallback_trace_schedule(kernel: tvm.IRModule, target: tvm.target.Target) -> tvm.s_tir.Schedule:
    """The Schedule (with its trace) a build without records gives ``kernel``: the fallback, or none at all."""
    func = kernel["main"]
    scheduled = fallback_schedule(func, target_cores(target), inline=True)
    if scheduled is not None:
        return scheduled
    unscheduled = tvm.s_tir.Schedule(func)
    # An empty trace would be the unscheduled kernel, but MetaSchedule's get_top_k skips a record whose trace
    # has no instruction (TuningRecord::IsValid); one lookup, which changes nothing, keeps the record found.
    unscheduled.get_sblock("root")
    return unscheduled


def measure_schedule(schedule: tvm.s_tir.Schedule, target: tvm.target.Target, builder, runner) -> list[float] | None:
    """run_secs of ``schedule``'s kernel, built and timed as MetaSchedule does a candidate; None on failure."""
    built = builder.build([ms.builder.BuilderInput(schedule.mod, target)])[0]
    if built.error_msg:
        logger.warning("building a fallback schedule failed: %s", built.error_msg)
        return None
    try:
        args_info = ms.arg_info.ArgInfo.from_prim_func(schedule.mod["main"])
        result = runner.run([ms.runner.RunnerInput(built.artifact_path, _DEVICE_TYPE, args_info)])[0].result()
    except Exception as exc:  # noqa: BLE001 — a kernel whose fallback cannot be timed must not stop tuning
        logger.warning("timing a fallback schedule failed: %s", tvm_error_line(exc))
        return None
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg:
        logger.warning("timing a fallback schedule failed: %s", result.error_msg)
        return None
    return [float(secs) for secs in result.run_secs]
