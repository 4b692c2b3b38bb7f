"""One function per command: options → workspace or search config → one library call → render.

Each returns the process exit code; errors propagate to :func:`precsearch.cli.main`,
which turns them into one line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import zlib
from pathlib import Path

from precsearch.cli.render import (print_bench_profiles, print_build, print_operators, print_search, front_lines, progress_line,
                                   status)

EXIT_BAD_INPUT = 2
EXIT_BUILD_FAILED = 3
EXIT_CHECK_FAILED = 4


def _compile_options(args, **overrides):
    """The CompileOptions every building command derives from its shared compile options."""
    from precsearch.tvm import ONEDNN_INT8_SETTINGS, CompileOptions

    settings = dict(block_size=args.block_size, float_blocked=args.float_layout == "blocked", threads=args.threads,
                    requant_dtype=args.requant, conv_backend=args.conv_backend,
                    onednn_int8=ONEDNN_INT8_SETTINGS[args.onednn_int8], activation_layout=args.activation_layout)
    settings.update(overrides)
    return CompileOptions(**settings)


def _workspace(args, model, preset, *, eval_batches: int = 0, **option_overrides):
    """The command's :class:`~precsearch.workspace.Workspace`: its data options, compile options and workdir."""
    from precsearch.workspace import DataSettings, Workspace

    data = DataSettings(data=args.data, preset=args.preset or preset, calibration=args.calibration,
                        calibration_batches=args.calibration_batches, eval_batches=eval_batches,
                        ort_model=getattr(args, "ort_model", DataSettings.ort_model))  # only where --backend is
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
                         calibration_batches=args.calibration_batches, progress=lambda line: status(line, args.json))
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
        print_operators(plan.operator_notes, plan.operator_layouts, plan.layout_fallback)
    print("healthy: every plan can build" if diagnosis.healthy else "NOT healthy: see above")
    return 0 if diagnosis.healthy else EXIT_BUILD_FAILED


def _cmd_build(args) -> int:
    from precsearch.fidelity.crosscheck import COMPILER_PROBLEM
    from precsearch.jobs.build import build_and_export
    from precsearch.model.plan import parse_plan

    model, preset = _load(args)
    plan = parse_plan(args.float_ids, model, args.bf16_ids)
    out_dir = _writable_dir(args.out, "out")
    workspace = _workspace(args, model, preset, eval_batches=args.check_batches if args.check else 0)
    summary = build_and_export(workspace, plan, out_dir, check=args.check, dump_ir_dir=args.dump_ir,
                               profile=args.profile, status=lambda message: status(message, args.json))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_build(summary)
    if summary.get("divergence_verdict") == COMPILER_PROBLEM:
        print(f"precsearch: error: --check found a {summary['divergence_summary']}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _cmd_sensitivity(args) -> int:
    from precsearch.fidelity.metrics import default_metric, validate_metric
    from precsearch.study.sensitivity import run_sensitivity, to_frame, write_csv
    from precsearch.tvm import bf16_unsupported_reason

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
        status(f"[{done}/{total}] {layer_id}  {elapsed:.0f} s elapsed, ~{left:.0f} s left", quiet)

    backends = ("tvm", "ort") if args.backend == "both" else (args.backend,)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and not bf16_unsupported_reason(workspace.options))
    rows = run_sensitivity(workspace, measure_latency=not args.no_latency, progress=progress, backends=backends,
                           bf16=bf16)
    frame = to_frame(rows, metric)
    path = write_csv(frame, workdir)
    if args.json:
        print(json.dumps({"metric": metric, "csv": str(path), "layers": json.loads(frame.to_json(orient="records"))},
                         indent=1))
        return 0
    columns = ["rank", "id", f"only_int8.{metric}", f"only_float.{metric}"]
    if bf16:
        columns.append(f"only_bf16.{metric}")
    if metric != "sqnr_db":
        columns.append("only_int8.sqnr_db")
    columns += [c for c in ("latency_saved_ms", "ort_latency_saved_ms") if c in frame and frame[c].notna().any()]
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
    status(f"extracting the kernels of {model.source} (all-int8, all-float and two alternating plans)...", quiet)

    def progress(done: int, total: int, name: str, trials: int, elapsed_s: float) -> None:
        left_s = elapsed_s / done * (total - done)
        what = f"{trials} trials" if trials else "no tuning needed"
        status(f"[{done}/{total}] {name[:70]}: {what}; {elapsed_s / 60:.1f} min elapsed, ~{left_s / 60:.1f} min left",
                False)  # stderr: progress never mixes with --json on stdout

    report = tune_model(workspace, trials_per_task=args.trials, timeout_s=timeout_s, progress=progress)
    result = {"model": str(model.source), "trials_per_kernel": args.trials, **report.to_dict()}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        state = "done" if report.finished else "stopped at the time limit; run the same command to continue"
        print(f"{report.tasks_total} kernels: {report.tasks_tuned} tuned now, {report.tasks_skipped} already tuned, "
              f"{report.tasks_covered} served by a kernel with the same conv "
              f"({report.tasks_elementwise} element-wise kernels keep the fallback schedule); "
              f"{report.trials_run} trials in {report.time_s / 60:.1f} min; {report.records} records in the "
              f"database ({state})")
    return 0


def _cmd_bench(args) -> int:
    from precsearch.jobs.bench import bench
    from precsearch.measure import LOADED_CORES
    from precsearch.model.plan import parse_plan
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
    status("calibrating and quantizing the ORT int8 baseline (quantize_static, defaults, per channel)...", quiet)
    workspace.prepare(reference=False)
    if workspace.database is None and not args.untuned:
        status("no tuning database in the workdir: TVM builds run untuned kernels (run precsearch tune first)", quiet)
    backends = ("tvm", "ort") if args.backend == "both" else (args.backend,)
    result = bench(workspace, plans=plans, threads=args.threads, warmup=args.warmup, repeats=args.repeats, rpc=rpc,
                   progress=lambda m: status(m, quiet), backends=backends,
                   conv_backends=("tir", "onednn") if args.compare_conv_backends else None, rounds=args.rounds,
                   profile=args.profile)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    frame = result.to_frame()
    columns = ["name", "int8_convs", "onednn_convs", "median_ms", "iqr_ms", "vs_ort_float", "vs_ort_int8",
               "build_time_s"]
    if (frame["precision"] != "").any():  # OpenVINO rows: the precision it ran in and how close it stays to float
        columns += ["precision", "sqnr_db_vs_ort_float"]
    print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""))
    where = f"TVM builds on {result.remote} via RPC, ONNX Runtime here" if result.remote else "all on this machine"
    timing = (f"median of {args.repeats} runs after {args.warmup} warm-up" if result.rounds == 1 else
              f"median of {result.rounds} interleaved rounds of {args.repeats // result.rounds} runs, "
              f"{args.warmup} warm-up each")
    print(f"batch 1, {result.threads} threads, {timing}; {where}; "
          f"{'tuned' if result.tuned else 'untuned'} TVM kernels")
    print_bench_profiles(result.profiles)
    if result.others_busy_cores is not None and result.others_busy_cores >= LOADED_CORES:
        print(f"warning: other processes kept {result.others_busy_cores:.1f} of the machine's cores busy while "
              "timing: every figure above carries their load; time again on a quiet machine")
    return 0


def _storage_url(args, workdir: Path) -> str:
    import os

    from precsearch.study.storage import default_storage_url

    return args.storage or os.environ.get("PRECSEARCH_STORAGE") or default_storage_url(workdir)


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
                          goal_on=args.goal_on.replace("-", "_"),
                          guided=args.guided, bf16=args.bf16,
                          sampler=args.sampler, trials=args.trials, timeout_s=timeout_s, seed=args.seed,
                          sensitivity_k=args.sensitivity_k, workers=args.workers, threads=args.threads,
                          requant=args.requant, block_size=args.block_size, float_layout=args.float_layout,
                          conv_backend=args.conv_backend, onednn_int8=args.onednn_int8,
                          activation_layout=args.activation_layout, check_batches=args.check_batches, warmup=args.warmup, repeats=args.repeats,
                          untuned=args.untuned, backend=args.backend, ort_model=args.ort_model, tune=args.tune,
                          heartbeat_interval_s=args.heartbeat_interval, grace_period_s=args.grace_period)
    model, preset = _load(args)

    def show_front(summary, handle):
        for line in front_lines(summary, handle):
            status(line, quiet)

    run = run_search(config, model, preset, workdir=workdir, storage_url=_storage_url(args, workdir),
                     study_name=args.study, remeasure_repeats=args.remeasure_repeats,
                     status=lambda line: status(line, quiet),
                     progress=lambda snapshot: status(progress_line(snapshot), False), front=show_front)
    code = print_search(run.summary, args.json, run.handle)
    status(f"report: {run.report_dir / 'report.html'}", quiet)
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
    summary = export_trial(study, args.trial, out_dir, workdir, backend=args.backend)
    if args.json:
        print(json.dumps(summary, indent=1))
    elif summary["backend"] == "ort":
        written = ", ".join(Path(summary[k]).name for k in ("int8_model", "float_model", "snippet") if k in summary)
        print(f"trial {args.trial} (ONNX Runtime): {len(summary['float_layers'])} float / "
              f"{len(summary['int8_layers'])} int8 convs; wrote {out_dir}/: {written}, plan.json")
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
                      progress=lambda p: status(progress_line(p), False))
    return print_search(run.summary, args.json, run.handle)


def _output_shapes(model) -> dict:
    return {out.name: [d.dim_value for d in out.type.tensor_type.shape.dim] for out in model.proto.graph.output}


def _parse_shapes(args) -> dict:
    from precsearch.model import parse_input_shapes

    return parse_input_shapes(args.input_shape)


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


COMMANDS = {"layers": _cmd_layers, "doctor": _cmd_doctor, "build": _cmd_build, "sensitivity": _cmd_sensitivity, "tune": _cmd_tune, "bench": _cmd_bench, "search": _cmd_search, "report": _cmd_report, "export": _cmd_export, "worker": _cmd_worker}
