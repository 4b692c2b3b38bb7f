"""Triage a model before a search: does every plan build, and where does it leave the blocked layout?

A model owner runs ``precsearch doctor MODEL`` first.  It names the operators no
build can import, then builds the two extreme plans untuned (all-float, the
float model itself, and all-int8) and reports per conv whether it built blocked,
was kept in NCHW (and why), or the build failed (with the pass and the layer),
plus what precsearch rewrote and which operators ran outside the blocked layout.
One inference of each build is checked against ONNX Runtime.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from precsearch.errors import CompileError, first_line
from precsearch.model import LoadedModel

logger = logging.getLogger(__name__)

BLOCKED, NCHW, FAILED = "blocked", "nchw", "failed"


@dataclass
class PlanDiagnosis:
    """One extreme plan's build: per-layer outcomes, operator notes, and its check against ORT."""

    plan: str  # "all-float" or "all-int8"
    built: bool
    error: str = ""
    failed_pass: str | None = None
    failed_layer: str | None = None
    build_time_s: float = 0.0
    layers: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (outcome, layout or reason)
    operator_notes: list[dict] = field(default_factory=list)
    operator_layouts: list[dict] = field(default_factory=list)
    layout_fallback: str = ""
    boundary_transforms: int = 0
    check: str = ""  # a one-line comparison with ONNX Runtime
    check_ok: bool | None = None

    def to_dict(self) -> dict:
        return {"plan": self.plan, "built": self.built, "error": self.error, "failed_pass": self.failed_pass,
                "failed_layer": self.failed_layer, "build_time_s": round(self.build_time_s, 2),
                "layers": {k: {"outcome": v[0], "detail": v[1]} for k, v in self.layers.items()},
                "operator_notes": self.operator_notes, "operator_layouts": self.operator_layouts,
                "layout_fallback": self.layout_fallback, "boundary_transforms": self.boundary_transforms,
                "check": self.check, "check_ok": self.check_ok}


@dataclass
class Diagnosis:
    """What ``doctor`` found: unsupported operators and the two extreme builds."""

    model: str
    unsupported: list[tuple[str, str]]
    plans: list[PlanDiagnosis]

    @property
    def healthy(self) -> bool:
        return not self.unsupported and all(plan.built and plan.check_ok is not False for plan in self.plans)

    def to_dict(self) -> dict:
        return {"model": self.model, "healthy": self.healthy,
                "unsupported_operators": [{"node": n, "op_type": o} for n, o in self.unsupported],
                "plans": [plan.to_dict() for plan in self.plans]}


def _diagnose(name: str, workspace, plan) -> PlanDiagnosis:
    from precsearch.fidelity.crosscheck import COMPILER_PROBLEM, check_build

    model = workspace.model
    started = time.perf_counter()
    try:
        build = workspace.build(plan)
    except CompileError as exc:
        layers = {layer.id: (FAILED, exc.pass_name or "") for layer in model.layers}
        return PlanDiagnosis(name, False, error=first_line(exc), failed_pass=exc.pass_name,
                             failed_layer=exc.layer_id, build_time_s=time.perf_counter() - started, layers=layers)
    built, qdq, int8_ids = build.built, build.qdq, plan.int8_ids(model)
    rows = {row.id: row for row in built.rows}
    layers = {}
    for layer in model.layers:
        row = rows.get(layer.id)
        if row is None:  # ConvTranspose: never in the int8 graph, float in NCHW
            layers[layer.id] = (NCHW, layer.reason or "not a conv2d kernel")
        elif row.layout != "NCHW":
            layers[layer.id] = (BLOCKED, f"{row.dtype} {row.layout}")
        else:
            layers[layer.id] = (NCHW, f"{row.dtype}: {row.note or 'NCHW'}")
    diagnosis = PlanDiagnosis(name, True, build_time_s=built.build_time_s, layers=layers,
                              operator_notes=[note.to_dict() for note in built.operator_notes],
                              operator_layouts=built.operator_layouts, layout_fallback=built.layout_fallback,
                              boundary_transforms=built.boundary_transforms)
    check_batches = workspace.eval_batches
    candidate = [built.run(batch) for batch in check_batches]
    steps = workspace.steps if int8_ids else None
    checked = check_build(model, qdq, int8_ids, check_batches, candidate, steps, options=workspace.options,
                          bf16_ids=plan.bf16_ids)
    diagnosis.check_ok = checked.verdict != COMPILER_PROBLEM
    diagnosis.check = f"{checked.verdict}: {checked.summary}"
    if checked.agreement is not None:
        diagnosis.check += (f" ({checked.agreement.fraction:.4f} of outputs within one step of ONNX Runtime on the "
                            f"same QDQ model; ORT's own int8 kernels {checked.ort_int8_agreement.fraction:.4f})")
    return diagnosis


def diagnose(model: LoadedModel, preset: str | None, *, data="samples", options=None,
             calibration_batches: int = 2, check_batches: int = 1, progress=None) -> Diagnosis:
    """Name unimportable operators, then build and check the all-float and all-int8 plans untuned.

    Parameters
    ----------
    model : LoadedModel
    preset : str or None
        Preprocessing preset for the packaged sample inputs.
    data : str, default "samples"
        Calibration and check inputs, as ``build --data``.
    options : CompileOptions, optional
    calibration_batches, check_batches : int
        Small by default: the doctor answers "does it build", not "how accurate".
    progress : callable, optional
        Called with one status line per phase.
    """
    from precsearch.model.plan import Plan
    from precsearch.tvm import bf16_unsupported_reason, unsupported_operators
    from precsearch.workspace import DataSettings, Workspace

    say = progress or (lambda line: None)
    unsupported = unsupported_operators(model.proto)
    if unsupported:
        return Diagnosis(model.source, unsupported, [])
    workspace = Workspace(model, None, DataSettings(data=data, preset=preset, calibration_batches=calibration_batches,
                                                    eval_batches=check_batches), options)
    say(f"building all-float ({len(model.layers)} convs, untuned)...")
    plans = [_diagnose("all-float", workspace, Plan(frozenset(model.capable_ids())))]
    say(f"calibrating on {calibration_batches} batch(es), building all-int8 (untuned)...")
    plans.append(_diagnose("all-int8", workspace, Plan(frozenset())))
    if not bf16_unsupported_reason(workspace.options):  # the third state, where this CPU has it
        say("building all-bf16 (untuned)...")
        plans.append(_diagnose("all-bf16", workspace, Plan(frozenset()).with_bf16(model.capable_ids())))
    return Diagnosis(model.source, unsupported, plans)


def check_standard_plans(name: str, check_batches: int = 2, calibration_batches: int = 8, plans=None,
                         progress=None, options=None) -> list[dict]:
    """Build and check :func:`precsearch.model.plan.standard_plans` of one model, untuned; one dict per plan.

    Parameters
    ----------
    name : str
        A packaged model name or an ONNX path.
    check_batches, calibration_batches : int
        Packaged-image batches for the check and for calibration (disjoint).
    plans : collection of str, optional
        Only these plan names.
    progress : callable, optional
        Called with one line per plan.
    options : CompileOptions, optional
        How the plans are built (default: the default CompileOptions).
    """
    from precsearch.fidelity.crosscheck import check_build
    from precsearch.model import open_model
    from precsearch.model.plan import standard_plans
    from precsearch.workspace import DataSettings, Workspace

    model, preset = open_model(name)
    workspace = Workspace(model, None, DataSettings(data="samples", preset=preset,
                                                    calibration_batches=calibration_batches,
                                                    eval_batches=check_batches), options)
    workspace.prepare(reference=False, ort_int8=False)  # calibration is not part of any plan's build time
    check = workspace.eval_batches
    rows = []
    for plan_name, plan in standard_plans(model).items():
        if plans is not None and plan_name not in plans:
            continue
        int8_ids = plan.int8_ids(model)
        started = time.perf_counter()
        build = workspace.build(plan)
        built = build.built
        build_time_s = time.perf_counter() - started
        outputs = [built.run(batch) for batch in check]
        checked = check_build(model, build.qdq, int8_ids, check, outputs, workspace.steps)
        row = {
            "model": name, "plan": plan_name, "int8_convs": len(int8_ids),
            "float_convs": len(model.layers) - len(int8_ids), "build_time_s": round(build_time_s, 1),
            "boundary_transforms": built.boundary_transforms,
            "blocked_convs": sum(row.layout != "NCHW" for row in built.rows),
            "rewritten": "; ".join(f"{n.op_type} {n.node} {n.action}" for n in built.operator_notes),
            "nchw_fallback_ops": "; ".join(f"{r['op']}×{r['nchw_fallback']}" for r in built.operator_layouts
                                           if r["nchw_fallback"]),
            "layout_fallback": built.layout_fallback,
            "max_relative_error": checked.max_relative_error,
            "agreement": checked.agreement.fraction if checked.agreement else None,
            "ort_int8_agreement": checked.ort_int8_agreement.fraction if checked.ort_int8_agreement else None,
            "verdict": checked.verdict, "summary": checked.summary,
        }
        (progress or logger.info)(f"{name} {plan_name}: built in {build_time_s:.1f} s, {row['boundary_transforms']} transforms, "
                 f"{checked.verdict} ({checked.summary})")
        rows.append(row)
    return rows
