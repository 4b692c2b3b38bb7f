"""precsearch.workspace: one model prepared once (data, calibration, reference, ORT int8, tuning database).

A tiny 3-conv chain model, untuned TVM builds.  Checks that an all-float build
never calibrates, an int8 workspace calibrates once, the calibration set is the
same with or without an evaluation set, ``in_memory`` trusts what it is given,
``workdir=None`` writes nothing, ``from_config`` maps a search's settings, and
the evaluator builds through the very same path.
"""

import numpy as np
import onnxruntime.quantization
import pytest

import models
from precsearch import workspace as workspace_module
from precsearch.fidelity import reference as reference_module
from precsearch.measure import CpuLock
from precsearch.model import load_model, quantize as quantize_module
from precsearch.model.data import image_batches, load_batches, split_batches
from precsearch.model.plan import Plan
from precsearch.study.config import SearchConfig
from precsearch.study.evaluator import TvmEvaluator
from precsearch.tvm import CompileOptions
from precsearch.workspace import CACHE_DIR, DataSettings, PlanBuild, Workspace

ALL_IDS = ("conv0", "conv1", "conv2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    loaded = load_model(models.save(models.chain_model(), tmp_path_factory.mktemp("model"), "chain"))
    assert loaded.capable_ids() == ALL_IDS
    return loaded


@pytest.fixture(scope="module")
def model_ranges(model):
    """The chain model's calibration on its first two sample batches (what a calibration_batches=2 workspace uses)."""
    return quantize_module.calibrate(model, image_batches(model, None, 2))


def _workspace(model, workdir, eval_batches=2, **kwargs):
    return Workspace(model, workdir, DataSettings(data="samples", calibration_batches=2, eval_batches=eval_batches),
                     CompileOptions(), untuned=True, **kwargs)


def _forbid(monkeypatch, target, name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} must not be called")

    monkeypatch.setattr(target, name, forbidden)


def _count_calls(monkeypatch, target, name):
    calls = []
    real = getattr(target, name)

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, counting)
    return calls


def _assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert sorted(a) == sorted(e)
        for name in e:
            assert a[name].dtype == e[name].dtype
            np.testing.assert_array_equal(a[name], e[name])


def _assert_outputs_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name])


# --------------------------------------------------------------------------- all-float: nothing to calibrate


def test_all_float_qdq_model_is_the_models_own_proto(model, tmp_path, monkeypatch):
    _forbid(monkeypatch, workspace_module, "calibrate")
    workspace = _workspace(model, tmp_path)
    assert workspace.qdq_model(Plan(frozenset(ALL_IDS))) is model.proto
    assert "ranges" not in workspace.__dict__


def test_building_all_float_never_calibrates(model, tmp_path, monkeypatch):
    _forbid(monkeypatch, workspace_module, "calibrate")
    workspace = _workspace(model, tmp_path)
    plan = Plan(frozenset(ALL_IDS))
    build = workspace.build(plan)
    assert isinstance(build, PlanBuild)
    assert build.plan == plan
    assert build.qdq is model.proto
    assert build.int8_ids == ()
    assert build.built.float_layers == ALL_IDS
    assert "ranges" not in workspace.__dict__
    assert "_batches" not in workspace.__dict__  # not even the data is loaded for an all-float build
    assert not (tmp_path / CACHE_DIR).exists()
    reference = reference_module.run_ort(model.proto, image_batches(model, None, 1))[0]
    out = build.built.run(image_batches(model, None, 1)[0])
    np.testing.assert_allclose(out["logits"], reference["logits"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- int8: calibrate once


def test_int8_plans_calibrate_exactly_once_across_two_builds(model, model_ranges, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch, workspace_module, "calibrate")
    workspace = _workspace(model, tmp_path)
    first = workspace.build(Plan(frozenset()))
    second = workspace.build(Plan(frozenset({"conv1"})))
    assert len(calls) == 1
    (args, kwargs) = calls[0]
    assert args[0] is model
    assert args[1] is workspace.calibration_batches
    assert args[2] == "minmax"
    assert kwargs == {"cache_dir": tmp_path / CACHE_DIR}
    assert first.int8_ids == ALL_IDS
    assert second.int8_ids == ("conv0", "conv2")
    assert workspace.ranges.ranges == model_ranges.ranges
    assert sorted(p.name.split("-")[0] for p in (tmp_path / CACHE_DIR).iterdir()) == ["calibration"]


def test_a_second_workspace_on_the_same_workdir_reads_the_cached_calibration(model, tmp_path, monkeypatch):
    ranges = _workspace(model, tmp_path).ranges
    _forbid(monkeypatch, quantize_module, "create_calibrator")
    again = _workspace(model, tmp_path).ranges
    assert again.ranges == ranges.ranges
    assert again.method == "minmax"


# --------------------------------------------------------------------------- data


def test_calibration_and_eval_batches_are_split_batches(model, tmp_path):
    workspace = _workspace(model, tmp_path, eval_batches=3)
    calibration, evaluation = split_batches(model, "samples", None, 2, 3)
    _assert_batches_equal(workspace.calibration_batches, calibration)
    _assert_batches_equal(workspace.eval_batches, evaluation)
    _assert_batches_equal(workspace.calibration_batches, image_batches(model, None, 2))
    _assert_batches_equal(workspace.eval_batches, image_batches(model, None, 3, offset=2))
    # The two sets differ (disjoint slices of one order).
    assert not np.array_equal(workspace.calibration_batches[0]["input"], workspace.eval_batches[0]["input"])


def test_without_eval_batches_calibration_is_load_batches(model, tmp_path):
    workspace = _workspace(model, tmp_path, eval_batches=0)
    assert workspace.eval_batches == []
    _assert_batches_equal(workspace.calibration_batches, load_batches(model, "samples", None, count=2))


def test_calibration_is_the_same_with_or_without_an_eval_set(model, tmp_path):
    with_eval = _workspace(model, tmp_path / "a", eval_batches=2)
    without = _workspace(model, tmp_path / "b", eval_batches=0)
    _assert_batches_equal(without.calibration_batches, with_eval.calibration_batches)
    assert without.ranges.ranges == with_eval.ranges.ranges
    for name, attrs in with_eval.ranges.tensor_data.items():
        for key, value in attrs.items():
            np.testing.assert_array_equal(without.ranges.tensor_data[name][key], value)
    # Same calibration, same cache key: both workdirs hold the same calibration file name.
    assert [p.name for p in (tmp_path / "a" / CACHE_DIR).iterdir()] == \
        [p.name for p in (tmp_path / "b" / CACHE_DIR).iterdir()]
    plan = Plan(frozenset({"conv2"}))
    assert without.qdq_model(plan).SerializeToString() == with_eval.qdq_model(plan).SerializeToString()


def test_timing_input_is_the_first_eval_batch(model, tmp_path):
    workspace = _workspace(model, tmp_path, eval_batches=2)
    assert workspace.timing_input is workspace.eval_batches[0]
    _assert_batches_equal([workspace.timing_input], image_batches(model, None, 1, offset=2))


def test_timing_input_without_eval_set_is_the_first_calibration_batch(model, tmp_path):
    workspace = _workspace(model, tmp_path, eval_batches=0)
    assert workspace.timing_input is workspace.calibration_batches[0]
    _assert_batches_equal([workspace.timing_input], image_batches(model, None, 1))


# --------------------------------------------------------------------------- in memory


def test_in_memory_with_ranges_and_reference_never_computes_them(model, model_ranges, tmp_path, monkeypatch):
    calibration = image_batches(model, None, 2)
    evaluation = image_batches(model, None, 2, offset=2)
    reference = reference_module.reference_outputs(model, evaluation)
    _forbid(monkeypatch, workspace_module, "calibrate")
    _forbid(monkeypatch, workspace_module, "reference_outputs")
    _forbid(monkeypatch, workspace_module, "load_batches")
    _forbid(monkeypatch, workspace_module, "split_batches")
    workspace = Workspace.in_memory(model, tmp_path, iter(calibration), iter(evaluation), ranges=model_ranges,
                                    reference=reference)
    assert workspace.ranges is model_ranges
    assert workspace.reference is reference
    assert workspace.calibration_batches == calibration  # made lists (iterators are accepted)
    assert workspace.calibration_batches[0] is calibration[0]
    assert workspace.eval_batches[1] is evaluation[1]
    assert workspace.timing_input is evaluation[0]
    assert workspace.data == DataSettings(data="<in memory>", calibration_batches=2, eval_batches=2)
    assert workspace.untuned is True
    assert workspace.prepare(ort_int8=False) is workspace
    assert workspace.database is None
    build = workspace.build(Plan(frozenset({"conv0"})))
    assert build.int8_ids == ("conv1", "conv2")
    assert not (tmp_path / CACHE_DIR).exists()


def test_in_memory_without_ranges_calibrates_its_batches_once(model, model_ranges, tmp_path, monkeypatch):
    calibration = image_batches(model, None, 2)
    calls = _count_calls(monkeypatch, workspace_module, "calibrate")
    workspace = Workspace.in_memory(model, None, calibration)
    assert workspace.eval_batches == []
    assert workspace.timing_input is calibration[0]
    assert workspace.ranges.ranges == model_ranges.ranges
    assert workspace.ranges is workspace.ranges
    assert len(calls) == 1
    assert calls[0][0][1] == calibration
    assert calls[0][1] == {"cache_dir": None}


# --------------------------------------------------------------------------- caching


def test_workdir_none_caches_nothing_and_builds_untuned(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _forbid(monkeypatch, workspace_module, "open_database")
    calls = _count_calls(monkeypatch, workspace_module, "calibrate")
    references = _count_calls(monkeypatch, workspace_module, "reference_outputs")
    workspace = Workspace(model, None, DataSettings(data="samples", calibration_batches=2, eval_batches=2),
                          CompileOptions(), untuned=False)
    assert workspace.workdir is None
    assert workspace.untuned is True  # no workdir: no tuning database to read
    assert workspace.cache_dir is None
    workspace.prepare()
    assert workspace.database is None
    assert calls[0][1] == {"cache_dir": None}
    assert references[0][1] == {"cache_dir": None}
    assert len(workspace.reference) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_gets_cache_files_for_each_prepared_value(model, tmp_path):
    workdir = tmp_path / "work"
    workspace = Workspace(model, workdir, DataSettings(data="samples", calibration_batches=2, eval_batches=2),
                          CompileOptions())
    assert workspace.untuned is False
    assert workspace.cache_dir == workdir / CACHE_DIR
    workspace.prepare()
    assert workspace.database is None  # nothing was tuned in this workdir
    names = sorted(p.name for p in (workdir / CACHE_DIR).iterdir())
    assert [name.split("-")[0] for name in names] == ["calibration", "ort", "reference"]
    assert names[0].endswith(".json") and names[1].startswith("ort-int8-") and names[1].endswith(".onnx")
    assert names[2].endswith(".npz")


def test_a_second_workspace_reuses_every_cache_file(model, tmp_path, monkeypatch):
    first = _workspace(model, tmp_path).prepare()
    _forbid(monkeypatch, quantize_module, "create_calibrator")
    _forbid(monkeypatch, reference_module, "run_ort")
    _forbid(monkeypatch, onnxruntime.quantization, "quantize_static")
    second = _workspace(model, tmp_path).prepare()
    assert second.ranges.ranges == first.ranges.ranges
    for a, b in zip(second.reference, first.reference):
        _assert_outputs_equal(a, b)
    assert second.ort_int8_model.SerializeToString() == first.ort_int8_model.SerializeToString()


# --------------------------------------------------------------------------- from_config


def test_from_config_maps_the_search_settings(model, tmp_path):
    config = SearchConfig(model="chain.onnx", data="samples", calibration="entropy", calibration_batches=3,
                          eval_batches=5, block_size=8, float_layout="nchw", threads=1, requant="float32",
                          untuned=True)
    workspace = Workspace.from_config(config, model, tmp_path, preset="imagenet")
    assert workspace.model is model
    assert workspace.workdir == tmp_path
    assert workspace.options == CompileOptions(block_size=8, float_blocked=False, int8_blocked=True, threads=1,
                                               requant_dtype="float32")
    assert workspace.data == DataSettings(data="samples", preset="imagenet", calibration="entropy",
                                          calibration_batches=3, eval_batches=5)
    assert workspace.untuned is True


def test_from_config_defaults_and_the_configs_own_preset(model, tmp_path):
    config = SearchConfig(model="chain.onnx", preset="ddddocr-rec")
    workspace = Workspace.from_config(config, model, tmp_path, preset="imagenet")
    assert workspace.options == CompileOptions(block_size=None, float_blocked=True, threads=2, requant_dtype="float64")
    # The chain model ends in a classifier: top-1 by default, so 256 evaluation samples.
    assert workspace.data == DataSettings(data="samples", preset="ddddocr-rec", calibration="minmax",
                                          calibration_batches=8, eval_batches=256)
    assert workspace.untuned is False


# --------------------------------------------------------------------------- one path


def test_workspace_and_evaluator_build_the_same_library(model, tmp_path, monkeypatch):
    workspace = _workspace(model, tmp_path)
    evaluator = TvmEvaluator(workspace=workspace, metric="sqnr_db", goal=None, warmup=1, repeats=3,
                             lock=CpuLock(tmp_path / "lock"))
    builds = _count_calls(monkeypatch, workspace_module, "build_plan")
    plan = Plan(frozenset({"conv1"}))
    direct = workspace.build(plan)
    through = evaluator.build(plan)
    assert len(builds) == 2  # the evaluator builds through the workspace's build_plan call
    assert builds[0][1]["options"] is builds[1][1]["options"] is workspace.options
    assert through.int8_ids == direct.int8_ids == ("conv0", "conv2")
    assert through.qdq.SerializeToString() == direct.qdq.SerializeToString()
    batch = workspace.eval_batches[0]
    _assert_outputs_equal(through.built.run(batch), direct.built.run(batch))


def test_bench_times_and_profiles_only_holding_the_machines_cpu_lock(model, tmp_path, monkeypatch):
    # A search on the same machine builds holding the lock shared: bench's timings (and its profile) must wait
    # for it, and a search's builds for them, as the search's own timings do.
    import contextlib
    import threading
    import time

    from precsearch.jobs import bench as bench_module

    lock = CpuLock(tmp_path / "lock")
    events = []
    real_measure = bench_module.measure_library

    def measure(*args, **kwargs):
        events.append("timed")
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(bench_module, "measure_library", measure)

    @contextlib.contextmanager
    def recording_exclusive():
        with lock.exclusive():
            events.append("locked")
            yield
            events.append("unlocked")

    class Recording:
        exclusive = staticmethod(recording_exclusive)

    # another process's build holds the lock shared for a while: bench waits for it before the first timing
    holding = threading.Event()

    def build_elsewhere():
        with lock.shared():
            holding.set()
            time.sleep(1.0)
            events.append("built elsewhere")

    other = threading.Thread(target=build_elsewhere)
    other.start()
    holding.wait()

    class Loaded:  # another process kept 1.2 cores busy while bench timed: the result says so
        def others_busy_cores(self):
            return 1.2

    monkeypatch.setattr(bench_module, "CpuLoad", Loaded)
    result = bench_module.bench(_workspace(model, tmp_path / "work"), repeats=3, warmup=1, lock=Recording(),
                                profile=True)
    other.join()
    assert result.others_busy_cores == 1.2 == result.to_dict()["others_busy_cores"]
    assert events.index("built elsewhere") < events.index("locked") < events.index("timed")
    assert events[-1] == "unlocked" and events.count("locked") == 1
    assert result.profiles  # the profile ran inside the same exclusive hold
