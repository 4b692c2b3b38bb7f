"""One time budget for tuning and searching: the phases it hands out, kernels tuned heaviest first, and a real
search that tunes between its phases and measures its front again with the new records."""

import dataclasses

import pytest
import tvm

import models
from precsearch.cli.render import front_lines
from precsearch.jobs import shared_budget
from precsearch.jobs.search import run_search
from precsearch.jobs.shared_budget import SharedBudget
from precsearch.model import load_model
from precsearch.study.config import SearchConfig
from precsearch.study.record import StudyAttrs
from precsearch.study.storage import default_storage_url
from precsearch.tvm import CompileOptions, TuningDatabase, host_target, open_database, rank_heaviest_first
from precsearch.tvm._tune_tasks import InProcessBuilder, TuningTask, local_runner


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_phases_of_an_hour_and_of_a_night():
    clock = FakeClock()
    hour = SharedBudget(3600, clock=clock)
    assert hour.first_front().kind == "search" and hour.first_front().time_s == 900  # a quarter
    night = SharedBudget(8 * 3600, clock=clock)
    assert night.first_front().time_s == 20 * 60  # capped: the first front within 20 minutes
    clock.now += 20 * 60
    tuning = night.tuning(0)
    assert tuning.kind == "tune" and tuning.trials_per_kernel == 8 and not tuning.last
    assert tuning.time_s == pytest.approx(0.5 * (8 * 3600 - 20 * 60))  # half of what is left
    clock.now += tuning.time_s
    search = night.search_after(tuning)
    assert search.kind == "search" and search.time_s == pytest.approx(0.5 * night.left_s())
    assert [night.tuning(i).trials_per_kernel for i in range(4)] == [8, 32, 64, 128]  # more trials each round
    assert night.tuning(4) is None and night.tuning(3).last
    last = night.tuning(3)
    assert night.search_after(last).time_s == pytest.approx(night.left_s())  # the rest after the last round
    clock.now = night.started + 8 * 3600 - 100  # 100 s left: too little to tune, enough for one more search
    assert night.tuning(1) is None and night.rest().time_s == pytest.approx(100)
    clock.now += 50
    assert night.rest() is None and night.search_after(last) is None and night.left_s() == pytest.approx(50)


def _sum_task(name: str, length: int, weight: int = 1) -> TuningTask:
    from tvm import te

    # a sum to one value: the fallback leaves it unscheduled, so its time is its length's
    values = te.placeholder((length,), name="values")
    k = te.reduce_axis((0, length), name="k")
    total = te.compute((1,), lambda i: te.sum(values[k], axis=k), name="total")
    return TuningTask(name=name, mod=tvm.IRModule({"main": te.create_prim_func([values, total])}), weight=weight,
                      space="default", layer_index=None)


def test_kernels_are_tuned_heaviest_first_by_their_measured_fallback(tmp_path):
    light, heavy = _sum_task("light", 64), _sum_task("heavy", 1 << 22)
    database, target = TuningDatabase(tmp_path / "db"), host_target()
    builder, runner = InProcessBuilder(), local_runner(1)
    order, share_ms = rank_heaviest_first([light, heavy], database, target, builder, runner, 4)
    assert [task.name for task in order] == ["heavy", "light"]
    assert share_ms["heavy"] > 20 * share_ms["light"] > 0
    assert share_ms == {task.name: database.fallback_ms(task.mod) for task in (light, heavy)}
    assert len(database) == 2  # each fallback measured once, and filed as the kernel's record

    # a later run ranks from the remembered times: nothing measured or filed again
    again, share_again = rank_heaviest_first([light, heavy], database, target, builder, runner, 4)
    assert [task.name for task in again] == ["heavy", "light"] and share_again == share_ms
    assert len(database) == 2

    # calls per inference count: a light kernel called often enough outweighs the heavy one
    often = dataclasses.replace(light, name="often", weight=int(1e6))
    assert [task.name for task in rank_heaviest_first([heavy, often], database, target, builder, runner, 4)[0]] \
        == ["often", "heavy"]

    # a kernel already tuned to the budget comes first (it is skipped at once); past the deadline nothing is
    # measured and the unranked kernels keep their order after the ranked ones
    database.mark_finished(light.mod, 4)
    fresh = _sum_task("fresh", 4096)
    order, _ = rank_heaviest_first([fresh, heavy, light], database, target, builder, runner, 4, deadline=0.0)
    assert [task.name for task in order] == ["light", "heavy", "fresh"]
    assert database.fallback_ms(fresh.mod) is None and len(database) == 2


@pytest.mark.slow
def test_a_search_with_a_timeout_tunes_between_phases_and_measures_its_front_again(tmp_path, monkeypatch):
    # The first front gets 1 s (its first plan), one tuning round of 1 trial per kernel follows, then the
    # search goes on with tuned builds until its 6 plans are done.
    monkeypatch.setattr(shared_budget, "FIRST_FRONT_MAX_S", 1.0)
    monkeypatch.setattr(shared_budget, "TRIALS_PER_KERNEL", (1,))
    monkeypatch.setattr(shared_budget, "MIN_PHASE_S", 1.0)
    model = load_model(models.save(models.chain_model(channels=(8, 16, 16, 16), size=8, seed=5), tmp_path, "three"))
    config = SearchConfig(model=str(model.source), metric="sqnr_db", trials=6, timeout_s=900, eval_batches=2,
                          calibration_batches=2, repeats=5, warmup=1, bf16="off", guided=False, sampler="random")
    assert config.shares_time_with_tuning
    lines, phases, fronts = [], [], []
    run = run_search(config, model, None, workdir=tmp_path / "work", storage_url=default_storage_url(tmp_path),
                     remeasure_repeats=7, status=lines.append, progress=lambda snap: phases.append(snap.phase),
                     front=lambda summary, handle: fronts.append(summary.front))
    text = "\n".join(lines)
    order = ["the first front from untuned kernels within 1 s", "tuning (heaviest kernels first, 1 trials each)",
             "\ntuned 2 of 2 kernels", "re-measuring front plan"]
    positions = [text.find(fragment) for fragment in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), text
    assert phases[0].startswith("searching (untuned kernels)")
    assert any(phase.startswith("searching (tuned kernels)") for phase in phases), phases
    assert len(fronts) >= 2 and all(fronts)  # the first front, and the front after the tuning round

    database = open_database(tmp_path / "work", CompileOptions(threads=config.threads))
    assert database is not None and len(database) > 0
    remeasured = StudyAttrs(run.handle.study).remeasured
    assert remeasured and all(entry["tuning_records"] == len(database) and entry["runs"] == 7
                              for entry in remeasured.values())
    trials = [t for t in run.handle.study.get_trials() if t.state.name == "COMPLETE"
              and t.user_attrs.get("duplicate_of") is None]
    assert run.summary.completed == 6
    assert run.summary.elapsed_s > 20  # the whole job's time (tuning included), not its last phase's
    tuned = [t.user_attrs["tuned_kernels"] for t in sorted(trials, key=lambda t: t.number)]
    # plans built before the round ran untuned kernels, those after it applied the new records
    assert tuned[0] == 0 and tuned[-1] > 0, tuned

    # what the command prints: the front with the re-measured figures beside the search's, and ORT's baselines
    printed = front_lines(run.summary, run.handle)
    assert "re-measured" in printed[0]
    first = run.summary.front[0]
    assert f"{remeasured[first.trial]['median_ms']:.3f}" in next(line for line in printed[1:]
                                                                 if line.split()[0] == str(first.trial))
    assert any(line.startswith("ONNX Runtime: float ") and "int8 (quantize_static)" in line for line in printed)


def test_a_workspace_reads_the_database_again_when_records_are_filed(tmp_path):
    # What lets a search's other workers build with records a tuning round filed after they opened the database.
    from precsearch.tvm import database_dir, resolve_target
    from precsearch.tvm._tune_tasks import commit_fallback_record
    from precsearch.workspace import Workspace

    model = load_model(models.save(models.chain_model(channels=(8, 8), size=8), tmp_path, "one"))
    workspace = Workspace(model, tmp_path / "work")
    assert workspace.database is None
    target = resolve_target(workspace.options)
    tuning = TuningDatabase(database_dir(tmp_path / "work", target))
    builder, runner = InProcessBuilder(), local_runner(1)
    assert commit_fallback_record(_sum_task("a", 256), tuning, target, builder, runner)
    first = workspace.database
    assert first is not None and len(first) == 1
    assert workspace.database is first  # unchanged files: the opened database is kept
    assert commit_fallback_record(_sum_task("b", 512), tuning, target, builder, runner)
    assert len(workspace.database) == 2 and workspace.database is not first
