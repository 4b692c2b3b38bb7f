"""One model prepared once: its data, calibration, reference, ORT int8 baseline and tuning database, and ``build(plan)``.

Every command and experiment that builds a plan goes through a
:class:`Workspace`, so "plan → QDQ model → TVM build" is written once: the
search's evaluator, ``build``, ``bench``, ``sensitivity``, ``tune``, ``export``,
``doctor`` and the experiments all build the same library for the same plan.
Everything is computed on first use and cached in ``<workdir>/cache``, so a
workspace for an all-float build never calibrates and a resumed search reuses
the calibration, the reference outputs and the ORT int8 model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import onnx

from precsearch.fidelity.metrics import default_eval_batches, default_metric
from precsearch.fidelity.reference import reference_outputs
from precsearch.model import LoadedModel
from precsearch.model.data import batch_size_of, load_batches, split_batches
from precsearch.model.quantize import CalibrationRanges, build_qdq_model, calibrate, output_steps, user_int8_model
from precsearch.model.plan import CONV_QDQ, QUANTIZE_STATIC, Plan
from precsearch.tvm import (ONEDNN_INT8_SETTINGS, BuiltPlan, CompileOptions, build_plan, database_stamp, fused_module,
                            open_database)

CACHE_DIR = "cache"


@dataclass(frozen=True)
class DataSettings:
    """Where the inputs come from, how many batches calibrate and evaluate, and how ONNX Runtime's plans are made."""

    data: str = "samples"
    preset: str | None = None
    calibration: str = "minmax"
    calibration_batches: int = 8
    eval_batches: int = 0  # 0: no evaluation set (a build or a benchmark needs none)
    ort_model: str = QUANTIZE_STATIC  # the ONNX Runtime backend's model of a plan (precsearch.model.plan.ORT_MODELS)


@dataclass(frozen=True)
class PlanBuild:
    """A plan's QDQ model (the float model when every conv is float) and its TVM build."""

    plan: Plan
    qdq: onnx.ModelProto
    built: BuiltPlan

    @property
    def int8_ids(self) -> tuple[str, ...]:
        return self.built.int8_layers


class Workspace:
    """A model with everything a plan's build, score and timing need, prepared once.

    Parameters
    ----------
    model : LoadedModel
    workdir : path or None
        Holds ``cache/`` (calibration, reference outputs, ORT int8 model) and
        ``tuning/``; None caches nothing and builds untuned (``doctor``, the zoo check).
    data : DataSettings
    options : CompileOptions
    untuned : bool
        Build without the tuning database even when ``workdir`` has one.
    """

    def __init__(self, model: LoadedModel, workdir: str | Path | None, data: DataSettings | None = None,
                 options: CompileOptions | None = None, *, untuned: bool = False):
        self.model = model
        self.workdir = Path(workdir) if workdir is not None else None
        self.data = data or DataSettings()
        self.options = options or CompileOptions()
        self.untuned = untuned or workdir is None
        # The opened tuning database and the stamp of its files when it was read (see ``database``).
        self._database, self._database_stamp = None, None

    @classmethod
    def from_config(cls, config, model: LoadedModel, workdir: str | Path, preset: str | None = None) -> Workspace:
        """The workspace of a search (:class:`~precsearch.study.config.SearchConfig`): what its trials build."""
        # A config straight from the user may leave the metric and the evaluation set size open (the search's
        # resolve_settings fills both in before it stores them).
        metric = config.metric or default_metric(model.output_shapes)
        eval_batches = config.eval_batches or default_eval_batches(metric, batch_size_of(model))
        data = DataSettings(data=config.data, preset=config.preset or preset, calibration=config.calibration,
                            calibration_batches=config.calibration_batches, eval_batches=eval_batches,
                            ort_model=config.ort_model)
        options = CompileOptions(block_size=config.block_size, float_blocked=config.float_layout == "blocked",
                                 threads=config.threads, requant_dtype=config.requant,
                                 conv_backend=config.conv_backend,
                                 onednn_int8=ONEDNN_INT8_SETTINGS[config.onednn_int8],
                                 activation_layout=config.activation_layout)
        return cls(model, workdir, data, options, untuned=config.untuned)

    @classmethod
    def in_memory(cls, model: LoadedModel, workdir: str | Path, calibration_batches, eval_batches=(),
                  options: CompileOptions | None = None, *, ranges: CalibrationRanges | None = None,
                  reference: list | None = None, untuned: bool = True) -> Workspace:
        """A workspace over batches already in memory (tests, experiments); ``ranges``/``reference`` when known."""
        calibration_batches, eval_batches = list(calibration_batches), list(eval_batches)
        data = DataSettings(data="<in memory>", calibration_batches=len(calibration_batches),
                            eval_batches=len(eval_batches))
        workspace = cls(model, workdir, data, options, untuned=untuned)
        # Filling the cached properties: these values are what they would compute.
        workspace.__dict__["_batches"] = (calibration_batches, eval_batches)
        if ranges is not None:
            workspace.__dict__["ranges"] = ranges
        if reference is not None:
            workspace.__dict__["reference"] = reference
        return workspace

    # ---- data

    @property
    def cache_dir(self) -> Path | None:
        return self.workdir / CACHE_DIR if self.workdir is not None else None

    @cached_property
    def _batches(self) -> tuple[list, list]:
        d = self.data
        if d.eval_batches:
            return split_batches(self.model, d.data, d.preset, d.calibration_batches, d.eval_batches)
        # The first batches of the same seeded order split_batches calibrates on: the same calibration either way.
        return load_batches(self.model, d.data, d.preset, count=d.calibration_batches), []

    @property
    def calibration_batches(self) -> list[dict]:
        return self._batches[0]

    @property
    def eval_batches(self) -> list[dict]:
        return self._batches[1]

    @property
    def timing_input(self) -> dict:
        """The batch every latency is measured on: the first evaluation batch, else the first calibration batch."""
        return (self.eval_batches or self.calibration_batches)[0]

    @cached_property
    def ranges(self) -> CalibrationRanges:
        return calibrate(self.model, self.calibration_batches, self.data.calibration, cache_dir=self.cache_dir)

    @cached_property
    def steps(self) -> dict:
        """One quantization step of every output (the cross-check's tolerance unit)."""
        return output_steps(self.model, self.ranges)

    @cached_property
    def reference(self) -> list:
        """ONNX Runtime float's outputs on the evaluation batches: what fidelity is measured against."""
        return reference_outputs(self.model, self.eval_batches, cache_dir=self.cache_dir)

    @cached_property
    def ort_int8_model(self) -> onnx.ModelProto:
        """The user's ORT int8 model (``quantize_static`` defaults, per channel): the int8 baseline."""
        return user_int8_model(self.model, self.calibration_batches, cache_dir=self.cache_dir)

    @property
    def database(self):
        """The tuning database of this CPU in the workdir (None when untuned or nothing was tuned there).

        Read again whenever its files changed since: a search that tunes between its phases, or another
        worker's tuning round, adds records that every later build of this process must apply.
        """
        if self.untuned:
            return None
        stamp = database_stamp(self.workdir, self.options)
        if stamp != self._database_stamp:
            self._database = open_database(self.workdir, self.options)
            self._database_stamp = stamp
        return self._database

    def prepare(self, *, reference: bool = True, ort_int8: bool = True, tvm: bool = True) -> Workspace:
        """Compute (or load from the cache) now what the first plan would: calibration, reference, ORT int8 model.

        A command calls it before its clock or progress display starts, so the
        first plan's time is not charged with the preparation.  ``tvm=False``
        (ONNX Runtime plans only) skips precsearch's own calibration and the
        tuning database.
        """
        wanted = ["ranges", "database"] * tvm + ["reference"] * reference + ["ort_int8_model"] * ort_int8
        for name in wanted:
            getattr(self, name)
        return self

    # ---- plans

    def qdq_model(self, plan: Plan) -> onnx.ModelProto:
        """The plan's mixed QDQ model; the float model itself when every conv is float (nothing to calibrate)."""
        return build_qdq_model(self.model, self.ranges, plan) if plan.int8_ids(self.model) else self.model.proto

    def ort_model(self, plan: Plan) -> onnx.ModelProto:
        """The plan as ONNX Runtime runs it: ``quantize_static`` with the plan's float convs in ``nodes_to_exclude``,
        or, with ``data.ort_model == "conv-qdq"``, the plan's Conv-only QDQ model (:meth:`qdq_model`).

        ``quantize_static``: defaults as :attr:`ort_int8_model` (QDQ, every op
        type ORT quantizes, per-channel weights) with this workspace's
        calibration method; ORT's tool decides what happens to the ops around an
        excluded conv.  The all-float plan is the float model itself; the
        all-int8 plan with MinMax calibration is :attr:`ort_int8_model`.  Cached
        in ``<workdir>/cache``.  ``conv-qdq`` exists because ORT runs that model
        faster than ``quantize_static``'s (EfficientNet-Lite0 all-int8: 0.65×
        ORT float against 1.26×; ``quantize_static`` limited to Conv is slower
        still, 1.97×, at 5 dB SQNR against 15).
        """
        if not plan.int8_ids(self.model):
            return self.model.proto
        if self.data.ort_model == CONV_QDQ:
            return self.qdq_model(plan)
        return user_int8_model(self.model, self.calibration_batches, nodes_to_exclude=plan.float_layer_ids(self.model),
                               calibration=self.data.calibration, cache_dir=self.cache_dir)

    def build(self, plan: Plan, *, dump_ir_dir: str | Path | None = None, options: CompileOptions | None = None,
              tuned: bool = True) -> PlanBuild:
        """Build ``plan`` with this workspace's options and tuning database."""
        qdq = self.qdq_model(plan)
        built = build_plan(self.model, qdq, plan, options=options or self.options,
                           dump_ir_dir=dump_ir_dir, database=self.database if tuned else None)
        return PlanBuild(plan=plan, qdq=qdq, built=built)

    def fused_module(self, plan: Plan):
        """The plan's module after fusion: the kernels tuning extracts."""
        return fused_module(self.model, self.qdq_model(plan), plan, options=self.options)
