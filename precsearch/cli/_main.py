"""The ``precsearch`` command: argv → settings → the library functions.

The only module that reads argv, prints tables and talks to a person; everything
below it logs.  Bad input ends with one line on stderr and exit code 2; a failed
build with exit code 3; a ``--check`` that traces a divergence from ONNX Runtime to
anything but a rounding near-tie (a compiler problem) with exit code 4.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import zlib
from pathlib import Path

from precsearch.errors import CompileError, PrecsearchError, first_line

EXIT_BAD_INPUT = 2
EXIT_BUILD_FAILED = 3
EXIT_CHECK_FAILED = 4

DEFAULT_WORKDIR = Path("precsearch-work")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="precsearch",
        description="Find which conv layers of a CNN can run int8 on this CPU; build any int8/float mix with TVM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="read options from a TOML file: top-level keys for every command, [command] tables "
                             "for one; the command line wins")
    commands = parser.add_subparsers(dest="command", required=True)

    # Shared option groups (parent parsers): every command that takes a model, data or a build takes the same ones.
    model_options = argparse.ArgumentParser(add_help=False)
    model_options.add_argument("model", nargs="?", default=None,
                               help="an ONNX file, or a packaged model: mobilenetv3-textcls, pplcnet-orientation, "
                                    "ddddocr-det, ddddocr-rec")
    model_options.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                               help="fix a dynamic input shape, e.g. x=1,3,48,192 (repeatable)")
    model_options.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    data_options = argparse.ArgumentParser(add_help=False)
    data_options.add_argument("--data", default="samples",
                              help="calibration and evaluation inputs: an image folder (jpg/png), a .npy/.npz file, "
                                   "or 'samples' (images that ship in packages; default)")
    data_options.add_argument("--preset", default=None,
                              help="preprocessing preset (default: the packaged model's, else imagenet)")
    data_options.add_argument("--calibration", default="minmax", choices=["minmax", "entropy", "percentile"],
                              help="ONNX Runtime calibrator (default minmax)")
    data_options.add_argument("--calibration-batches", type=int, default=8, help="batches to calibrate on (default 8)")
    data_options.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                              help="caches, the tuning database and the study (default ./precsearch-work)")

    compile_options = argparse.ArgumentParser(add_help=False)
    compile_options.add_argument("--block-size", type=int, default=None,
                                 help="NCHW<b>c block (default: 16 or 8, whichever blocks more MACs)")
    compile_options.add_argument("--float-layout", choices=["blocked", "nchw"], default="blocked",
                                 help="layout of float convs (default blocked where the shape allows)")
    compile_options.add_argument("--threads", type=int, default=2, help="cores to build for and measure with (default 2)")
    compile_options.add_argument("--requant", choices=["float64", "float32"], default="float64",
                                 help="int8 requantization arithmetic: float64 rounds exactly (default), float32 is "
                                      "faster")
    compile_options.add_argument("--untuned", action="store_true",
                                 help="ignore the tuning database in --workdir (default: apply it when present)")

    def command(name, help_text, *parents):
        sub = commands.add_parser(name, help=help_text, parents=list(parents))
        sub.add_argument("--config", type=Path, help=argparse.SUPPRESS)  # also accepted after the command
        return sub

    command("layers", "list the conv layers with ids, shapes, MACs and int8 capability", model_options)

    build = command("build", "build one int8/float plan into a shared library", model_options, data_options,
                    compile_options)
    build.add_argument("--float", dest="float_ids", default="none", metavar="ID[,ID...]",
                       help="conv ids that stay float; 'none' = all int8, 'all' = all float (default: none)")
    build.add_argument("--out", type=Path, default=None,
                       help="directory for model.so, plan.json and the QDQ model (required)")
    build.add_argument("--dump-ir", type=Path, metavar="DIR", help="write the IR after every pass into DIR")
    build.add_argument("--check", action="store_true",
                       help="run the library on real inputs against ONNX Runtime on the same QDQ model")
    build.add_argument("--check-batches", type=int, default=8,
                       help="batches for --check, never ones used for calibration (default 8)")

    command("doctor", "run first: build all-float and all-int8 untuned and say per layer how each built",
            model_options, data_options, compile_options)

    tune = command("tune", "tune every kernel a plan of the model can contain (once per model and CPU)",
                   model_options, data_options, compile_options)
    tune.add_argument("--trials", type=int, default=32,
                      help="MetaSchedule trials per distinct kernel (default 32); a re-run tops kernels up to it")
    tune.add_argument("--timeout", default=None, metavar="DURATION",
                      help="stop starting new kernels after this long, e.g. 90s, 30m, 2h (records are kept)")

    bench = command("bench", "latency of ORT float/int8 and TVM float/int8/plans, from one run",
                    model_options, data_options, compile_options)
    bench.add_argument("--plan", action="append", default=[], metavar="ID[,ID...]",
                       help="float conv ids of an extra plan to measure, as build --float (repeatable)")
    bench.add_argument("--repeats", type=int, default=100, help="timed runs per build (default 100)")
    bench.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    bench.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                       help="measure the TVM builds on a board through this TVM RPC tracker")
    bench.add_argument("--rpc-key", default=None, help="device key the board's RPC server registered")
    bench.add_argument("--target", default=None,
                       help="TVM target as JSON for the board, e.g. '{\"kind\":\"llvm\",\"mcpu\":\"cascadelake\"}' "
                            "(default: this CPU)")

    sensitivity = command("sensitivity", "rank conv layers by the fidelity they cost as int8 and the latency they save",
                          model_options, data_options, compile_options)
    sensitivity.add_argument("--metric", default=None,
                             help="ranking metric: top1, top5, cosine, sqnr_db, nmse, max_abs_error "
                                  "(default: top1 for a classifier output, else sqnr_db)")
    sensitivity.add_argument("--eval-batches", type=int, default=8, help="evaluation batches, disjoint from calibration")
    sensitivity.add_argument("--no-latency", action="store_true",
                             help="skip the 1+N TVM builds that measure the latency each layer saves")

    search = command("search", "search which convs stay float: an Optuna study of latency against fidelity",
                     model_options, data_options, compile_options)
    search.add_argument("--eval-batches", type=int, default=32,
                        help="fidelity batches, disjoint from calibration (default 32)")
    search.add_argument("--check-batches", type=int, default=1,
                        help="evaluation batches each trial's library is cross-checked on against ORT (default 1)")
    search.add_argument("--metric", default=None,
                        help="fidelity objective: top1, top5, cosine, sqnr_db, nmse, max_abs_error "
                             "(default: top1 for a classifier output, else sqnr_db)")
    search.add_argument("--max-drop", type=float, default=None,
                        help="allowed fidelity drop relative to float (top1/top5/cosine), e.g. 0.01; a constraint")
    search.add_argument("--goal", type=float, default=None,
                        help="least acceptable metric value (greatest for nmse/max_abs_error); a constraint")
    search.add_argument("--trials", type=int, default=None,
                        help="distinct plans to evaluate (default: every plan when the space is <= 1024, else 200)")
    search.add_argument("--timeout", default=None, metavar="DURATION",
                        help="stop starting new trials after this long, e.g. 90s, 30m, 8h")
    search.add_argument("--storage", default=None,
                        help="Optuna storage URL (default sqlite:///WORKDIR/study.db); postgresql://... for many "
                             "machines (also read from $PRECSEARCH_STORAGE)")
    search.add_argument("--study", default=None, help="study name (default: precsearch-<model>-<metric>)")
    search.add_argument("--sampler", default=None,
                        help="tpe, nsga2, gp, random or exhaustive (default: exhaustive up to 1024 plans, else tpe)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine: they compile in parallel and measure one at a time")
    search.add_argument("--sensitivity-k", type=int, default=4,
                        help="seed plans with the 1..K most sensitive layers float (needs sensitivity.csv)")
    search.add_argument("--repeats", type=int, default=50, help="timed runs per plan (default 50)")
    search.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    search.add_argument("--heartbeat-interval", type=int, default=15, metavar="S",
                        help="seconds between a running trial's heartbeats (default 15)")
    search.add_argument("--grace-period", type=int, default=120, metavar="S",
                        help="a trial without a heartbeat for this long is failed and re-run (default 120)")
    search.add_argument("--remeasure-repeats", type=int, default=None, metavar="N",
                        help="timed runs when re-measuring the front before the final report (default 4 x --repeats)")

    report = command("report", "regenerate <workdir>/report from the study alone")
    report.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    report.add_argument("--storage", default=None, help="storage URL (default the workdir's SQLite study)")
    report.add_argument("--study", default=None, help="study name (default: the storage's only study)")
    report.add_argument("--out", type=Path, default=None, help="report folder (default <workdir>/report)")

    export = command("export", "a trial's library, QDQ model and float layers for other quantizers")
    export.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    export.add_argument("--storage", default=None)
    export.add_argument("--study", default=None)
    export.add_argument("--trial", type=int, default=None, help="the trial number (see pareto.csv; required)")
    export.add_argument("--out", type=Path, default=None, help="output folder (required)")
    export.add_argument("--json", action="store_true")

    worker = command("worker", "join a search started elsewhere (same storage and study)")
    worker.add_argument("--storage", default=None, help="the study's storage URL (or $PRECSEARCH_STORAGE)")
    worker.add_argument("--study", default=None, help="the study name (required)")
    worker.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="this machine's caches")
    worker.add_argument("--index", type=int, default=None,
                        help="offsets the sampler seed (default: from this host and process, so workers differ)")
    worker.add_argument("--json", action="store_true")
    return parser


# Options a command cannot run without; argparse's own `required` would not let a --config file supply them.
_REQUIRED = {"build": ("model", "out"), "export": ("trial", "out"), "worker": ("study",)}
_MODEL_COMMANDS = ("layers", "build", "doctor", "tune", "bench", "sensitivity", "search")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Load ``--config FILE.toml`` (if given) as defaults of the commands, so the command line still wins."""
    import tomllib

    from precsearch.errors import ConfigError

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    try:
        settings = tomllib.loads(known.config.read_text())
    except OSError as exc:
        raise ConfigError(f"The '--config' file {str(known.config)!r} cannot be read: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The '--config' file {str(known.config)!r} is not valid TOML: {exc}.") from None
    subparsers = _subparsers(parser)
    shared = {k: v for k, v in settings.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in settings.items() if isinstance(v, dict)}
    unknown_tables = sorted(set(tables) - set(subparsers))
    if unknown_tables:
        raise ConfigError(f"The '--config' file {str(known.config)!r} has tables {unknown_tables} that are not "
                          f"commands; commands are {sorted(subparsers)}.")
    used = set()
    for name, sub in subparsers.items():
        actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
        actions.update({option[2:].replace("-", "_"): a for a in list(actions.values()) for option in a.option_strings
                        if option.startswith("--")})
        values = {**shared, **tables.get(name, {})}
        defaults = {}
        for key, value in values.items():
            dest = key.replace("-", "_")
            if dest not in actions:
                if key in tables.get(name, {}):
                    raise ConfigError(f"The '--config' file {str(known.config)!r} sets {key!r} for '{name}', "
                                      "which takes no such option.")
                continue
            action = actions[dest]
            if isinstance(value, str) and callable(action.type):
                value = action.type(value)
            if action.choices is not None and value not in action.choices:
                raise ConfigError(f"The '--config' key {key!r} must be one of {list(action.choices)}; "
                                  f"got {value!r} instead.")
            defaults[action.dest] = value
            used.add(key)
        sub.set_defaults(**defaults)
    unused = sorted(set(shared) - used)
    if unused:
        raise ConfigError(f"The '--config' file {str(known.config)!r} sets {unused}, which no command takes.")


def _check_required(args) -> None:
    from precsearch.errors import ConfigError

    names = list(_REQUIRED.get(args.command, ()))
    if args.command in _MODEL_COMMANDS and "model" not in names:
        names.insert(0, "model")
    missing = [name for name in names if getattr(args, name, None) is None]
    if missing:
        flags = ", ".join(name if name == "model" else f"--{name.replace('_', '-')}" for name in missing)
        raise ConfigError(f"'precsearch {args.command}' needs {flags} (on the command line or in --config).")


def _compile_options(args, **overrides):
    """The CompileOptions every building command derives from its shared compile options."""
    from precsearch.tvm import CompileOptions

    settings = dict(block_size=args.block_size, float_blocked=args.float_layout == "blocked", threads=args.threads,
                    requant_dtype=args.requant)
    settings.update(overrides)
    return CompileOptions(**settings)


def _workspace(args, model, preset, *, eval_batches: int = 0, **option_overrides):
    """The command's :class:`~precsearch.workspace.Workspace`: its data options, compile options and workdir."""
    from precsearch.workspace import DataSettings, Workspace

    data = DataSettings(data=args.data, preset=args.preset or preset, calibration=args.calibration,
                        calibration_batches=args.calibration_batches, eval_batches=eval_batches)
    _writable_dir(args.workdir / "cache", "workdir")
    return Workspace(model, args.workdir, data, _compile_options(args, **option_overrides), untuned=args.untuned)


def _load(args):
    from precsearch.model import open_model, parse_input_shapes

    return open_model(args.model, parse_input_shapes(args.input_shape))


def _cmd_layers(args) -> int:
    from precsearch.tvm import unsupported_operators

    model, _ = _load(args)
    # Named before any build: a node no build can import makes every plan fail.
    for node, op_type in unsupported_operators(model.proto):
        print(f"precsearch: warning: node {node!r} ({op_type}) cannot be imported by TVM's ONNX frontend; "
              "no plan of this model builds", file=sys.stderr)
    if args.json:
        print(json.dumps([layer.to_dict() for layer in model.layers], indent=1))
        return 0
    header = f"{'id':<16} {'op':<13} {'in→out':>9} {'kernel':>6} {'stride':>6} {'groups':>6} " \
             f"{'input shape':<18} {'output shape':<18} {'MACs':>12}  int8"
    print(header)
    print("-" * len(header))
    for layer in model.layers:
        kernel = "x".join(map(str, layer.kernel))
        stride = "x".join(map(str, layer.stride))
        int8 = "yes" if layer.int8_capable else f"no ({layer.reason})"
        print(f"{layer.id:<16} {layer.op_type:<13} {f'{layer.in_channels}→{layer.out_channels}':>9} {kernel:>6} "
              f"{stride:>6} {layer.groups:>6} {str(list(layer.input_shape)):<18} {str(list(layer.output_shape)):<18} "
              f"{layer.macs:>12,}  {int8}")
    total = sum(layer.macs for layer in model.layers)
    capable = sum(layer.int8_capable for layer in model.layers)
    print(f"{len(model.layers)} conv layers, {capable} int8-capable, {total:,} MACs")
    return 0


def _cmd_doctor(args) -> int:
    from precsearch.jobs.doctor import diagnose

    model, preset = _load(args)
    options = _compile_options(args)
    diagnosis = diagnose(model, args.preset or preset, data=args.data, options=options,
                         calibration_batches=args.calibration_batches, progress=lambda line: _status(line, args.json))
    if args.json:
        print(json.dumps(diagnosis.to_dict(), indent=1))
        return 0 if diagnosis.healthy else EXIT_BUILD_FAILED
    for node, op_type in diagnosis.unsupported:
        print(f"cannot import: node {node!r} ({op_type}): TVM's ONNX frontend has no converter for it")
    if diagnosis.plans:
        names = [plan.plan for plan in diagnosis.plans]
        print(f"{'id':<24} " + " ".join(f"{name:<34}" for name in names))
        for layer in model.layers:
            cells = []
            for plan in diagnosis.plans:
                outcome, detail = plan.layers[layer.id]
                cells.append(f"{outcome}: {detail}"[:34])
            print(f"{layer.id:<24} " + " ".join(f"{cell:<34}" for cell in cells))
    for plan in diagnosis.plans:
        if not plan.built:
            print(f"{plan.plan}: FAILED in pass {plan.failed_pass!r}"
                  f"{f' at layer {plan.failed_layer!r}' if plan.failed_layer else ''}: {plan.error}")
            continue
        print(f"{plan.plan}: built in {plan.build_time_s:.1f} s, {plan.boundary_transforms} layout transforms; "
              f"{plan.check}{'' if plan.check_ok else '  <-- NOT OK'}")
        _print_operators(plan.operator_notes, plan.operator_layouts, plan.layout_fallback)
    print("healthy: every plan can build" if diagnosis.healthy else "NOT healthy: see above")
    return 0 if diagnosis.healthy else EXIT_BUILD_FAILED


def _print_operators(notes: list[dict], layouts: list[dict], fallback: str) -> None:
    if fallback:
        print(f"  every conv kept NCHW: the blocked graph failed: {fallback}")
    for note in notes:
        print(f"  {note['action']}: {note['op_type']} {note['node']!r}: {note['detail']}")
    fell_back = [row for row in layouts if row["nchw_fallback"]]
    if fell_back:
        print("  operators run in NCHW beside blocked tensors (layout transforms around them): "
              + ", ".join(f"{row['op']} ×{row['nchw_fallback']}" for row in fell_back))
    blocked = [row for row in layouts if row["blocked"]]
    if blocked:
        print("  operators run blocked: " + ", ".join(f"{row['op']} ×{row['blocked']}" for row in blocked))


def _status(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _cmd_build(args) -> int:
    from precsearch.fidelity.crosscheck import COMPILER_PROBLEM
    from precsearch.jobs.build import build_and_export
    from precsearch.plan import parse_plan

    model, preset = _load(args)
    plan = parse_plan(args.float_ids, model)
    out_dir = _writable_dir(args.out, "out")
    workspace = _workspace(args, model, preset, eval_batches=args.check_batches if args.check else 0)
    summary = build_and_export(workspace, plan, out_dir, check=args.check, dump_ir_dir=args.dump_ir,
                               status=lambda message: _status(message, args.json))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_build(summary)
    if summary.get("divergence_verdict") == COMPILER_PROBLEM:
        print(f"precsearch: error: --check found a {summary['divergence_summary']}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _cmd_sensitivity(args) -> int:
    from precsearch.fidelity.metrics import default_metric, validate_metric
    from precsearch.study.sensitivity import run_sensitivity, to_frame, write_csv

    quiet = args.json
    model, preset = _load(args)
    shapes = _output_shapes(model)
    metric = validate_metric(args.metric, next(iter(shapes.values()))) if args.metric else default_metric(shapes)
    workdir = _writable_dir(args.workdir, "workdir")
    workspace = _workspace(args, model, preset, eval_batches=args.eval_batches)
    workspace.prepare(ort_int8=False)  # before the clock starts
    started = time.perf_counter()

    def progress(done: int, total: int, layer_id: str) -> None:
        elapsed = time.perf_counter() - started
        left = elapsed / done * (total - done)
        _status(f"[{done}/{total}] {layer_id}  {elapsed:.0f} s elapsed, ~{left:.0f} s left", quiet)

    rows = run_sensitivity(workspace, measure_latency=not args.no_latency, progress=progress)
    frame = to_frame(rows, metric)
    path = write_csv(frame, workdir)
    if args.json:
        print(json.dumps({"metric": metric, "csv": str(path), "layers": json.loads(frame.to_json(orient="records"))},
                         indent=1))
        return 0
    columns = ["rank", "id", f"only_int8.{metric}", f"only_float.{metric}", "latency_saved_ms"]
    if metric != "sqnr_db":
        columns.insert(4, "only_int8.sqnr_db")
    print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"most sensitive first, by {metric} with only that layer int8; written to {path}")
    return 0


def _duration_s(text: str | None) -> float | None:
    from precsearch.errors import ConfigError

    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise ConfigError(f"The 'timeout' parameter must be a positive duration like 90s, 30m or 2h; got {text!r} "
                          "instead.")
    return seconds


def _cmd_tune(args) -> int:
    from precsearch.jobs.tune import tune_model

    quiet = args.json
    timeout_s = _duration_s(args.timeout)
    model, preset = _load(args)
    workspace = _workspace(args, model, preset)
    workspace.prepare(reference=False, ort_int8=False)
    _status(f"extracting the kernels of {model.source} (all-int8, all-float and two alternating plans)...", quiet)

    def progress(done: int, total: int, name: str, trials: int, elapsed_s: float) -> None:
        left_s = elapsed_s / done * (total - done)
        what = f"{trials} trials" if trials else "no tuning needed"
        _status(f"[{done}/{total}] {name[:70]}: {what}; {elapsed_s / 60:.1f} min elapsed, ~{left_s / 60:.1f} min left",
                False)  # stderr: progress never mixes with --json on stdout

    report = tune_model(workspace, trials_per_task=args.trials, timeout_s=timeout_s, progress=progress)
    result = {"model": str(model.source), "trials_per_kernel": args.trials, **report.to_dict()}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        state = "done" if report.finished else "stopped at the time limit; run the same command to continue"
        print(f"{report.tasks_total} kernels: {report.tasks_tuned} tuned now, {report.tasks_skipped} already tuned, "
              f"{report.tasks_covered} served by a kernel with the same conv; "
              f"{report.trials_run} trials in {report.time_s / 60:.1f} min; {report.records} records in the "
              f"database ({state})")
    return 0


def _cmd_bench(args) -> int:
    from precsearch.jobs.bench import bench
    from precsearch.plan import parse_plan
    from precsearch.tvm import RpcTarget, check_tracker, parse_tracker

    quiet = args.json
    rpc = None
    if args.rpc_tracker or args.rpc_key:
        if not (args.rpc_tracker and args.rpc_key):
            raise ValueError("--rpc-tracker and --rpc-key go together; got only one of them.")
        host, port = parse_tracker(args.rpc_tracker)
        rpc = RpcTarget(host=host, port=port, key=args.rpc_key)
        check_tracker(rpc)  # before minutes of building
    model, preset = _load(args)
    plans = [(f"plan{i}", parse_plan(spec, model)) for i, spec in enumerate(args.plan, start=1)]
    workspace = _workspace(args, model, preset, target=args.target)
    _status("calibrating and quantizing the ORT int8 baseline (quantize_static, defaults, per channel)...", quiet)
    workspace.prepare(reference=False)
    if workspace.database is None and not args.untuned:
        _status("no tuning database in the workdir: TVM builds run untuned kernels (run precsearch tune first)", quiet)
    result = bench(workspace, plans=plans, threads=args.threads, warmup=args.warmup, repeats=args.repeats, rpc=rpc,
                   progress=lambda m: _status(m, quiet))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    frame = result.to_frame()[["name", "int8_convs", "median_ms", "iqr_ms", "vs_ort_float", "vs_ort_int8",
                               "build_time_s"]]
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    where = f"TVM builds on {result.remote} via RPC, ONNX Runtime here" if result.remote else "all on this machine"
    print(f"batch 1, {result.threads} threads, median of {args.repeats} runs after {args.warmup} warm-up; {where}; "
          f"{'tuned' if result.tuned else 'untuned'} TVM kernels")
    return 0


def _storage_url(args, workdir: Path) -> str:
    import os

    from precsearch.study.storage import default_storage_url

    return args.storage or os.environ.get("PRECSEARCH_STORAGE") or default_storage_url(workdir)


def _progress_line(progress) -> str:
    line = f"[{progress.done}/{progress.budget} plans] {progress.failed} failed, {progress.running} running; " \
           f"front {progress.front_size}"
    best = progress.fastest_feasible
    if best is not None:
        line += f"; fastest feasible {best.latency_ms:.3f} ms ({progress.metric} {best.fidelity:.4g}, " \
                f"{len(best.float_layers)} float, trial {best.trial})"
    line += f"; {progress.elapsed_s / 60:.1f} min elapsed"
    if progress.left_s is not None:
        line += f", ~{progress.left_s / 60:.1f} min left"
    return line


def _cmd_search(args) -> int:
    from precsearch.jobs.search import run_search
    from precsearch.study.config import SearchConfig

    quiet = args.json
    timeout_s = _duration_s(args.timeout)
    workdir = _writable_dir(args.workdir, "workdir").resolve()
    model_spec = args.model if not Path(args.model).is_file() else str(Path(args.model).resolve())
    shapes = {name: list(shape) for name, shape in _parse_shapes(args).items()}
    config = SearchConfig(model=model_spec, input_shapes=shapes, data=args.data, preset=args.preset,
                          calibration=args.calibration, calibration_batches=args.calibration_batches,
                          eval_batches=args.eval_batches, metric=args.metric, max_drop=args.max_drop, goal=args.goal,
                          sampler=args.sampler, trials=args.trials, timeout_s=timeout_s, seed=args.seed,
                          sensitivity_k=args.sensitivity_k, workers=args.workers, threads=args.threads,
                          requant=args.requant, block_size=args.block_size, float_layout=args.float_layout,
                          check_batches=args.check_batches, warmup=args.warmup, repeats=args.repeats,
                          untuned=args.untuned,
                          heartbeat_interval_s=args.heartbeat_interval, grace_period_s=args.grace_period)
    model, preset = _load(args)
    run = run_search(config, model, preset, workdir=workdir, storage_url=_storage_url(args, workdir),
                     study_name=args.study, remeasure_repeats=args.remeasure_repeats,
                     status=lambda line: _status(line, quiet),
                     progress=lambda snapshot: _status(_progress_line(snapshot), False))
    code = _print_search(run.summary, args.json, run.handle)
    _status(f"report: {run.report_dir / 'report.html'}", quiet)
    return code


def _write_report(study, workdir: Path, out_dir: Path) -> None:
    from precsearch.jobs.search import write_study_report

    write_study_report(study, workdir, out_dir)


def _open_named_study(args):
    import optuna

    from precsearch.study.storage import StorageError, open_storage, quiet_experimental, redact_url

    workdir = args.workdir.resolve()
    storage_url = _storage_url(args, workdir)
    if not args.storage and not (workdir / "study.db").is_file() and "PRECSEARCH_STORAGE" not in os.environ:
        raise StorageError(f"There is no study in {str(workdir)!r} (no study.db); give --workdir or --storage.")
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    name = args.study
    if name is None:
        if len(names) != 1:
            raise StorageError(f"The storage {redact_url(storage_url)} holds {len(names)} studies {names[:10]}; "
                               "name one with --study.")
        name = names[0]
    if name not in names:
        raise StorageError(f"The study {name!r} does not exist in {redact_url(storage_url)}; it has {names[:10]}.")
    with quiet_experimental():
        return optuna.load_study(study_name=name, storage=storage), workdir


def _cmd_report(args) -> int:
    study, workdir = _open_named_study(args)
    out_dir = _writable_dir(args.out or workdir / "report", "out")
    _write_report(study, workdir, out_dir)
    print(f"report of study {study.study_name!r} ({len(study.trials)} trials): {out_dir / 'report.html'}")
    return 0


def _cmd_export(args) -> int:
    from precsearch.report.export import export_trial

    study, workdir = _open_named_study(args)
    out_dir = _writable_dir(args.out, "out")
    summary = export_trial(study, args.trial, out_dir, workdir)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"trial {args.trial}: {len(summary['float_layers'])} float / {len(summary['int8_layers'])} int8 convs; "
              f"wrote {out_dir}/model.so, model.qdq.onnx, plan.json, onnxruntime_quantize.py, nncf_ignored_scope.py, "
              "inc_op_name_dict.py")
    return 0


def _cmd_worker(args) -> int:
    from precsearch.jobs.search import join_search

    workdir = _writable_dir(args.workdir, "workdir").resolve()
    index = args.index if args.index is not None else zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 9973 + 1
    run = join_search(args.study, workdir=workdir, storage_url=_storage_url(args, workdir), worker_index=index,
                      progress=lambda p: _status(_progress_line(p), False))
    return _print_search(run.summary, args.json, run.handle)


def _print_search(summary, as_json: bool, handle) -> int:
    front = [{"trial": p.trial, "latency_ms": p.latency_ms, summary.metric: p.fidelity,
              "float_layers": list(p.float_layers)} for p in summary.front]
    if as_json:
        print(json.dumps({"study": summary.study_name, "storage": summary.storage, "metric": summary.metric,
                          "budget": summary.budget, "completed": summary.completed, "failed": summary.failed,
                          "duplicates": summary.duplicates, "elapsed_s": round(summary.elapsed_s, 1),
                          "stopped_by": summary.stopped_by, "front": front}, indent=1))
        return 0
    goal = handle.config.fidelity_goal(summary.metric)
    print(f"{'trial':>5} {'latency ms':>10} {summary.metric:>10} {'float':>5}  float layers")
    for point in summary.front:
        layers = ",".join(point.float_layers) or "-"
        print(f"{point.trial:>5} {point.latency_ms:>10.3f} {point.fidelity:>10.4g} {len(point.float_layers):>5}  "
              f"{layers if len(layers) <= 60 else layers[:57] + '...'}")
    constraint = f" with {summary.metric} >= {goal:g}" if goal is not None else ""
    print(f"front: {len(summary.front)} plans{constraint}; {summary.completed} plans completed, {summary.failed} "
          f"failed, {summary.duplicates} repeats served from storage; {summary.elapsed_s / 60:.1f} min "
          f"(stopped by {summary.stopped_by}); study {summary.study_name!r} in {summary.storage}")
    return 0


def _output_shapes(model) -> dict:
    return {out.name: [d.dim_value for d in out.type.tensor_type.shape.dim] for out in model.proto.graph.output}


def _parse_shapes(args) -> dict:
    from precsearch.model import parse_input_shapes

    return parse_input_shapes(args.input_shape)


def _print_build(summary: dict) -> None:
    print(f"{'id':<16} {'dtype':<8} {'layout':<8} {'kernel':<8} {'transforms in':<16} {'transforms out':<16} note")
    for row in summary["layers"]:
        print(f"{row['id']:<16} {row['dtype']:<8} {row['layout']:<8} {row['kernel']:<8} "
              f"{', '.join(row['transforms_in']) or '-':<16} {', '.join(row['transforms_out']) or '-':<16} {row['note']}")
    print(f"{len(summary['int8_layers'])} int8, {len(summary['float_layers'])} float convs; block {summary['block_size']}; "
          f"{summary['boundary_transforms']} activation layout transforms; built in {summary['build_time_s']} s ("
          f"{_tuning_state(summary)})")
    _print_operators(summary["operators"]["rewritten"], summary["operators"]["layouts"], summary["layout_fallback"])
    print(f"library: {summary['library']}")
    if "dump_ir" in summary:
        print(f"IR after each pass: {summary['dump_ir']['files']} files in {summary['dump_ir']['dir']}")
    if "max_relative_error" in summary:
        print(f"check: {summary['divergence_summary']}")
    if "agreement" in summary:
        print(f"agreement with ONNX Runtime (same QDQ model): {summary['agreement']:.4%} of "
              f"{summary['checked_elements']} output elements within one output quantization step; "
              f"max abs error {summary['max_abs_error']:.3g} ({summary['max_error_steps']:.2f} steps)")
        print(f"  for comparison, ONNX Runtime's own int8 kernels: {summary['ort_int8_agreement']:.4%} "
              f"(max {summary['ort_int8_max_error_steps']:.2f} steps)")
        print(f"  divergences: {summary['divergence_summary']}")


def _tuning_state(summary: dict) -> str:
    if not summary["tuned"]:
        return "untuned kernels: run precsearch tune once for fast ones"
    return f"{summary['tuned_kernels']} of {summary['total_kernels']} kernels tuned"


def _writable_dir(path: Path, parameter: str) -> Path:
    from precsearch.errors import ConfigError

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".precsearch-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"The '{parameter}' directory {str(path)!r} is not writable: {exc.strerror or exc}.") \
            from exc
    return path


_DISK_ERRORS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EACCES: "Permission denied", errno.EROFS: "Read-only file system"}
# The same conditions as text, from tools that report them in a message (the linker, SQLite).
_DISK_MESSAGES = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def _unwritable(exc: BaseException) -> str | None:
    """One line for a write that failed on a full, read-only or forbidden disk, naming the path; else None."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRORS:
            return f"{_DISK_ERRORS[seen.errno]}: {seen.filename}" if seen.filename else _DISK_ERRORS[seen.errno]
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    message = next((m for m in _DISK_MESSAGES if m in text), None)
    if message is None:
        return None
    path = re.search(r"(?:-o|writing|open) '?(/[^\s':]+)", text)
    return f"{message}: {path.group(1)}" if path else f"{message} ({first_line(exc)})"


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `precsearch layers m | head` must end quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = _parser()
    try:
        _apply_config(parser, sys.argv[1:] if argv is None else list(argv))
        args = parser.parse_args(argv)
        _check_required(args)
    except (PrecsearchError, ValueError) as exc:
        print(f"precsearch: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        code = {"layers": _cmd_layers, "doctor": _cmd_doctor, "build": _cmd_build, "tune": _cmd_tune, "bench": _cmd_bench,
                "sensitivity": _cmd_sensitivity, "search": _cmd_search, "worker": _cmd_worker,
                "report": _cmd_report, "export": _cmd_export}[args.command](args)
    except Exception as exc:  # noqa: BLE001 — sorted below; anything else re-raises
        full = _unwritable(exc)
        if full is not None:
            # A full or read-only disk is bad input: caches and the study were written atomically and resume.
            print(f"precsearch: error: {full}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(exc, CompileError):
            print(f"precsearch: build failed: {first_line(exc)}", file=sys.stderr)
            return EXIT_BUILD_FAILED
        if isinstance(exc, (PrecsearchError, ValueError)):
            print(f"precsearch: error: {first_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(exc, OSError):
            print(f"precsearch: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except KeyboardInterrupt:
        print("precsearch: interrupted", file=sys.stderr)
        return 130
    logging.getLogger(__name__).info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return code



if __name__ == "__main__":
    sys.exit(main())
