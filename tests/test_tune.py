"""Kernel tuning: a persistent database, resumed runs, records reused by every mix, VNNI in int8 convs."""

import re

import numpy as np
import pytest

import models
from precsearch.tvm import CompileOptions, TuningDatabase, build_plan, database_dir, host_target
from precsearch.tvm._tune_database import FINISHED_FILE
from precsearch.model.data import image_batches
from precsearch.fidelity.reference import agreement, run_ort
from precsearch.model import load_model
from precsearch.model.plan import parse_plan
from precsearch.model.quantize import build_qdq_model, calibrate, output_steps
from precsearch.jobs.tune import representative_plans, tune_model
from precsearch.tvm import open_database
from precsearch.workspace import Workspace

pytestmark = pytest.mark.slow  # tunes a model once per module (minutes)

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

    def build(self, float_spec):
        plan = parse_plan(float_spec, self.model)
        qdq = build_qdq_model(self.model, self.ranges, plan) if plan.int8_ids(self.model) else self.model.proto
        return qdq, build_plan(self.model, qdq, plan.int8_ids(self.model), options=TIR_INT8,
                               database=self.database)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    return Tuned(tmp_path_factory.mktemp("tune"))


def test_representative_plans_cover_both_precisions_and_both_boundaries(tuned):
    keys = [plan.key() for plan in representative_plans(tuned.model)]
    assert keys == ["float:", "float:conv0,conv1,conv2", "float:conv0,conv2", "float:conv1"]


def test_tuning_fills_a_persistent_database_with_progress(tuned):
    report = tuned.report
    assert report.finished and report.tasks_skipped == 0 and report.tasks_total >= 6
    assert report.tasks_tuned + report.tasks_covered == report.tasks_total and report.tasks_covered >= 1
    assert report.records >= report.tasks_tuned  # at least one measured record per tuned kernel
    assert [entry[:2] for entry in tuned.progress] == [(i, report.tasks_total) for i in range(1, report.tasks_total + 1)]
    directory = database_dir(tuned.workdir, host_target())
    assert (directory / "database_tuning_record.json").stat().st_size > 0
    assert (directory / FINISHED_FILE).is_file()


def test_a_second_run_resumes_instead_of_retuning(tuned):
    # the JSON databases reload (a trace filed under the wrong workload makes MetaSchedule refuse the whole file)
    reopened = TuningDatabase(database_dir(tuned.workdir, host_target()))
    assert len(reopened) == tuned.report.records
    again = tune_model(tuned.workspace, trials_per_task=TRIALS)
    assert (again.tasks_tuned, again.trials_run) == (0, 0)
    assert again.tasks_skipped + again.tasks_covered == tuned.report.tasks_total
    assert again.records == tuned.report.records


def test_every_conv_of_any_mix_finds_its_records(tuned):
    # first+last float is none of the representative plans: its convs have other neighbours
    for spec in ("none", "all", "conv0,conv2", "conv0", "conv2"):
        _, built = tuned.build(spec)
        assert built.untuned_convs == (), spec
        assert built.tuned_kernels / built.total_kernels >= 0.75, (spec, built.tuned_kernels, built.total_kernels)


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
