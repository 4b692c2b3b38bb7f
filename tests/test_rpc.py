"""Remote measurement through a TVM RPC tracker: a real tracker and server on 127.0.0.1."""

import gc
import math
import socket
import time

import numpy as np
import pytest

import models
from precsearch.tvm import CompileOptions, LoadedLibrary, build_plan
from precsearch.errors import ConfigError, DataError
from precsearch.tvm import RpcTarget, measure_remote, parse_tracker, run_remote
from precsearch.model import load_model

KEY = "precsearch-test"
# Servers need a couple of seconds to start (a fresh Python imports TVM) and register.
_STARTUP_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_range() -> tuple[int, int]:
    # Tracker and Server take the first free port of [port, port_end): a range
    # survives another process grabbing the probed port in between.
    port = _free_port()
    return port, min(port + 50, 65536)


def _tracker_summary(host: str, port: int) -> dict:
    import tvm

    tracker = tvm.rpc.connect_tracker(host, port)
    try:
        return tracker.summary()
    finally:
        tracker.close()


def _wait_until_free(host: str, port: int, key: str, timeout_s: float = _STARTUP_S) -> None:
    """Until a server of ``key`` is registered and idle (it re-registers after each session)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queue = _tracker_summary(host, port)["queue_info"].get(key, {})
        if queue.get("free", 0) >= 1:
            return
        time.sleep(0.1)
    raise TimeoutError(f"no free RPC server for {key!r} after {timeout_s} s")


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one server registered under KEY, each in its own TVM Popen worker process."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    port, port_end = _port_range()
    tracker = Tracker("127.0.0.1", port=port, port_end=port_end, silent=True)
    server = None
    try:
        port, port_end = _port_range()
        server = rpc.Server("127.0.0.1", port=port, port_end=port_end, tracker_addr=("127.0.0.1", tracker.port),
                            key=KEY, silent=True)
        _wait_until_free("127.0.0.1", tracker.port, KEY)
        yield RpcTarget("127.0.0.1", tracker.port, KEY, timeout_s=30.0)
    finally:
        # Explicitly, in this order: their __del__ at interpreter exit fails and
        # leaves the server's worker process orphaned.
        if server is not None:
            server.terminate()
        tracker.terminate()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The all-float chain model exported as a shared library, with its names and one input batch."""
    tmp_path = tmp_path_factory.mktemp("rpc")
    model = load_model(models.save(models.chain_model(), tmp_path, "chain"))
    # TIR kernels only: a board runs the library without precsearch's oneDNN bridge
    built = build_plan(model, model.proto, [], options=CompileOptions(conv_backend="tir"))
    path = built.export_library(tmp_path / "chain.so")
    inputs = {"input": np.random.default_rng(0).normal(size=(1, 8, 16, 16)).astype(np.float32)}
    return path, built.input_names, built.output_names, inputs


def test_run_remote_matches_local(tracker, library):
    path, input_names, output_names, inputs = library
    remote = run_remote(path, input_names, output_names, inputs, rpc=tracker, threads=1)
    local = LoadedLibrary(path, input_names, output_names).run(inputs)
    assert set(remote) == set(output_names) == set(local)
    for name in output_names:
        np.testing.assert_allclose(remote[name], local[name], rtol=1e-6, atol=1e-6)


def test_measure_remote_latency(tracker, library):
    path, input_names, _, inputs = library
    latency = measure_remote(path, input_names, inputs, rpc=tracker, threads=1, warmup=2, repeats=7)
    assert latency.backend == "tvm-rpc"
    assert (latency.runs, latency.threads, latency.warmup) == (7, 1, 2)
    assert math.isfinite(latency.median_ms) and latency.median_ms > 0
    assert math.isfinite(latency.iqr_ms) and latency.iqr_ms >= 0


def test_unreachable_tracker_is_one_line_config_error(library):
    path, input_names, _, inputs = library
    port = _free_port()  # nothing listens there once the probe socket is closed
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        measure_remote(path, input_names, inputs, rpc=RpcTarget("127.0.0.1", port, KEY), warmup=0, repeats=3)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "refused" in message and "\n" not in message
    assert time.perf_counter() - started < 5  # TVM's own connect retries a refused tracker for 60 s


def test_silent_peer_times_out(library):
    path, input_names, _, inputs = library
    with socket.socket() as listener:  # accepts connections (backlog) but never answers the handshake
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}.*within 0\.5 s") as caught:
            run_remote(path, input_names, ["logits"], inputs, rpc=RpcTarget("127.0.0.1", port, KEY, timeout_s=0.5))
    assert "\n" not in str(caught.value)


def test_unregistered_key_fails_at_once(tracker, library):
    path, input_names, _, inputs = library
    target = RpcTarget(tracker.host, tracker.port, "no-such-device", timeout_s=30.0)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        measure_remote(path, input_names, inputs, rpc=target, warmup=0, repeats=3)
    message = str(caught.value)
    assert "'no-such-device'" in message and tracker.address in message and repr(KEY) in message
    assert "\n" not in message
    assert time.perf_counter() - started < 10  # not after timeout_s


def test_busy_server_times_out(tracker, library):
    import tvm

    path, input_names, output_names, inputs = library
    holder = tvm.rpc.connect_tracker(tracker.host, tracker.port)
    holder._sock.settimeout(30.0)  # fail, not hang, should an earlier test leave the server busy
    held = holder.request(KEY, max_retry=1)  # the only server is now busy with this session
    try:
        target = RpcTarget(tracker.host, tracker.port, KEY, timeout_s=1.0)
        with pytest.raises(ConfigError, match=rf"no free RPC server for key '{KEY}' .*{tracker.address}.* 1 s"):
            run_remote(path, input_names, output_names, inputs, rpc=target)
    finally:
        del held  # the session ends when its last reference goes
        holder.close()
        gc.collect()
        _wait_until_free(tracker.host, tracker.port, KEY)


def test_local_mistakes_caught_before_connecting(tmp_path, library):
    path, input_names, output_names, inputs = library
    nowhere = RpcTarget("127.0.0.1", _free_port(), KEY)
    with pytest.raises(ConfigError, match="'library_path'"):
        measure_remote(tmp_path / "missing.so", input_names, inputs, rpc=nowhere)
    with pytest.raises(DataError, match="'input'"):
        run_remote(path, input_names, output_names, {}, rpc=nowhere)
    with pytest.raises(ConfigError, match="'rpc'"):
        run_remote(path, input_names, output_names, inputs, rpc="127.0.0.1:9190")
    with pytest.raises(ConfigError, match="'repeats'"):
        measure_remote(path, input_names, inputs, rpc=nowhere, repeats=1)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9190", ("127.0.0.1", 9190)),
    (" tracker.local:9 ", ("tracker.local", 9)),
    ("[::1]:9190", ("::1", 9190)),
])
def test_parse_tracker(text, expected):
    assert parse_tracker(text) == expected


@pytest.mark.parametrize("text", ["x", "127.0.0.1", "127.0.0.1:", ":9190", "host:port", "host:0", "host:65536",
                                  "host:-1", "::1:9190", "a b:9190", "", None])
def test_parse_tracker_rejects(text):
    with pytest.raises(ConfigError) as caught:
        parse_tracker(text)
    message = str(caught.value)
    assert message.startswith("The 'rpc_tracker' parameter of measure must be HOST:PORT; got ")
    assert repr(text) in message and "\n" not in message


def test_rpc_target():
    assert RpcTarget("127.0.0.1", 9190, KEY).address == "127.0.0.1:9190"
    assert RpcTarget("::1", 9190, KEY).address == "[::1]:9190"
    for host, port, key, timeout_s, parameter in [
        ("", 9190, KEY, 1.0, "rpc_tracker"),
        ("h", 0, KEY, 1.0, "rpc_tracker"),
        ("h", 9190, "", 1.0, "rpc_key"),
        ("h", 9190, KEY, 0, "timeout_s"),
        ("h", 9190, KEY, float("nan"), "timeout_s"),
    ]:
        with pytest.raises(ConfigError, match=f"'{parameter}'"):
            RpcTarget(host, port, key, timeout_s)


def test_bench_cli_measures_tvm_builds_through_the_tracker(tracker, tmp_path):
    import json
    import subprocess
    import sys

    path = models.save(models.chain_model(), tmp_path, "chain")
    result = subprocess.run([sys.executable, "-m", "precsearch", "bench", str(path), "--json", "--repeats", "5",
                             "--warmup", "1", "--rpc-tracker", f"{tracker.host}:{tracker.port}", "--rpc-key",
                             tracker.key, "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["remote"] == tracker.address
    backends = {row["name"]: row["backend"] for row in summary["rows"]}
    # ONNX Runtime and OpenVINO run here; the TVM builds on the board
    assert backends == {"ort_float": "ort", "ort_int8": "ort", "ort_int8_conv_only": "ort", "openvino": "openvino",
                        "openvino_f32": "openvino", "tvm_float": "tvm-rpc", "tvm_int8": "tvm-rpc"}
    assert summary["tvm_int8_ms"] > 0


def test_bench_cli_unreachable_tracker_is_one_line(tmp_path):
    import subprocess
    import sys

    port = _free_port()
    path = models.save(models.chain_model(), tmp_path, "chain")
    result = subprocess.run([sys.executable, "-m", "precsearch", "bench", str(path), "--rpc-tracker",
                             f"127.0.0.1:{port}", "--rpc-key", KEY, "--workdir", str(tmp_path / "work"),
                             "--repeats", "3", "--warmup", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("building",
                                                                                                   "measuring"))]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "Traceback" not in result.stderr
