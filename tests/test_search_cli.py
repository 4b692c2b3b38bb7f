"""``precsearch search`` and ``worker`` as a user runs them: kill -9 and Ctrl-C then resume, two workers on
PostgreSQL, one-line errors, and a real search on the packaged MobileNetV3."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc

import models
from precsearch.tvm import CompileOptions, bf16_unsupported_reason

REPO = Path(__file__).resolve().parents[1]
# Tiny budgets: untuned TVM builds of a 4-conv model take ~2 s each.
FAST = ["--untuned", "--eval-batches", "4", "--calibration-batches", "4", "--repeats", "5", "--warmup", "1",
        "--metric", "sqnr_db"]


def run(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "precsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _default_sigint():
    # A CI job started in the background inherits SIGINT ignored, and Python then
    # keeps ignoring it; a person's terminal has the default, which this restores.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, log: Path):
    with open(log, "w") as stream:
        return subprocess.Popen([sys.executable, "-m", "precsearch", *map(str, args)], stdout=stream,
                                stderr=subprocess.STDOUT, preexec_fn=_default_sigint)


def assert_one_line_error(result, *fragments, code=2):
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def four_convs(tmp_path_factory):
    return models.save(models.chain_model(channels=(8, 16, 16, 16, 16), size=8, seed=21),
                       tmp_path_factory.mktemp("four"), "four")


def _trials(url: str, study: str):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=study, storage=url).get_trials()


def _completed_plans(trials) -> dict[str, int]:
    plans = {}
    for trial in trials:
        if trial.state.name == "COMPLETE" and trial.user_attrs.get("duplicate_of") is None:
            assert trial.user_attrs["plan"] not in plans, "a plan was evaluated twice"
            plans[trial.user_attrs["plan"]] = trial.number
    return plans


def _wait_for_trial_in_flight(url: str, study: str, completed_at_least: int, process, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the search ended before it could be stopped"
        try:
            trials = _trials(url, study)
        # the study or its tables may not exist yet, or the search is creating them as this looks
        except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            time.sleep(0.3)
            continue
        done = sum(t.state.name == "COMPLETE" for t in trials)
        running = [t for t in trials if t.state.name == "RUNNING" and "plan" in t.user_attrs]
        if done >= completed_at_least and running:
            return {t.number: t.values for t in trials if t.state.name == "COMPLETE"}, running[0].number
        time.sleep(0.2)
    raise AssertionError("no trial in flight within the time limit")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_a_stopped_search_resumes_with_the_same_command(four_convs, tmp_path, how):
    workdir = tmp_path / "work"
    url = f"sqlite:///{workdir / 'study.db'}"
    command = ["search", four_convs, "--workdir", workdir, "--trials", "8", "--sampler", "random", "--study", "s",
               "--heartbeat-interval", "1", "--grace-period", "3", *FAST]
    process = start(*command, log=tmp_path / "first.log")
    completed_before, in_flight = _wait_for_trial_in_flight(url, "s", 3, process)
    process.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    code = process.wait(timeout=120)
    if how == "ctrl-c":
        assert code == 130, (tmp_path / "first.log").read_text()
        assert "Traceback" not in (tmp_path / "first.log").read_text()
        stopped = _trials(url, "s")[in_flight]
        # Ctrl-C either abandons the trial in flight or, when it lands as the trial ends, lets it finish.
        assert (stopped.state.name, stopped.user_attrs.get("fail_reason")) in (("FAIL", "interrupted"),
                                                                               ("COMPLETE", None))
        assert not [t for t in _trials(url, "s") if t.state.name == "RUNNING"]
    else:
        time.sleep(4)  # past the grace period: the killed trial's heartbeat is stale
    result = run(*command, "--json")
    assert result.returncode == 0, result.stderr
    trials = _trials(url, "s")
    for number, values in completed_before.items():  # every finished trial is kept as it was
        assert trials[number].state.name == "COMPLETE" and trials[number].values == values
    stopped = trials[in_flight]
    plans = _completed_plans(trials)
    assert len(plans) == 8, sorted(plans)  # the budget is 8 distinct plans, no more, no less
    assert stopped.user_attrs["plan"] in plans
    if how == "kill -9" or stopped.state.name == "FAIL":
        assert stopped.state.name == "FAIL"
        assert plans[stopped.user_attrs["plan"]] > in_flight  # the stopped trial's plan was re-run by a later trial
    summary = json.loads(result.stdout)
    assert summary["completed"] == 8 and summary["front"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """$PRECSEARCH_TEST_POSTGRES_URL (CI starts the server), else a private server from Debian's package."""
    url = os.environ.get("PRECSEARCH_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if shutil.which("apt-get") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL (tests/start_postgres.sh)")
        pytest.skip("no PostgreSQL server binaries and no apt-get to install them")
    folder = Path("/tmp") / f"precsearch-pg-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    started = subprocess.run(["bash", str(REPO / "tests" / "start_postgres.sh"), str(folder), str(_free_port())],
                             capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stderr
    yield started.stdout.strip()
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    stop = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    subprocess.run([*stop, str(initdb), "-D", str(folder / "data"), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_finish_a_12_trial_study(four_convs, tmp_path, postgres_url):
    from sqlalchemy.engine import make_url

    password = make_url(postgres_url).password
    assert password
    study = f"two-{os.getpid()}"
    workdir = tmp_path / "work"
    result = run("search", four_convs, "--workdir", workdir, "--storage", postgres_url, "--study", study,
                 "--trials", "12", "--sampler", "random", "--workers", "2", *FAST)
    assert result.returncode == 0, result.stderr
    trials = _trials(postgres_url, study)
    plans = _completed_plans(trials)  # asserts that no plan was measured twice
    assert len(plans) == 12
    assert not [t for t in trials if t.state.name in ("FAIL", "RUNNING", "WAITING")]  # no trial lost
    workers = {t.user_attrs["worker"] for t in trials if t.user_attrs.get("duplicate_of") is None
               and t.state.name == "COMPLETE"}
    assert len(workers) == 2, workers  # both workers measured plans
    # The password appears nowhere: output, the worker's log, the stored settings.
    stored = optuna.load_study(study_name=study, storage=postgres_url)
    texts = [result.stdout, result.stderr, (workdir / "worker-1.log").read_text(),
             json.dumps(stored.user_attrs), json.dumps([t.user_attrs for t in trials])]
    assert all(password not in text for text in texts)
    assert "***" in result.stdout or "***" in result.stderr


def test_bad_input_is_one_line(four_convs, tmp_path):
    assert_one_line_error(run("search", four_convs, "--sampler", "annealing", "--workdir", tmp_path / "w"),
                          "'sampler' parameter of search must be one of", "'annealing'")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(run("search", four_convs, "--workdir", blocker / "work"),
                          "'workdir' directory", "is not writable")
    result = run("search", four_convs, "--workdir", tmp_path / "w",
                 "--storage", "postgresql://ps:s3cret-pw@127.0.0.1:9/nowhere")
    assert_one_line_error(result, "cannot open the storage postgresql://ps:***@127.0.0.1:9/nowhere")
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert_one_line_error(run("search", four_convs, "--workdir", tmp_path / "w", "--max-drop", "1.5"),
                          "'max_drop' parameter of search must be a float in [0, 1); got 1.5")
    assert_one_line_error(run("worker", "--study", "nope", "--workdir", tmp_path / "w"), "'nope' does not exist")


@pytest.mark.slow
def test_real_model_search_with_embedded_defaults(tmp_path):
    result = run("search", "mobilenetv3-textcls", "--workdir", tmp_path, "--trials", "3", "--untuned",
                 "--eval-batches", "8", "--repeats", "10", "--json", timeout=1200)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["metric"] == "top1" and summary["completed"] == 3 and summary["failed"] == 0
    every = _trials(f"sqlite:///{tmp_path / 'study.db'}", summary["study"])
    trials = {t.user_attrs["seed"]: t for t in every if t.state.name == "COMPLETE"}
    assert set(trials) == {"all-int8", "all-float", "first-and-last-float"}  # the seeds, in queue order
    # on a CPU with native bf16 the space is int8/bf16/float and all-bf16 is queued next, past the budget of 3
    queued = [t.user_attrs["seed"] for t in every if t.state.name != "COMPLETE"]
    assert queued == ([] if bf16_unsupported_reason(CompileOptions()) else ["all-bf16"])
    assert trials["all-float"].values[1] == 1.0  # TVM float agrees with ORT float on every image
    assert trials["all-int8"].values[1] >= 0.75
    assert trials["all-int8"].user_attrs["int8_convs"] == 53
    assert all(t.values[0] > 0 and t.user_attrs["build_time_s"] > 0 for t in trials.values())
    assert summary["front"] and summary["front"][0]["latency_ms"] == min(t.values[0] for t in trials.values())
