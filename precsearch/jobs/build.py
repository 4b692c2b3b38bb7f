"""``build``: one plan built, exported (library, QDQ model, plan.json) and, when asked, checked against ONNX Runtime."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from precsearch.fidelity.crosscheck import check_build
from precsearch.files import atomic_write
from precsearch.measure import CpuLoad, CpuLock
from precsearch.model.plan import Plan
from precsearch.tvm import ONEDNN_REQUIREMENT, LoadedLibrary, profile_kernels
from precsearch.workspace import Workspace


def build_and_export(workspace: Workspace, plan: Plan, out_dir: str | Path, *, check: bool = False,
                     dump_ir_dir: str | Path | None = None, profile: bool = False,
                     status: Callable[[str], None] | None = None) -> dict:
    """Build ``plan``, write ``model.so``, ``model.qdq.onnx`` and ``plan.json`` to ``out_dir``; return plan.json's content.

    With ``check``, the library's outputs on the workspace's evaluation batches
    (not used for calibration) are compared with ONNX Runtime on the same QDQ
    model (the float model for an all-float plan); the verdict is in the
    returned dict (``divergence_verdict``, ``divergence_summary``, agreement figures).
    With ``profile``, every kernel is timed on the timing input: each conv row gets
    ``kernel_us`` and ``gmac_s``, and ``kernels`` sums the time by backend and kind.
    """
    say = status or (lambda message: None)
    model = workspace.model
    out_dir = Path(out_dir)
    int8_ids = plan.int8_ids(model)
    if int8_ids:
        batches = len(workspace.calibration_batches)  # a data source too small fails here, before any status line
        say(f"calibrating ({workspace.data.calibration}, {batches} batches of {workspace.data.data})...")
        workspace.prepare(reference=False, ort_int8=False)
    bf16_count = len(plan.bf16_ids)
    say(f"building {len(int8_ids)} int8 / {f'{bf16_count} bf16 / ' if bf16_count else ''}"
        f"{len(model.layers) - len(int8_ids) - bf16_count} float convs...")
    # The all-float plan builds the float model itself, as the search does.
    build = workspace.build(plan, dump_ir_dir=dump_ir_dir)
    built, tuned = build.built, workspace.database is not None
    library = built.export_library(out_dir / "model.so")
    qdq_path = out_dir / "model.qdq.onnx"
    atomic_write(qdq_path, build.qdq.SerializeToString())
    summary = {
        "model": str(model.source),
        "plan": plan.key(),
        "int8_layers": list(built.int8_layers),
        "float_layers": list(built.float_layers),
        "bf16_layers": list(built.bf16_layers),
        "library": str(library),
        "qdq_model": str(qdq_path),
        "target": built.target,
        "block_size": built.block_size,
        "activation_layout": built.activation_layout,
        "boundary_transforms": built.boundary_transforms,
        "build_time_s": round(built.build_time_s, 2),
        "tuned": tuned,
        "tuned_kernels": built.tuned_kernels,
        "total_kernels": built.total_kernels,
        "untuned_convs": list(built.untuned_convs) if tuned else [],
        "layers": layer_table(model, built, tuned=tuned),
        "operators": {"rewritten": [note.to_dict() for note in built.operator_notes],
                      "layouts": built.operator_layouts},
        "layout_fallback": built.layout_fallback,
        "conv_backend": workspace.options.conv_backend,
        "onednn_skipped": built.onednn_skipped,
        "inputs": {name: list(shape) for name, shape in model.input_shapes.items()},
        "outputs": list(built.output_names),
    }
    if profile:
        say("timing every kernel (20 runs)...")
        with CpuLock().exclusive():  # as every timing: never beside a search's builds on this machine
            load = CpuLoad()  # the lock keeps out precsearch only: say when another process was busy
            summary["kernels"] = profile_layers(model, built, workspace.timing_input, summary["layers"],
                                                threads=workspace.options.threads)
            summary["profile_others_busy_cores"] = round(load.others_busy_cores(), 2)
    if built.onednn_kernels or built.onednn_dense:
        summary["requires"] = ONEDNN_REQUIREMENT
    if dump_ir_dir:
        summary["dump_ir"] = {"dir": str(dump_ir_dir), "files": len(built.dump_files)}
    if check:
        against = "the same QDQ model" if int8_ids else "the float model"
        if plan.bf16_ids:
            against += " with the bf16 convs' inputs and weights rounded to bf16"
        check_batches = workspace.eval_batches
        say(f"checking against ONNX Runtime on {against}, {len(check_batches)} batches not used for calibration "
            "(an output off by more than one step is traced with a probe build)...")
        # The exported file, not the in-memory build: what the user deploys is what is checked.
        loaded = LoadedLibrary(library, built.input_names, built.output_names)
        candidate = [loaded.run(batch) for batch in check_batches]
        steps = workspace.steps if int8_ids else None
        checked = check_build(model, build.qdq, int8_ids, check_batches, candidate, steps, options=workspace.options,
                              bf16_ids=plan.bf16_ids)
        summary.update(checked.to_dict())
    atomic_write(out_dir / "plan.json", json.dumps(summary, indent=1))
    return summary


def layer_table(model, built, tuned: bool = False) -> list[dict]:
    """One row per conv of the model: dtype, layout, transforms around it, tuned or not, why it is float."""
    def kernel(row) -> str:
        if row.backend == "onednn":
            return built.onednn_kernels.get(row.id, "onednn")
        return "untuned" if not tuned or row.id in built.untuned_convs else "tuned"

    rows = {row.index: {**row.to_dict(), "kernel": kernel(row)} for row in built.rows}
    table = []
    for layer in model.layers:
        if layer.index in rows:
            table.append(rows[layer.index])
        else:  # not a conv2d in the graph (ConvTranspose): always float, never blocked
            table.append({"index": layer.index, "id": layer.id, "dtype": "float32", "layout": "NCHW",
                          "transforms_in": [], "transforms_out": [], "note": layer.reason, "kernel": "-",
                          "backend": "tir", "fused": ""})
    return table


def profile_layers(model, built, inputs: dict, layers: list[dict], *, threads: int) -> dict:
    """Time each kernel of ``built``; add ``kernel_us`` and ``gmac_s`` to the conv rows of ``layers``, in place.

    Returns the time per part (oneDNN convs, TIR convs, other TIR kernels), in µs per inference.  The
    figures come from the VM's per-call hook (a few µs of Python each): they rank kernels; the
    end-to-end latency is ``bench``'s.
    """
    macs = {layer.index: layer.macs for layer in model.layers}
    by_layer: dict[int, float] = {}
    parts = {"onednn_convs_us": 0.0, "tir_convs_us": 0.0, "other_kernels_us": 0.0}
    for entry in profile_kernels(built, inputs, threads=threads):
        if entry.layer_index is None:
            parts["other_kernels_us"] += entry.median_us
            continue
        by_layer[entry.layer_index] = by_layer.get(entry.layer_index, 0.0) + entry.median_us
        parts["onednn_convs_us" if entry.backend == "onednn" else "tir_convs_us"] += entry.median_us
    for row in layers:
        spent = by_layer.get(row["index"])
        if spent:
            row["kernel_us"] = round(spent, 1)
            # three significant digits: one decimal printed a tiny conv slowed by a busy machine as 0.0 GMAC/s
            row["gmac_s"] = float(f"{macs[row['index']] / spent / 1e3:.3g}")
    return {name: round(value, 1) for name, value in parts.items()}
