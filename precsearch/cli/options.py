"""The command line's options: shared option groups, one sub-parser per command, ``--config FILE.toml``."""

from __future__ import annotations

import argparse
from pathlib import Path

from precsearch.cli.render import PROFILE_SHOWN_CONVS

DEFAULT_WORKDIR = Path("precsearch-work")


def build_parser() -> argparse.ArgumentParser:
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
    compile_options.add_argument("--conv-backend", choices=["tir", "onednn"], default="onednn",
                                 help="where float convs run: onednn (oneDNN primitives with bias and activation "
                                      "fused, where oneDNN has a jitted kernel; default) or tir (TVM kernels only)")
    compile_options.add_argument("--onednn-int8", choices=["auto", "on", "off"], default="auto",
                                 help="with --conv-backend onednn, int8 convs on oneDNN's u8 x s8 primitives too: "
                                      "auto (default) where the CPU has VNNI, on, or off (TIR, exact float64 "
                                      "requantization)")
    compile_options.add_argument("--activation-layout", choices=["auto", "nhwc", "blocked"], default="auto",
                                 help="layout activations run in: nhwc (every conv in NHWC, oneDNN's native layout: "
                                      "no conv reorders, no transforms between convs), blocked (NCHW<b>c, TIR's), "
                                      "or auto (default): nhwc when every conv of the plan runs on oneDNN on an "
                                      "AVX-512 CPU")
    compile_options.add_argument("--untuned", action="store_true",
                                 help="ignore the tuning database in --workdir (default: apply it when present)")

    backend_options = argparse.ArgumentParser(add_help=False)
    backend_options.add_argument("--backend", choices=["tvm", "ort", "both"], default="tvm",
                                 help="the runtime plans are built for: tvm (precsearch's TVM builds, default), ort "
                                      "(ONNX Runtime: quantize_static with the plan's float convs in "
                                      "nodes_to_exclude, timed in an optimized session) or both")
    backend_options.add_argument("--ort-model", choices=["quantize_static", "conv-qdq"], default="quantize_static",
                                 help="ONNX Runtime's model of a plan: quantize_static (default; its defaults, the "
                                      "plan's float convs excluded) or conv-qdq (precsearch's Conv-only QDQ model, "
                                      "the one TVM builds, which ORT may run faster)")

    def command(name, help_text, *parents):
        sub = commands.add_parser(name, help=help_text, parents=list(parents))
        sub.add_argument("--config", type=Path, help=argparse.SUPPRESS)  # also accepted after the command
        return sub

    command("layers", "list the conv layers with ids, shapes, MACs and int8 capability", model_options)

    build = command("build", "build one int8/bf16/float plan into a shared library", model_options, data_options,
                    compile_options)
    build.add_argument("--float", dest="float_ids", default="none", metavar="ID[,ID...]",
                       help="conv ids that stay float; 'none' = all int8, 'all' = all float (default: none)")
    build.add_argument("--bf16", dest="bf16_ids", default="none", metavar="ID[,ID...]",
                       help="conv ids that run bf16 (on a CPU with AVX512-BF16 or AMX-BF16, through oneDNN), taken "
                            "out of int8 whatever --float says; 'all' = every int8-capable conv (default: none)")
    build.add_argument("--out", type=Path, default=None,
                       help="directory for model.so, plan.json and the QDQ model (required)")
    build.add_argument("--dump-ir", type=Path, metavar="DIR", help="write the IR after every pass into DIR")
    build.add_argument("--check", action="store_true",
                       help="run the library on real inputs against ONNX Runtime on the same QDQ model")
    build.add_argument("--check-batches", type=int, default=8,
                       help="batches for --check, never ones used for calibration (default 8)")
    build.add_argument("--profile", action="store_true",
                       help="time every kernel: each conv's µs and GMAC/s in the table, and the time of oneDNN "
                            "convs, TIR convs and the other TIR kernels")

    command("doctor", "run first: build all-float, all-int8 (and all-bf16 where the CPU has it) untuned and say "
            "per layer how each built",
            model_options, data_options, compile_options)

    tune = command("tune", "tune every kernel a plan of the model can contain (once per model and CPU)",
                   model_options, data_options, compile_options)
    tune.add_argument("--trials", type=int, default=32,
                      help="MetaSchedule trials per distinct kernel (default 32); a re-run tops kernels up to it")
    tune.add_argument("--timeout", default=None, metavar="DURATION",
                      help="stop starting new kernels after this long, e.g. 90s, 30m, 2h (records are kept)")

    bench = command("bench", "latency of ORT float/int8 and TVM float/int8/plans, from one run",
                    model_options, data_options, compile_options, backend_options)
    bench.add_argument("--plan", action="append", default=[], metavar="ID[,ID...]",
                       help="float conv ids of an extra plan to measure, as build --float (repeatable)")
    bench.add_argument("--compare-conv-backends", action="store_true",
                       help="build every TVM row twice, float convs on TIR and on oneDNN, side by side")
    bench.add_argument("--repeats", type=int, default=100, help="timed runs per build (default 100)")
    bench.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20, each round)")
    bench.add_argument("--rounds", type=int, default=5,
                       help="time every row this many times in turn, --repeats split over them; a row's figure is "
                            "the median of its rounds (default 5: rows see the same machine drift)")
    bench.add_argument("--profile", action="store_true",
                       help="after the timing rounds, time every kernel of each TVM row once: per conv its backend, "
                            "µs and GMAC/s (the %d slowest printed, all in --json), and the time per part"
                            % PROFILE_SHOWN_CONVS)
    bench.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                       help="measure the TVM builds on a board through this TVM RPC tracker")
    bench.add_argument("--rpc-key", default=None, help="device key the board's RPC server registered")
    bench.add_argument("--target", default=None,
                       help="TVM target as JSON for the board, e.g. '{\"kind\":\"llvm\",\"mcpu\":\"cascadelake\"}' "
                            "(default: this CPU)")

    sensitivity = command("sensitivity", "rank conv layers by the fidelity they cost as int8 and the latency they save",
                          model_options, data_options, compile_options, backend_options)
    sensitivity.add_argument("--metric", default=None,
                             help="ranking metric: top1, top5, cosine, sqnr_db, nmse, max_abs_error "
                                  "(default: top1 for a classifier output, else sqnr_db)")
    sensitivity.add_argument("--eval-batches", type=int, default=8, help="evaluation batches, disjoint from calibration")
    sensitivity.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                             help="also score each layer alone in bf16 (only_bf16.* columns): auto (default) where "
                                  "this CPU runs bf16 natively, on, off")
    sensitivity.add_argument("--no-latency", action="store_true",
                             help="skip the 1+N builds (TVM, or ORT sessions with --backend ort) that measure the "
                                  "latency each layer saves")

    search = command("search", "search which convs stay float: an Optuna study of latency against fidelity",
                     model_options, data_options, compile_options, backend_options)
    search.add_argument("--eval-batches", type=int, default=None,
                        help="fidelity batches, from other source images than calibration (default: 256 samples for "
                             "top1/top5, whose 95%% interval is then about +-1%% near 0.99; else 32)")
    search.add_argument("--check-batches", type=int, default=1,
                        help="evaluation batches each trial's library is cross-checked on against ORT (default 1)")
    search.add_argument("--metric", default=None,
                        help="fidelity objective: top1, top5, cosine, sqnr_db, nmse, max_abs_error "
                             "(default: top1 for a classifier output, else sqnr_db)")
    search.add_argument("--max-drop", type=float, default=None,
                        help="allowed fidelity drop relative to float (top1/top5/cosine), e.g. 0.01; a constraint")
    search.add_argument("--goal", type=float, default=None,
                        help="least acceptable metric value (greatest for nmse/max_abs_error); a constraint")
    search.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="whether each conv may also run bf16 (int8 / bf16 / float per conv): auto (default) "
                             "where this CPU runs bf16 natively (AVX512-BF16 or AMX-BF16) and --backend is tvm, "
                             "stored with a new study; on (an error elsewhere); off")
    search.add_argument("--no-guided", dest="guided", action="store_false",
                        help="do not queue the guided estimate's plans between the sampler's (default: every other "
                             "trial after the seeds is the estimate's next plan)")
    search.add_argument("--goal-on", choices=["value", "lower-bound"], default="value",
                        help="hold --max-drop/--goal against the metric (default) or, for top1/top5, the lower "
                             "bound of its 95%% interval")
    search.add_argument("--trials", type=int, default=None,
                        help="distinct plans to evaluate (default: every plan when the space is <= 1024, else 200)")
    search.add_argument("--timeout", default=None, metavar="DURATION",
                        help="stop starting new trials after this long, e.g. 90s, 30m, 8h; with --tune auto, "
                             "tuning and searching share it")
    search.add_argument("--tune", choices=["auto", "off"], default="auto",
                        help="auto (default): with --timeout, the first front comes from untuned kernels (a quarter "
                             "of the time, at most 20 min), then tuning rounds (heaviest kernels first) alternate "
                             "with searching and the front is measured again after each; off: use only what "
                             "'precsearch tune' left in --workdir")
    search.add_argument("--storage", default=None,
                        help="Optuna storage URL (default sqlite:///WORKDIR/study.db); postgresql://... for many "
                             "machines (also read from $PRECSEARCH_STORAGE)")
    search.add_argument("--study", default=None, help="study name (default: precsearch-<model>-<metric>)")
    search.add_argument("--sampler", default=None,
                        help="tpe, nsga2, gp, random or exhaustive (default: exhaustive up to 1024 plans, else gp "
                             "between the guided proposals where PyTorch is installed, else tpe)")
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
    export.add_argument("--backend", choices=["tvm", "ort"], default=None,
                        help="the trial's runtime (optional: the trial records it; a mismatch is an error)")
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


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
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


def check_required(args) -> None:
    from precsearch.errors import ConfigError

    names = list(_REQUIRED.get(args.command, ()))
    if args.command in _MODEL_COMMANDS and "model" not in names:
        names.insert(0, "model")
    missing = [name for name in names if getattr(args, name, None) is None]
    if missing:
        flags = ", ".join(name if name == "model" else f"--{name.replace('_', '-')}" for name in missing)
        raise ConfigError(f"'precsearch {args.command}' needs {flags} (on the command line or in --config).")
