"""The precsearch command: JSON outputs, exit codes and one-line errors, run as a user runs it."""

import json
import subprocess
import sys

import onnx
import pytest

import models
from precsearch.tvm import CompileOptions, bf16_unsupported_reason


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "precsearch", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "block_builder.cc" not in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def chain_path(tmp_path_factory):
    return models.save(models.chain_model(), tmp_path_factory.mktemp("cli"), "chain")


def test_layers_json(chain_path):
    result = run("layers", chain_path, "--json")
    assert result.returncode == 0, result.stderr
    layers = json.loads(result.stdout)
    assert [layer["id"] for layer in layers] == ["conv0", "conv1", "conv2"]
    first = layers[0]
    for key in ("id", "op_type", "in_channels", "out_channels", "kernel", "stride", "groups", "macs", "int8_capable"):
        assert key in first
    assert (first["in_channels"], first["out_channels"], first["kernel"], first["stride"], first["groups"]) == \
        (8, 16, [3, 3], [1, 1], 1)
    assert first["macs"] == 16 * 16 * 16 * 8 * 3 * 3
    assert first["int8_capable"] is True


def test_layers_table(chain_path):
    result = run("layers", chain_path)
    assert result.returncode == 0
    assert "conv1" in result.stdout and "3 conv layers, 3 int8-capable" in result.stdout


def test_build_json_with_check(chain_path, tmp_path):
    out = tmp_path / "out"
    result = run("build", chain_path, "--float", "conv1", "--out", out, "--check", "--json",
                 "--workdir", tmp_path / "work")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["int8_layers"] == ["conv0", "conv2"]
    assert summary["float_layers"] == ["conv1"]
    assert summary["library"] == str(out / "model.so") and (out / "model.so").is_file()
    assert summary["agreement"] >= 0.999
    # Exact integer arithmetic against ORT's emulation of the same QDQ model: float rounding only here.
    assert summary["max_error_steps"] <= 1.0 and summary["max_abs_error"] < 1e-3
    assert json.loads((out / "plan.json").read_text())["plan"] == "float:conv1"
    assert onnx.load(str(out / "model.qdq.onnx")).graph.node
    rows = {row["id"]: row for row in summary["layers"]}
    assert rows["conv1"]["dtype"] == "float32" and rows["conv0"]["dtype"] == "int8"


@pytest.mark.parametrize("spec, n_int8", [("none", 3), ("all", 0)])
def test_build_accepts_none_and_all(chain_path, tmp_path, spec, n_int8):
    result = run("build", chain_path, "--float", spec, "--out", tmp_path / "out", "--json", "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["int8_layers"]) == n_int8


def test_build_profile_gives_each_conv_its_time_and_gmacs(chain_path, tmp_path, capsys):
    result = run("build", chain_path, "--float", "conv1", "--out", tmp_path / "out", "--workdir", tmp_path,
                 "--profile", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    macs = {row["id"]: row for row in summary["layers"]}
    for row in summary["layers"]:
        assert row["kernel_us"] > 0 and row["gmac_s"] > 0, row
    parts = summary["kernels"]
    assert set(parts) == {"onednn_convs_us", "tir_convs_us", "other_kernels_us"}
    conv_us = sum(row["kernel_us"] for row in summary["layers"])
    assert abs(parts["onednn_convs_us"] + parts["tir_convs_us"] - conv_us) <= 0.5 + 1e-6 * conv_us
    assert parts["other_kernels_us"] > 0  # the quantize / dequantize glue and the head
    assert {row["backend"] for row in macs.values()} <= {"onednn", "tir"}
    text = run("build", chain_path, "--float", "conv1", "--out", tmp_path / "out2", "--workdir", tmp_path,
               "--profile")
    assert "GMAC/s" in text.stdout.splitlines()[0] and "kernel time per inference: oneDNN convs" in text.stdout
    # Other processes' load during the profile is measured; from half a core up the table says so.
    from precsearch.cli.render import print_build

    assert summary["profile_others_busy_cores"] >= 0
    for busy, warned in ((1.3, True), (0.1, False)):
        print_build({**summary, "profile_others_busy_cores": busy})
        assert ("warning: other processes kept 1.3 of the machine's cores busy while profiling" in
                capsys.readouterr().out) == warned


def test_build_prints_per_layer_table(chain_path, tmp_path):
    result = run("build", chain_path, "--float", "conv0", "--out", tmp_path / "out", "--workdir", tmp_path,
                 "--activation-layout", "blocked")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("conv")}
    assert rows["conv0"][1:3] == ["float32", "NCHW8c"]
    assert rows["conv1"][1:3] == ["int8", "NCHW8c"]
    assert "2 int8, 1 float convs; block 8" in result.stdout


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    assert_one_line_error(run("layers", path), 2, "notes.onnx")


def test_missing_file(tmp_path):
    assert_one_line_error(run("layers", tmp_path / "nowhere.onnx"), 2, "nowhere.onnx")


def test_model_without_conv(tmp_path):
    path = models.save(models.no_conv_model(), tmp_path, "noconv")
    assert_one_line_error(run("layers", path), 2, "no Conv")


def test_unknown_layer_id(chain_path, tmp_path):
    result = run("build", chain_path, "--float", "conv1,conv_99", "--out", tmp_path / "out", "--workdir", tmp_path)
    assert_one_line_error(result, 2, "conv_99", "conv0", "conv2")


def test_dynamic_input_needs_a_shape(tmp_path):
    path = models.save(models.dynamic_input_model(), tmp_path, "dyn")
    assert_one_line_error(run("layers", path), 2, "--input-shape")
    result = run("layers", path, "--input-shape", "input=1,3,20,20", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["input_shape"] == [1, 3, 20, 20]


def test_bad_input_shape_text(chain_path):
    assert_one_line_error(run("layers", chain_path, "--input-shape", "input=1,x"), 2, "input_shape", "input=1,x")


def test_unwritable_out_directory(chain_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("build", chain_path, "--out", blocker / "sub", "--workdir", tmp_path)
    assert_one_line_error(result, 2, "out")


def test_build_dynamic_input_model_with_input_shape(tmp_path):
    path = models.save(models.dynamic_input_model(), tmp_path, "dyn")
    result = run("build", path, "--input-shape", "input=1,3,20,20", "--out", tmp_path / "out", "--check", "--json",
                 "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["inputs"] == {"input": [1, 3, 20, 20]} and summary["agreement"] >= 0.999


def test_build_with_an_image_folder(tmp_path):
    from PIL import Image

    path = models.save(models.kinds_model(), tmp_path, "kinds")  # one 3-channel 16x16 image input
    folder = tmp_path / "images"
    folder.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype="uint8")).save(folder / f"img{i:02d}.png")
    result = run("build", path, "--data", folder, "--calibration-batches", 6, "--check-batches", 4, "--check",
                 "--json", "--out", tmp_path / "out", "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    outputs = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph.output
    per_batch = sum(int(__import__("numpy").prod([d.dim_value for d in out.type.tensor_type.shape.dim]))
                    for out in outputs)
    assert summary["checked_elements"] == 4 * per_batch and summary["agreement"] >= 0.999
    too_many = run("build", path, "--data", folder, "--calibration-batches", 8, "--check-batches", 4, "--check",
                   "--out", tmp_path / "out", "--workdir", tmp_path)
    assert_one_line_error(too_many, 2, "images", "10")


def test_build_with_an_empty_data_folder(tmp_path):
    path = models.save(models.kinds_model(), tmp_path, "kinds")
    (tmp_path / "empty").mkdir()
    result = run("build", path, "--data", tmp_path / "empty", "--out", tmp_path / "out", "--workdir", tmp_path)
    assert_one_line_error(result, 2, "empty")


def test_bench_json_has_baselines_ratios_and_plans(chain_path, tmp_path):
    result = run("bench", chain_path, "--json", "--repeats", "7", "--warmup", "1", "--plan", "conv1",
                 "--workdir", tmp_path / "work")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("ort_float_ms", "ort_int8_ms", "tvm_float_ms", "tvm_int8_ms"):
        assert summary[key] > 0
    assert summary["threads"] == 2 and summary["tuned"] is False and summary["remote"] is None
    rows = {row["name"]: row for row in summary["rows"]}
    assert list(rows) == ["ort_float", "ort_int8", "ort_int8_conv_only", "openvino", "openvino_f32", "tvm_float",
                          "tvm_int8", "plan1"]
    # OpenVINO's two builds of the float model: its default (bf16 where the CPU has it) and float32
    assert rows["openvino_f32"]["precision"] == "f32" and rows["openvino_f32"]["sqnr_db_vs_ort_float"] > 80
    assert rows["openvino"]["precision"] in ("bf16", "f32") and rows["openvino"]["sqnr_db_vs_ort_float"] > 20
    # ORT int8 is the model quantize_static makes for a user; precsearch's Conv-only QDQ model is a second row.
    assert rows["ort_int8"]["plan"] == "quantize_static" and rows["ort_int8_conv_only"]["plan"] == "int8 (Conv only)"
    assert rows["ort_float"]["vs_ort_float"] == 1.0 and rows["ort_int8"]["vs_ort_int8"] == 1.0
    assert rows["tvm_int8"]["vs_ort_float"] == pytest.approx(summary["tvm_int8_ms"] / summary["ort_float_ms"])
    assert (rows["tvm_float"]["int8_convs"], rows["tvm_int8"]["int8_convs"], rows["plan1"]["int8_convs"]) == (0, 3, 2)
    # 7 runs in two interleaved rounds (at least 3 runs each): the figure is the median of the rounds' medians
    assert summary["rounds"] == 2
    for row in rows.values():
        assert len(row["round_medians_ms"]) == 2 and row["runs"] == 6, row
        assert row["median_ms"] == pytest.approx(sum(row["round_medians_ms"]) / 2, abs=1e-3)
    assert rows["plan1"]["plan"] == "float:conv1"


def test_bench_profile_gives_each_tvm_row_its_kernels(chain_path, tmp_path):
    # Both conv backends side by side, so TIR and oneDNN convs are both profiled.
    args = ("bench", chain_path, "--profile", "--compare-conv-backends", "--repeats", "3", "--warmup", "1",
            "--workdir", tmp_path / "work")
    result = run(*args, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["rows"]}
    tvm_rows = {name: row for name, row in rows.items() if row["backend"] == "tvm"}
    assert set(tvm_rows) == {"tvm_float", "tvm_float@tir", "tvm_int8", "tvm_int8@tir"}
    assert "layers" not in rows["ort_float"] and "kernels" not in rows["ort_float"]
    for name, row in tvm_rows.items():
        assert [layer["id"] for layer in row["layers"]] == ["conv0", "conv1", "conv2"]
        for layer in row["layers"]:
            assert layer["kernel_us"] > 0 and layer["gmac_s"] > 0, (name, layer)
            assert layer["backend"] in {"tir", "onednn"} and layer["dtype"] in {"int8", "float32"}, (name, layer)
        assert sum(layer["backend"] == "onednn" for layer in row["layers"]) == row["onednn_convs"], name
        parts = row["kernels"]
        assert set(parts) == {"onednn_convs_us", "tir_convs_us", "other_kernels_us"}
        conv_us = sum(layer["kernel_us"] for layer in row["layers"])
        assert abs(parts["onednn_convs_us"] + parts["tir_convs_us"] - conv_us) <= 0.5 + 1e-6 * conv_us
    assert {layer["backend"] for layer in tvm_rows["tvm_int8@tir"]["layers"]} == {"tir"}
    assert {layer["dtype"] for layer in tvm_rows["tvm_int8"]["layers"]} == {"int8"}
    text = run(*args)
    assert text.returncode == 0, text.stderr
    for name in tvm_rows:
        assert f"\n{name}: 3 of 3 convs, slowest first\n" in text.stdout, text.stdout
    assert text.stdout.count("kernel time per inference: oneDNN convs") == 4
    section = text.stdout.split("\ntvm_int8@tir: ")[1].splitlines()
    assert section[1].split() == ["id", "dtype", "backend", "µs", "GMAC/s"]
    times = [float(line.split()[3]) for line in section[2:5]]
    assert [line.split()[2] for line in section[2:5]] == ["tir"] * 3 and times == sorted(times, reverse=True)


def test_bench_bad_input(chain_path, tmp_path):
    assert_one_line_error(run("bench", chain_path, "--rpc-tracker", "127.0.0.1:9"), 2, "--rpc-key")
    assert_one_line_error(run("bench", chain_path, "--rpc-tracker", "nonsense", "--rpc-key", "k"), 2, "HOST:PORT")
    assert_one_line_error(run("bench", chain_path, "--plan", "conv7", "--workdir", tmp_path), 2, "conv7")
    assert_one_line_error(run("tune", chain_path, "--timeout", "soon", "--workdir", tmp_path), 2, "timeout")


@pytest.mark.slow
def test_tune_killed_keeps_its_records_and_the_same_command_continues(tmp_path):
    import os
    import signal
    import time

    path = models.save(models.chain_model(channels=(8, 16), size=8), tmp_path, "one_conv")
    command = [sys.executable, "-m", "precsearch", "tune", str(path), "--trials", "2", "--workdir",
               str(tmp_path / "work")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finished = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = list((tmp_path / "work" / "tuning").glob("*/finished_tasks.json"))
        # >= 1: the model has two tuning tasks (its pool and its classifier; element-wise kernels are not tuned)
        if found and len(json.loads(found[0].read_text())) >= 1:
            finished = len(json.loads(found[0].read_text()))
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    process.wait(timeout=60)
    assert finished is not None, "tuning ended before it could be killed"
    result = run("tune", path, "--trials", "2", "--workdir", tmp_path / "work", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tasks_skipped"] >= finished and report["finished"]
    assert report["tasks_skipped"] + report["tasks_covered"] + report["tasks_tuned"] == report["tasks_total"]
    assert "[1/" in result.stderr and "min left" in result.stderr  # progress lines
    again = json.loads(run("tune", path, "--trials", "2", "--workdir", tmp_path / "work", "--json").stdout)
    assert (again["tasks_tuned"], again["trials_run"]) == (0, 0)
    # builds in the same workdir now apply the records
    built = json.loads(run("build", path, "--out", tmp_path / "out", "--workdir", tmp_path / "work", "--json").stdout)
    assert built["tuned"] is True


def _celu_chain(tmp_path):
    proto = models.chain_model()
    relu = next(node for node in proto.graph.node if node.name == "relu1")
    relu.op_type = "Celu"  # ONNX Runtime runs it; TVM 0.27's ONNX frontend has no converter
    return models.save(proto, tmp_path, "celu")


def test_layers_names_an_operator_tvm_cannot_import(tmp_path):
    result = run("layers", _celu_chain(tmp_path))
    assert result.returncode == 0 and "3 conv layers" in result.stdout
    assert "node 'relu1' (Celu) cannot be imported by TVM's ONNX frontend; no plan of this model builds" \
        in result.stderr


def test_build_of_a_model_with_an_unimportable_operator_is_one_line(tmp_path):
    result = run("build", _celu_chain(tmp_path), "--float", "all", "--out", tmp_path / "out",
                 "--workdir", tmp_path / "work", "--json")
    assert_one_line_error(result, 3, "[pass 'precsearch.Import', layer 'relu1']", "'relu1' (Celu)")


def test_doctor_reports_each_layer_and_the_rewritten_split(tmp_path):
    path = models.save(models.split_model((8, 24)), tmp_path, "split")
    result = run("doctor", path, "--json", "--block-size", "16")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is True and report["unsupported_operators"] == []
    float_plan, int8_plan, *bf16_plan = report["plans"]
    assert (float_plan["plan"], int8_plan["plan"]) == ("all-float", "all-int8")
    # all-bf16 where this CPU runs bf16 natively: every conv through oneDNN, held to ORT on bf16-rounded convs
    assert len(bf16_plan) == (0 if bf16_unsupported_reason(CompileOptions()) else 1)
    for plan in bf16_plan:
        assert plan["plan"] == "all-bf16" and plan["check_ok"] is True
        assert {layer["detail"].split()[0].rstrip(":") for layer in plan["layers"].values()} == {"bfloat16"}
    assert float_plan["layers"]["conv0"] == {"outcome": "blocked", "detail": "float32 NCHW16c"}
    assert int8_plan["layers"]["conv1"] == {"outcome": "nchw",
                                            "detail": "int8: channels 8→16 not divisible by block 16"}
    assert int8_plan["layers"]["conv2"]["outcome"] == "nchw"  # 24 channels
    assert int8_plan["layers"]["conv_out"] == {"outcome": "blocked", "detail": "int8 NCHW16c"}
    assert [note["node"] for note in int8_plan["operator_notes"]] == ["split"]
    assert float_plan["check_ok"] is True and int8_plan["check_ok"] is True
    text = run("doctor", path, "--block-size", "16")
    assert text.returncode == 0 and "rewritten: Split 'split': channel split [8, 24]" in text.stdout
    assert "healthy: every plan can build" in text.stdout


def test_doctor_names_an_unimportable_operator_and_fails(tmp_path):
    result = run("doctor", _celu_chain(tmp_path))
    assert result.returncode == 3
    assert "cannot import: node 'relu1' (Celu)" in result.stdout and "NOT healthy" in result.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs: too small for a library (the tiny chain model's is about 60 KiB) or a cache file (the machines
    run as root, so mount works)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_naming_the_path_and_a_rerun_resumes(chain_path, tmp_path, small_disk):
    workdir = tmp_path / "work"
    result = run("build", chain_path, "--float", "none", "--out", small_disk / "out", "--workdir", workdir, "--json")
    # The linker's "No space left on device" used to be a 30-line traceback with exit 1.
    assert_one_line_error(result, 2, "No space left on device", str(small_disk / "out" / "model.so"))
    assert not (small_disk / "out" / "model.so").exists()
    cached = sorted(p.name for p in (workdir / "cache").iterdir())
    assert any(name.startswith("calibration-") for name in cached)  # intact, and reused by the re-run
    again = run("build", chain_path, "--float", "none", "--out", tmp_path / "out", "--workdir", workdir, "--json")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (workdir / "cache").iterdir()) == cached


def test_a_full_workdir_is_one_line_naming_the_cache_file(chain_path, tmp_path, small_disk):
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # every block taken
        with pytest.raises(OSError, match="No space left"):
            while True:
                filler.write(b"\0" * 4096)
    result = run("build", chain_path, "--float", "none", "--out", tmp_path / "out", "--workdir", small_disk, "--json")
    assert_one_line_error(result, 2, "No space left on device", str(small_disk / "cache" / "calibration-"))


def test_options_from_a_toml_file_and_the_command_line_wins(chain_path, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{chain_path}"\nworkdir = "{tmp_path / "work"}"\nthreads = 1\n\n'
                      f'[build]\nfloat = "conv1"\nout = "{tmp_path / "from-toml"}"\nblock-size = 8\n')
    result = run("--config", config, "build", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["float_layers"] == ["conv1"] and summary["block_size"] == 8
    assert summary["library"] == str(tmp_path / "from-toml" / "model.so")
    assert json.loads(summary["target"])["num-cores"] == 1
    # The command line wins over the file, and --config may follow the command.
    result = run("build", "--config", config, "--float", "none", "--out", tmp_path / "from-cli", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["float_layers"] == [] and summary["library"] == str(tmp_path / "from-cli" / "model.so")


def test_a_bad_toml_file_is_one_line(chain_path, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[build]\nflaot = 'conv1'\n")
    assert_one_line_error(run("--config", config, "build", chain_path), 2, "'flaot' for 'build'")
    config.write_text("[serch]\ntrials = 3\n")
    assert_one_line_error(run("--config", config, "layers", chain_path), 2, "['serch']", "not commands")
    config.write_text("calibration = 'kmeans'\n")
    assert_one_line_error(run("--config", config, "layers", chain_path), 2, "'calibration' must be one of")
    config.write_text("model = [1,\n")
    assert_one_line_error(run("--config", config, "layers"), 2, "not valid TOML")
    assert_one_line_error(run("--config", tmp_path / "missing.toml", "layers"), 2, "cannot be read")
