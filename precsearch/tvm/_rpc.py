"""Latency and outputs of an exported library on a remote device, through a TVM RPC tracker.

The tracker hands out RPC servers by key.  One session per call: the exported
``.so`` is uploaded, loaded remotely and run by a Relax VM on the remote CPU,
timed with the VM's own ``time_evaluator`` exactly as :func:`measure_library`
does locally, so local and remote numbers are comparable.

Every failure (tracker down, unknown key, all servers busy, library that does
not load remotely) comes out as one-line :class:`~precsearch.errors.ConfigError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from precsearch.errors import ConfigError, DataError, PrecsearchError, check_int
from precsearch.measure import Latency, check_settings, summarize

from ._timing import _TVM_AFFINITY_BIG
from ._trace import tvm_error_line

logger = logging.getLogger(__name__)

_BACKEND = "tvm-rpc"
# Handshake word of the tracker protocol (tvm.rpc.base.RPC_TRACKER_MAGIC); repeated
# here so the reachability probe needs no TVM import.
_TRACKER_MAGIC = 0x2F271
# A server started a moment ago needs a second or two (a fresh Python importing TVM)
# before the tracker lists it; a key still missing after this is taken for a typo.
_REGISTRATION_GRACE_S = 5.0
_REGISTRATION_POLL_S = 0.25


def parse_tracker(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``"[IPv6]:PORT"``) as ``(host, port)``."""
    if not isinstance(text, str):
        raise _bad_tracker(text)
    host, sep, port_text = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # An unbracketed colon makes "a:b:9" ambiguous between an IPv6 host and a typo.
    if (not sep or not host or (":" in host and not bracketed) or any(c.isspace() for c in host)
            or not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise _bad_tracker(text)
    return host, int(port_text)


def _bad_tracker(text) -> ConfigError:
    return ConfigError(f"The 'rpc_tracker' parameter of measure must be HOST:PORT; got {text!r} instead.")


@dataclass(frozen=True)
class RpcTarget:
    """Where to measure: a TVM RPC tracker and the key its servers registered under.

    Parameters
    ----------
    host, port : str, int
        Address of the tracker (not of a server).
    key : str
        Device key the RPC servers were started with (``--key``).
    timeout_s : float
        Seconds to wait for the tracker to answer and for a server of ``key``
        to become free.
    """

    host: str
    port: int
    key: str
    timeout_s: float = 60.0

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"The 'rpc_tracker' parameter of measure must name a host; got {self.host!r} instead.")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"The 'rpc_tracker' parameter of measure must have a port in 1..65535; "
                              f"got {self.port!r} instead.")
        if not isinstance(self.key, str) or not self.key.strip():
            raise ConfigError(f"The 'rpc_key' parameter of measure must be a non-empty string; "
                              f"got {self.key!r} instead.")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ConfigError(f"The 'timeout_s' parameter of RpcTarget must be a positive number of seconds; "
                              f"got {self.timeout_s!r} instead.")

    @property
    def address(self) -> str:
        """The tracker as ``host:port`` (IPv6 hosts in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def measure_remote(library_path, input_names, inputs: dict[str, np.ndarray], *, rpc: RpcTarget,
                   threads: int = 2, warmup: int = 10, repeats: int = 50) -> Latency:
    """Latency of an exported library on a server of ``rpc.key``, timed remotely.

    Parameters
    ----------
    library_path : path
        A shared library written by :meth:`~precsearch.tvm.BuiltPlan.export_library`,
        built for the remote device's target.
    input_names : sequence of str
        The plan's input names, in the order ``main`` takes them.
    inputs : dict of str to ndarray
        One batch, by input name.
    rpc : RpcTarget
    threads, warmup, repeats : int
        As for :func:`measure_library`; the remote TVM thread pool is set to ``threads``.
    """
    check_settings(threads, warmup, repeats)
    path = _check_call("measure_remote", library_path, input_names, inputs, rpc)
    session = _open_session(rpc)
    vm, device = _on_remote(rpc, "load the library", _remote_vm, session, path, threads)
    times_s = _on_remote(rpc, "time the library", _time_vm, vm, device, input_names, inputs, warmup, repeats)
    latency = summarize(times_s, backend=_BACKEND, warmup=warmup, threads=threads)
    logger.info("%s on %s (key %r): median %.3f ms over %d runs", path.name, rpc.address, rpc.key,
                latency.median_ms, latency.runs)
    return latency


def run_remote(library_path, input_names, output_names, inputs: dict[str, np.ndarray], *, rpc: RpcTarget,
               threads: int = 2) -> dict[str, np.ndarray]:
    """Run one batch on a server of ``rpc.key``; outputs by name, copied back to the host.

    Same arguments as :func:`measure_remote`, plus ``output_names`` (the plan's
    output names, in the order ``main`` returns them).
    """
    check_int(threads, "threads", "run_remote", 1)
    path = _check_call("run_remote", library_path, input_names, inputs, rpc)
    session = _open_session(rpc)
    vm, device = _on_remote(rpc, "load the library", _remote_vm, session, path, threads)
    values = _on_remote(rpc, "run the library", _run_vm, vm, device, input_names, inputs)
    if len(values) != len(output_names):
        raise DataError(f"The 'output_names' parameter of run_remote names {len(output_names)} outputs; "
                        f"the library returns {len(values)}.")
    return dict(zip(output_names, values))


def _check_call(caller: str, library_path, input_names, inputs, rpc) -> Path:
    """Catch local mistakes before anything goes over the network; the library as a Path."""
    if not isinstance(rpc, RpcTarget):
        raise ConfigError(f"The 'rpc' parameter of {caller} must be an RpcTarget; got {rpc!r} instead.")
    path = Path(library_path)
    if not path.is_file():
        raise ConfigError(f"The 'library_path' parameter of {caller} must be an existing file; "
                          f"got {str(library_path)!r} instead.")
    missing = [name for name in input_names if name not in inputs]
    if missing:
        raise DataError(f"The 'inputs' parameter of {caller} must hold input {missing[0]!r}; "
                        f"got {sorted(inputs)!r} instead.")
    return path


def check_tracker(rpc: RpcTarget) -> None:
    """Fail now, with one line, if the tracker is unreachable or has no server for ``rpc.key``.

    Meant for the start of a long job, before anything is built.
    """
    with _tracker_with_server(rpc):
        pass


def _open_session(rpc: RpcTarget):
    """A fresh RPC session on a free server of ``rpc.key``."""
    with _tracker_with_server(rpc) as tracker:
        return _request(tracker, rpc)


@contextlib.contextmanager
def _tracker_with_server(rpc: RpcTarget):
    """A tracker connection, once a server of ``rpc.key`` is known to it; closed on exit."""
    import tvm

    _probe_tracker(rpc)
    try:
        tracker = tvm.rpc.connect_tracker(rpc.host, rpc.port)
    except Exception as exc:  # noqa: BLE001 - gone since the probe; TVM raises RuntimeError or OSError
        raise ConfigError(f"cannot reach the RPC tracker at {rpc.address}: {tvm_error_line(exc, limit=300)}") from exc
    try:
        # TrackerSession has no timeout of its own: a REQUEST for a key whose
        # servers are all busy blocks in recv forever, so bound its socket.
        tracker._sock.settimeout(rpc.timeout_s)
        _require_server(tracker, rpc)
        yield tracker
    finally:
        tracker.close()


def _probe_tracker(rpc: RpcTarget) -> None:
    """Fail fast if nothing answers as a tracker at ``rpc``'s address.

    ``connect_tracker`` retries a refused connection for 60 s and waits forever
    for the handshake of a peer that is not a tracker; this does neither.
    """
    where = f"the RPC tracker at {rpc.address}"
    try:
        with socket.create_connection((rpc.host, rpc.port), timeout=rpc.timeout_s) as sock:
            sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
            reply = _recv_exactly(sock, 4)
    except ConnectionRefusedError as exc:
        raise ConfigError(f"cannot reach {where}: connection refused") from exc
    except socket.timeout as exc:
        raise ConfigError(f"cannot reach {where}: no answer within {rpc.timeout_s:g} s") from exc
    except socket.gaierror as exc:
        raise ConfigError(f"cannot reach {where}: unknown host ({exc.strerror})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot reach {where}: {exc.strerror or exc}") from exc
    if len(reply) < 4 or struct.unpack("<i", reply)[0] != _TRACKER_MAGIC:
        raise ConfigError(f"cannot reach {where}: the peer there is not a TVM RPC tracker")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:  # peer closed: not a tracker
            break
        data += chunk
    return data


def _require_server(tracker, rpc: RpcTarget) -> None:
    """Fail within seconds, not after ``timeout_s``, when no server registered ``rpc.key`` (a typo, say)."""
    deadline = time.monotonic() + min(rpc.timeout_s, _REGISTRATION_GRACE_S)
    while True:
        keys = _registered_keys(tracker, rpc)
        if rpc.key in keys:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(_REGISTRATION_POLL_S)
    known = ", ".join(repr(key) for key in keys) or "none"
    raise ConfigError(f"no RPC server is registered under key {rpc.key!r} at the tracker {rpc.address} "
                      f"(keys registered: {known})")


def _registered_keys(tracker, rpc: RpcTarget) -> list[str]:
    try:
        servers = tracker.summary()["server_info"]
    except Exception as exc:  # noqa: BLE001 - socket, protocol or JSON trouble alike
        raise ConfigError(f"the RPC tracker at {rpc.address} did not answer a summary request: "
                          f"{tvm_error_line(exc, limit=300)}") from exc
    return sorted({str(info.get("key", "")).removeprefix("server:") for info in servers})


def _request(tracker, rpc: RpcTarget):
    started = time.perf_counter()
    try:
        # One try: a retry would wait timeout_s again, on a fresh socket without the timeout.
        session = tracker.request(rpc.key, max_retry=1)
    except Exception as exc:  # noqa: BLE001 - request() folds every failure into a RuntimeError
        # request() reports the socket timeout only as text; the elapsed time says it more reliably.
        if time.perf_counter() - started >= 0.9 * rpc.timeout_s:
            raise ConfigError(f"no free RPC server for key {rpc.key!r} at the tracker {rpc.address} "
                              f"within {rpc.timeout_s:g} s (all busy)") from exc
        raise ConfigError(f"cannot open an RPC session for key {rpc.key!r} via the tracker {rpc.address}: "
                          f"{tvm_error_line(exc, limit=300)}") from exc
    logger.debug("RPC session for key %r via %s after %.2f s", rpc.key, rpc.address, time.perf_counter() - started)
    return session


def _remote_vm(session, path: Path, threads: int):
    """Upload and load ``path`` remotely; the VM on the remote CPU with its thread pool pinned."""
    from tvm import relax

    session.upload(str(path))
    module = session.load_module(path.name)
    try:
        config_threadpool = session.get_function("runtime.config_threadpool")
    except AttributeError:
        logger.warning("remote TVM has no runtime.config_threadpool; its thread pool keeps its default size")
    else:
        config_threadpool(_TVM_AFFINITY_BIG, threads)
    device = session.cpu()
    return relax.VirtualMachine(module, device), device


def _time_vm(vm, device, input_names, inputs, warmup: int, repeats: int) -> list[float]:
    """Per-run seconds, measured on the remote by the VM's own timer as :func:`measure_library` does."""
    args = _remote_args(input_names, inputs, device)
    for _ in range(warmup):
        vm["main"](*args)
    result = vm.time_evaluator("main", device, number=1, repeat=repeats)(*args)
    return list(result.results)


def _run_vm(vm, device, input_names, inputs) -> list[np.ndarray]:
    """main's outputs, flattened, copied back to the host."""
    # The stateful calls, not vm["main"]: a tuple result comes back as an opaque
    # remote handle, while the VM's output getters fetch each field as a tensor.
    vm.set_input("main", *_remote_args(input_names, inputs, device))
    vm.invoke_stateful("main")
    return [value.numpy() for value in _stateful_outputs(vm)]


def _remote_args(input_names, inputs: dict[str, np.ndarray], device) -> list:
    import tvm

    return [tvm.runtime.tensor(np.ascontiguousarray(inputs[name]), device) for name in input_names]


def _stateful_outputs(vm, *index) -> list:
    """The leaves of main's (possibly nested) result, depth first.

    ``VirtualMachine.get_outputs`` does the same with a recursive closure: a
    reference cycle that keeps the VM, hence the RPC session and its server,
    alive until the garbage collector happens to run.
    """
    arity = vm["get_output_arity"]("main", *index)
    if arity == -1:
        return [vm["get_output"]("main", *index)]
    return [leaf for i in range(arity) for leaf in _stateful_outputs(vm, *index, i)]


def _on_remote(rpc: RpcTarget, doing: str, func, *args):
    """``func(*args)``, with whatever TVM raises across RPC turned into a one-line ConfigError."""
    try:
        return func(*args)
    except PrecsearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - across RPC, TVM raises builtins of every kind
        logger.debug("remote call failed on key %r via %s", rpc.key, rpc.address, exc_info=exc)
        raise ConfigError(f"the RPC server for key {rpc.key!r} via the tracker {rpc.address} failed to {doing}: "
                          f"{tvm_error_line(exc, limit=300)}") from exc

