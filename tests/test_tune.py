"""Kernel tuning: a persistent database, resumed runs, records reused by every mix, VNNI in int8 convs; the
fallback schedule measured among the records; element-wise kernels left out."""

import re

import numpy as np
import pytest
import tvm
import tvm_ffi

import models
from precsearch.tvm import (CompileOptions, TuningDatabase, build_plan, database_dir, extract_tuning_tasks,
                            host_target, resolve_target)
from precsearch.tvm._fallback_schedule import parallel_schedule, target_cores
from precsearch.tvm._tune_apply import ApplyTuning, best_schedule, replay
from precsearch.tvm._tune_tasks import InProcessBuilder, commit_fallback_record, is_elementwise, local_runner
from precsearch.tvm._tune_database import FINISHED_FILE
from precsearch.model.data import image_batches
from precsearch.fidelity.reference import agreement, run_ort
from precsearch.model import load_model
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate, output_steps
from precsearch.jobs.tune import representative_plans, tune_model
from precsearch.tvm import open_database
from precsearch.workspace import Workspace

slow = pytest.mark.slow  # the tests on the `tuned` fixture: it tunes a model once per module (minutes)

TRIALS = 4  # per kernel: enough to get a VNNI schedule into the database, not to make it fast
# Int8 convs as TIR kernels (what is tuned here): on a CPU with VNNI they would otherwise go to oneDNN, untuned.
TIR_INT8 = CompileOptions(onednn_int8=False)


class Tuned:
    """A 3-conv model with 16/32 channels (block 16: the 16-lane VNNI intrinsic), tuned once."""

    def __init__(self, directory):
        self.model = load_model(models.save(models.chain_model(channels=(16, 32, 32, 32), size=8),
                                            directory, "chain16"))
        self.ranges = calibrate(self.model, image_batches(self.model, None, count=4))
        self.check = image_batches(self.model, None, count=6, offset=4)
        self.workdir = directory / "work"
        self.progress = []
        self.workspace = Workspace.in_memory(self.model, self.workdir, image_batches(self.model, None, count=4),
                                             options=TIR_INT8, ranges=self.ranges)
        self.report = tune_model(self.workspace, trials_per_task=TRIALS, progress=lambda *args: self.progress.append(args))
        self.database = open_database(self.workdir, TIR_INT8)

    def kernels_with_reduction(self, float_spec) -> int:
        module = self.workspace.fused_module(parse_plan(float_spec, self.model))
        return sum(not is_elementwise(tvm.IRModule({"main": func})) for func in module.functions.values()
                   if isinstance(func, tvm.tirx.PrimFunc))

    def build(self, float_spec):
        plan = parse_plan(float_spec, self.model)
        qdq = build_qdq_model(self.model, self.ranges, plan) if plan.int8_ids(self.model) else self.model.proto
        return qdq, build_plan(self.model, qdq, plan.int8_ids(self.model), options=TIR_INT8,
                               database=self.database)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    return Tuned(tmp_path_factory.mktemp("tune"))


@slow
def test_representative_plans_cover_both_precisions_and_both_boundaries(tuned):
    keys = [plan.key() for plan in representative_plans(tuned.model)]
    assert keys == ["float:", "float:conv0,conv1,conv2", "float:conv0,conv2", "float:conv1"]


@slow
def test_tuning_fills_a_persistent_database_with_progress(tuned):
    report = tuned.report
    assert report.finished and report.tasks_skipped == 0 and report.tasks_total >= 6
    assert report.tasks_tuned + report.tasks_covered == report.tasks_total and report.tasks_covered >= 1
    assert report.records >= report.tasks_tuned  # at least one measured record per tuned kernel
    assert [entry[:2] for entry in tuned.progress] == [(i, report.tasks_total) for i in range(1, report.tasks_total + 1)]
    directory = database_dir(tuned.workdir, host_target())
    assert (directory / "database_tuning_record.json").stat().st_size > 0
    assert (directory / FINISHED_FILE).is_file()


@slow
def test_a_second_run_resumes_instead_of_retuning(tuned):
    # the JSON databases reload (a trace filed under the wrong workload makes MetaSchedule refuse the whole file)
    reopened = TuningDatabase(database_dir(tuned.workdir, host_target()))
    assert len(reopened) == tuned.report.records
    again = tune_model(tuned.workspace, trials_per_task=TRIALS)
    assert (again.tasks_tuned, again.trials_run) == (0, 0)
    assert again.tasks_skipped + again.tasks_covered == tuned.report.tasks_total
    assert again.records == tuned.report.records


@slow
def test_every_conv_of_any_mix_finds_its_records(tuned):
    # first+last float is none of the representative plans: its convs have other neighbours
    for spec in ("none", "all", "conv0,conv2", "conv0", "conv2"):
        _, built = tuned.build(spec)
        assert built.untuned_convs == (), spec
        # element-wise kernels are not tuned (they keep the fallback schedule): count the others
        tunable = tuned.kernels_with_reduction(spec)
        assert built.tuned_kernels / tunable >= 0.75, (spec, built.tuned_kernels, tunable, built.total_kernels)


@slow
def test_tuned_int8_build_agrees_with_ort_and_with_the_untuned_build(tuned):
    qdq, built = tuned.build("none")
    reference = run_ort(qdq, tuned.check, optimized=False)
    candidate = [built.run(batch) for batch in tuned.check]
    result = agreement(reference, candidate, output_steps(tuned.model, tuned.ranges))
    assert result.fraction == 1.0 and result.max_error_steps <= 1.0
    untuned = build_plan(tuned.model, qdq, parse_plan("none", tuned.model).int8_ids(tuned.model),
                         options=TIR_INT8)
    assert untuned.tuned_kernels == 0
    # int8 convs are exact either way; the float classifier head may sum in another order once tuned
    np.testing.assert_allclose(untuned.run(tuned.check[0])["logits"], built.run(tuned.check[0])["logits"],
                               rtol=1e-5, atol=1e-6)


def _has_vnni() -> bool:
    from tvm.target import codegen

    with host_target():
        return bool(codegen.target_has_features("avx512vnni"))


@pytest.mark.skipif(not _has_vnni(), reason="this CPU has no AVX-512 VNNI: no vpdpbusd to look for")
@slow
def test_tuned_int8_conv_runs_vnni_vpdpbusd(tuned):
    _, built = tuned.build("none")
    assembly = built.executable.mod.imports[0].inspect_source("asm")
    # Split the listing into functions. A kernel is its exported wrapper (`__tvm_ffi_<kernel>`), maybe the
    # kernel itself and, where its schedule has a parallel loop, a `<kernel>_compute_` lambda: which of them
    # holds the conv loop depends on the schedule the tuning picked, so a layer passes when any of them does.
    bodies = re.split(r"\n(?=[A-Za-z_][\w.]*:\n)", assembly)
    by_layer = {}
    for body in bodies:
        match = re.match(r"(?:__tvm_ffi_)?fused_\w*ps_conv_(L[12])_int8_NCHW16c", body)
        if match:
            by_layer.setdefault(match.group(1), []).append("vpdpbusd" in body)
    assert sorted(by_layer) == ["L1", "L2"], sorted(by_layer)
    assert {layer: any(found) for layer, found in by_layer.items()} == {"L1": True, "L2": True}
    _, float_built = tuned.build("all")
    assert "vpdpbusd" not in float_built.executable.mod.imports[0].inspect_source("asm")


@slow
def test_the_tuning_runner_times_kernels_on_the_deployed_thread_count(monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    from precsearch.tvm._tune_tasks import local_runner, runtime_threads

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    # A stock LocalRunner's fresh worker would size its pool as hardware threads / 2 (1 here), but unpickling
    # runtime_threads imports precsearch.tvm, which sets TVM_NUM_THREADS to every core before the pool starts.
    stock = ms.runner.LocalRunner(timeout_sec=30)
    assert stock.pool.submit(runtime_threads).result() == __import__("os").cpu_count()
    for threads in (1, 2):
        assert local_runner(threads).pool.submit(runtime_threads).result() == threads


# ---- the fallback schedule as a tuning record; element-wise kernels left out (fast: one tiny model, 1 trial)


class Tiny:
    """A 1-conv model; its conv runs on oneDNN, so its tuning tasks are its pool and its classifier."""

    def __init__(self, directory):
        self.model = load_model(models.save(models.chain_model(channels=(8, 16), size=8), directory, "one_conv"))
        ranges = calibrate(self.model, image_batches(self.model, None, count=2))
        self.workdir = directory / "work"
        self.workspace = Workspace.in_memory(self.model, self.workdir, image_batches(self.model, None, count=2),
                                             ranges=ranges)
        self.target = resolve_target(self.workspace.options)
        modules = [self.workspace.fused_module(plan) for plan in representative_plans(self.model)]
        self.tasks = extract_tuning_tasks(modules, self.target).tasks

    def task(self, name: str):
        return next(task for task in self.tasks if task.name == name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_tuned(tiny):
    """``tiny`` tuned 1 trial per kernel (about 30 s, most of it MetaSchedule importing its tensor intrinsics)."""
    return tune_model(tiny.workspace, trials_per_task=1)


def test_tuning_files_every_kernels_fallback_schedule_as_a_record(tiny, tiny_tuned):
    report = tiny_tuned
    assert report.tasks_tuned == len(tiny.tasks) >= 2 and report.tasks_elementwise >= 2
    assert report.records == report.trials_run + report.tasks_tuned  # one fallback record per tuned kernel
    reopened = TuningDatabase(database_dir(tiny.workdir, tiny.target))  # the traces survive the JSON files
    for task in tiny.tasks:
        database = reopened.ms_database if task.primary else reopened.exact_database
        records = database.get_top_k(database.commit_workload(task.mod), 64)
        fallback = parallel_schedule(task.mod["main"], target_cores(tiny.target), inline=True)
        assert fallback is not None, task.name
        matching = [record for record in records
                    if tvm_ffi.structural_equal(replay(record, task.mod, tiny.target).mod["main"], fallback)]
        assert matching, (task.name, len(records))
        tvm.ir.assert_structural_equal(replay(matching[0], task.mod, tiny.target).mod["main"], fallback)


def _unscheduled_record(database, kernel, run_secs, target):
    from tvm.s_tir import meta_schedule as ms

    schedule = tvm.s_tir.Schedule(kernel["main"])
    schedule.get_sblock("root")  # a record with an empty trace is never returned (TuningRecord::IsValid)
    return ms.database.TuningRecord(
        trace=schedule.trace, workload=database.commit_workload(kernel),
        run_secs=run_secs, target=target, args_info=ms.arg_info.ArgInfo.from_prim_func(kernel["main"]))


def test_a_record_slower_than_the_fallback_is_not_applied_and_a_faster_one_is(tiny, tmp_path):
    task = tiny.task("mean")  # the global average pool: a reduction the fallback runs in parallel
    assert task.primary
    database, target = TuningDatabase(tmp_path / "db"), tiny.target
    fallback_secs = commit_fallback_record(task, database, target, InProcessBuilder(),
                                           local_runner(tiny.workspace.options.threads))
    assert fallback_secs and all(secs > 0 for secs in fallback_secs)
    kernel, unscheduled = task.mod, task.mod["main"]
    fallback = parallel_schedule(unscheduled, target_cores(target), inline=True)
    assert not tvm_ffi.structural_equal(fallback, unscheduled)  # else the two records could not be told apart

    database.ms_database.commit_tuning_record(
        _unscheduled_record(database.ms_database, kernel, [1000 * max(fallback_secs)], target))
    applied, failure = best_schedule(database, kernel, target)
    assert failure == ""
    tvm.ir.assert_structural_equal(applied, fallback)
    applied_module = ApplyTuning(database, target)(tvm.IRModule({"main": unscheduled}))
    tvm.ir.assert_structural_equal(applied_module["main"].body, fallback.body, map_free_vars=True)

    database.ms_database.commit_tuning_record(
        _unscheduled_record(database.ms_database, kernel, [min(fallback_secs) / 1000], target))
    applied, _ = best_schedule(database, kernel, target)
    tvm.ir.assert_structural_equal(applied, unscheduled)


def test_a_kernel_the_fallback_leaves_alone_is_filed_unscheduled(tmp_path):
    from tvm import te

    from precsearch.tvm._tune_tasks import TuningTask

    # a sum to one value: no spatial loop to run in parallel or vectorize, nothing to inline
    values = te.placeholder((3,), name="values")
    k = te.reduce_axis((0, 3), name="k")
    total = te.compute((1,), lambda i: te.sum(values[k], axis=k), name="total")
    kernel = tvm.IRModule({"main": te.create_prim_func([values, total])})
    target = host_target()
    assert parallel_schedule(kernel["main"], target_cores(target)) is None
    task = TuningTask(name="total", mod=kernel, weight=1, space="default", layer_index=None)
    database = TuningDatabase(tmp_path / "db")
    assert commit_fallback_record(task, database, target, InProcessBuilder(), local_runner(1))
    records = database.ms_database.get_top_k(database.ms_database.commit_workload(kernel), 4)
    assert len(records) == 1
    tvm.ir.assert_structural_equal(replay(records[0], kernel, target).mod["main"], kernel["main"])
    applied, _ = best_schedule(database, kernel, target)
    tvm.ir.assert_structural_equal(applied, kernel["main"])


def test_element_wise_kernels_are_not_tuning_tasks_while_pools_and_convs_are(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    # SPPF: convs (int8 ones as TIR kernels), max pools, a concat and layout transforms around the blocked convs
    model = load_model(models.save(models.sppf_model(), tmp_path, "sppf"))
    ranges = calibrate(model, image_batches(model, None, count=2))
    workspace = Workspace.in_memory(model, tmp_path / "work", image_batches(model, None, count=2),
                                    options=TIR_INT8, ranges=ranges)
    target = resolve_target(TIR_INT8)
    modules = [workspace.fused_module(plan) for plan in representative_plans(model)]
    extracted = extract_tuning_tasks(modules, target)
    names = {task.name for task in extracted.tasks}
    assert any(name.startswith("max_pool2d") for name in names), names
    assert any("_conv_" in name for name in names), names
    kernels = [(task.task_name, task.dispatched[0]) for module in modules
               for task in ms.relax_integration.extract_tasks(module, target, module_equality="structural")]
    elementwise = [(name, kernel) for name, kernel in kernels if is_elementwise(kernel)]
    assert any(name.startswith("concatenate") for name, _ in elementwise), elementwise
    assert any("layout_transform" in name for name, _ in elementwise), elementwise

    def is_task(kernel) -> bool:
        return any(tvm_ffi.structural_equal(kernel, task.mod) for task in extracted.tasks)

    for name, kernel in kernels:
        assert is_task(kernel) != is_elementwise(kernel), name
    assert extracted.elementwise == len({tvm_ffi.structural_hash(kernel) for _, kernel in elementwise})
