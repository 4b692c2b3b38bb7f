"""What the commands print for a person: tables, progress lines, status lines on stderr."""

from __future__ import annotations

import json
import sys

from precsearch.fidelity.metrics import TIE_BREAK

# bench --profile prints this many of each build's convs, slowest first: the ones worth a look; --json has them all.
PROFILE_SHOWN_CONVS = 15


def print_operators(notes: list[dict], layouts: list[dict], fallback: str) -> None:
    if fallback:
        print(f"  every conv kept NCHW: the blocked graph failed: {fallback}")
    for note in notes:
        print(f"  {note['action']}: {note['op_type']} {note['node']!r}: {note['detail']}")
    fell_back = [row for row in layouts if row["nchw_fallback"]]
    if fell_back:
        print("  operators run in NCHW beside the convs' layout (layout transforms around them): "
              + ", ".join(f"{row['op']} ×{row['nchw_fallback']}" for row in fell_back))
    blocked = [row for row in layouts if row["blocked"]]
    if blocked:
        print("  operators run in the convs' layout: " + ", ".join(f"{row['op']} ×{row['blocked']}" for row in blocked))


def status(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def progress_line(progress) -> str:
    line = f"{progress.phase}: [{progress.done}/{progress.budget} plans] {progress.failed} failed, {progress.running} running; " \
           f"front {progress.front_size}"
    best = progress.fastest_feasible
    if best is not None:
        bf16 = f", {len(best.bf16_layers)} bf16" if best.bf16_layers else ""
        line += (f"; fastest feasible {best.latency_ms:.3f} ms ({progress.metric} {best.fidelity:.4g}, "
                 f"{len(best.float_layers) - len(best.bf16_layers)} float{bf16}, trial {best.trial})")
    line += f"; {progress.elapsed_s / 60:.1f} min elapsed"
    if progress.left_s is not None:
        line += f", ~{progress.left_s / 60:.1f} min left"
    return line


def print_search(summary, as_json: bool, handle) -> int:
    front = [{"trial": p.trial, "backend": p.backend, "latency_ms": p.latency_ms, summary.metric: p.fidelity,
              **({f"{summary.metric}_interval": list(p.interval(summary.metric))} if p.interval(summary.metric) else {}),
              **({tie: p.metrics[tie]} if (tie := TIE_BREAK.get(summary.metric)) in p.metrics else {}),
              "float_layers": list(p.float_layers), "bf16_layers": list(p.bf16_layers)} for p in summary.front]
    if as_json:
        print(json.dumps({"study": summary.study_name, "storage": summary.storage, "metric": summary.metric,
                          "budget": summary.budget, "completed": summary.completed, "failed": summary.failed,
                          "duplicates": summary.duplicates, "elapsed_s": round(summary.elapsed_s, 1),
                          "stopped_by": summary.stopped_by, "front": front}, indent=1))
        return 0
    for line in front_lines(summary, handle):
        print(line)
    return 0


def front_lines(summary, handle) -> list[str]:
    """The front as a table, with ONNX Runtime's baselines and the counts of the study."""
    from precsearch.study.record import StudyAttrs

    goal = handle.config.fidelity_goal(summary.metric)
    three = any(point.bf16_layers for point in summary.front)
    # the front timed again (after a tuning round, or at the end) with more runs: shown beside the search's figure
    again = StudyAttrs(handle.study).remeasured
    shown_again = any(point.trial in again for point in summary.front)
    lines = [f"{'trial':>5} {'backend':>7} {'latency ms':>10} " + (f"{'re-measured':>11} " if shown_again else "")
             + f"{summary.metric:>10} {'95% interval':>14} {'float':>5}  "
             + (f"{'bf16':>5}  float layers (bf16 ones marked *)" if three else "float layers")]
    for point in summary.front:
        bf16 = set(point.bf16_layers)
        layers = ",".join(f"{i}*" if i in bf16 else i for i in point.float_layers) or "-"
        interval = point.interval(summary.metric)
        shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "-"
        counts = f"{len(point.float_layers) - len(bf16):>5}  " + (f"{len(bf16):>5}  " if three else "")
        remeasured = f"{again[point.trial]['median_ms']:>11.3f} " if point.trial in again else f"{'-':>11} "
        lines.append(f"{point.trial:>5} {point.backend:>7} {point.latency_ms:>10.3f} {remeasured if shown_again else ''}"
                     f"{point.fidelity:>10.4g} "
                     f"{shown:>14} {counts}{layers if len(layers) <= 60 else layers[:57] + '...'}")
    baselines = StudyAttrs(handle.study).baselines or {}
    if "ort_float_ms" in baselines:
        int8_fidelity = baselines.get(f"ort_int8_{summary.metric}")
        lines.append(f"ONNX Runtime: float {baselines['ort_float_ms']:.3f} ms; int8 (quantize_static) "
                     f"{baselines['ort_int8_ms']:.3f} ms"
                     + (f", {summary.metric} {int8_fidelity:.4g}" if int8_fidelity is not None else ""))
    bound = "'s 95% lower bound" if handle.config.goal_on == "lower_bound" else ""
    constraint = f" with {summary.metric}{bound} >= {goal:g}" if goal is not None else ""
    lines.append(f"front: {len(summary.front)} plans{constraint}; {summary.completed} plans completed, "
                 f"{summary.failed} failed, {summary.duplicates} repeats served from storage; "
                 f"{summary.elapsed_s / 60:.1f} min (stopped by {summary.stopped_by}); study {summary.study_name!r} "
                 f"in {summary.storage}")
    return lines


def print_build(summary: dict) -> None:
    profiled = "kernels" in summary
    timing = f"{'µs':>8} {'GMAC/s':>7} " if profiled else ""
    print(f"{'id':<16} {'dtype':<8} {'layout':<8} {'backend':<7} {timing}{'kernel':<14} {'transforms in':<16} "
          f"{'transforms out':<16} note")
    for row in summary["layers"]:
        kernel = row["kernel"] + (f" ({row['fused']})" if row.get("fused") else "")
        timing = f"{row.get('kernel_us', '-'):>8} {row.get('gmac_s', '-'):>7} " if profiled else ""
        print(f"{row['id']:<16} {row['dtype']:<8} {row['layout']:<8} {row.get('backend', 'tir'):<7} {timing}"
              f"{kernel:<14} {', '.join(row['transforms_in']) or '-':<16} {', '.join(row['transforms_out']) or '-':<16} "
              f"{row['note']}")
    if profiled:
        print(_kernel_parts(summary["kernels"]) + " (per-call timing: for ranking; bench gives the latency)")
        from precsearch.measure import LOADED_CORES

        busy = summary.get("profile_others_busy_cores")
        if busy is not None and busy >= LOADED_CORES:
            print(f"warning: other processes kept {busy:.1f} of the machine's cores busy while profiling: each "
                  "2-thread kernel may have waited for a time slice; profile again on a quiet machine")
    bf16 = len(summary.get("bf16_layers", []))
    layout = "layout NHWC" if summary.get("activation_layout") == "NHWC" else f"block {summary['block_size']}"
    print(f"{len(summary['int8_layers'])} int8, {f'{bf16} bf16, ' if bf16 else ''}"
          f"{len(summary['float_layers']) - bf16} float convs; {layout}; "
          f"{summary['boundary_transforms']} activation layout transforms; built in {summary['build_time_s']} s ("
          f"{_tuning_state(summary)})")
    print_operators(summary["operators"]["rewritten"], summary["operators"]["layouts"], summary["layout_fallback"])
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


def print_bench_profiles(profiles: dict[str, dict]) -> None:
    """Per profiled TVM row of bench: its slowest convs (id, dtype, backend, µs, GMAC/s) and the time per part."""
    for name, profile in profiles.items():
        layers = sorted(profile["layers"], key=lambda row: -(row["kernel_us"] or 0.0))
        shown = layers[:PROFILE_SHOWN_CONVS]
        width = max(16, *(len(row["id"]) + 1 for row in shown))
        print()
        print(f"{name}: {'slowest ' if len(shown) < len(layers) else ''}{len(shown)} of {len(layers)} convs, "
              "slowest first")
        print(f"{'id':<{width}} {'dtype':<8} {'backend':<7} {'µs':>8} {'GMAC/s':>7}")
        for row in shown:
            print(f"{row['id']:<{width}} {row['dtype']:<8} {row['backend']:<7} {_or_dash(row['kernel_us']):>8} "
                  f"{_or_dash(row['gmac_s']):>7}")
        print(_kernel_parts(profile["kernels"]))
    if profiles:
        print("(per-call timing, 20 runs after the timing rounds: it ranks kernels; the table above gives the latency)")


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _kernel_parts(parts: dict) -> str:
    return (f"kernel time per inference: oneDNN convs {parts['onednn_convs_us']:.0f} µs, TIR convs "
            f"{parts['tir_convs_us']:.0f} µs, other TIR kernels {parts['other_kernels_us']:.0f} µs")


def _tuning_state(summary: dict) -> str:
    if not summary["tuned"]:
        return "untuned kernels: run precsearch tune once for fast ones"
    return f"{summary['tuned_kernels']} of {summary['total_kernels']} kernels tuned"
