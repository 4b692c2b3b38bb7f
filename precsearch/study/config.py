"""The settings of a search, validated once and stored with the study.

A :class:`SearchConfig` is everything a worker on another machine needs to
evaluate plans exactly as the first one did; it travels as JSON in the Optuna
study's user attributes (never with a storage password in it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from precsearch.errors import ConfigError, check_int
from precsearch.fidelity.early_stop import check_goal_on
from precsearch.model.plan import ORT_MODELS

SAMPLERS = ("tpe", "nsga2", "gp", "random", "exhaustive")
#: The exhaustive sampler is offered (and is the default) up to this many plans.
EXHAUSTIVE_MAX_PLANS = 1024
#: Metrics whose float value is a perfect 1.0, so a relative drop is meaningful.
DROP_METRICS = ("top1", "top5", "cosine")
#: What a search builds its plans with: TVM, ONNX Runtime (``quantize_static``), or both in one study.
SEARCH_BACKENDS = ("tvm", "ort", "both")

# These settings decide what a trial's numbers mean: a resumed study or a joining
# worker must use the same ones, or its trials would not be comparable.
OBJECTIVE_FIELDS = ("model", "input_shapes", "data", "preset", "calibration", "calibration_batches", "eval_batches",
                    "metric", "max_drop", "goal", "threads", "requant", "block_size", "float_layout", "warmup",
                    "repeats", "untuned", "check_batches", "backend", "conv_backend", "goal_on",
                    "onednn_int8", "bf16", "activation_layout", "ort_model")
#: What ``bf16`` may say: search bf16 convs where the CPU has them, always (an error elsewhere), never.
BF16_SETTINGS = ("auto", "on", "off")
#: The activation layouts a build may run in (precsearch.tvm.CompileOptions.activation_layout).
ACTIVATION_LAYOUTS = ("auto", "nhwc", "blocked")


@dataclass(frozen=True)
class SearchConfig:
    """One search: the model, how a plan is scored, the sampler and the budget.

    Parameters
    ----------
    model : str
        A packaged model name or an ONNX path.
    trials : int or None
        Distinct plans to evaluate (a plan the sampler proposes again is not
        built again and does not count); None: every plan for ``exhaustive``,
        else 200.
    timeout_s : float or None
        Stop starting new trials after this long (per worker).
    max_drop : float or None
        Allowed fidelity drop relative to float, a fraction of the float
        model's perfect score (``top1``, ``top5``, ``cosine``).
    goal : float or None
        The least acceptable metric value (greatest for ``nmse``,
        ``max_abs_error``), for any metric; exclusive with ``max_drop``.
    goal_on : str
        What ``max_drop``/``goal`` is held against: ``"value"`` (the metric
        itself, default) or ``"lower_bound"`` (the lower end of top-k
        agreement's 95 % interval, so a plan passes only when the evaluation
        set is large enough to show it does).
    guided : bool
        Queue the guided estimate's proposals between the sampler's trials
        (:mod:`precsearch.study.guided`); default True.
    eval_batches : int or None
        Fidelity batches; None: 256 samples for top-k agreement, else 32
        batches (resolved once the model and metric are known, see
        :func:`~precsearch.fidelity.metrics.default_eval_batches`).
    check_batches : int
        Evaluation batches on which every trial's build is cross-checked with
        ONNX Runtime on the same QDQ model, as ``build --check`` does; a
        compiler problem fails the trial.  Studies stored before this setting
        existed load with the default, 1.
    backend : str
        ``"tvm"`` (precsearch's TVM builds), ``"ort"`` (each plan is
        ``quantize_static`` with the plan's float convs in ``nodes_to_exclude``,
        timed and scored in an optimized ONNX Runtime session) or ``"both"``
        (the backend is one more parameter of the plan space).  Studies stored
        before this setting existed load as ``"tvm"``.
    ort_model : str
        The ONNX Runtime backend's model of a plan: ``"quantize_static"`` (default; its defaults with the plan's
        float convs in ``nodes_to_exclude``) or ``"conv-qdq"`` (precsearch's Conv-only QDQ model of the plan,
        the one the TVM backend compiles, run by ORT).  Studies stored before this setting existed load as
        ``"quantize_static"``.
    conv_backend : str
        Where a TVM build's float convs run: ``"tir"`` or ``"onednn"`` (see
        :class:`~precsearch.tvm.CompileOptions`; default ``"onednn"``).
    onednn_int8 : str
        ``"auto"`` (default: int8 convs on oneDNN where the CPU has VNNI), ``"on"`` or ``"off"``; studies
        stored before this setting existed load as ``"auto"``.
    tune : str
        ``"auto"`` (default): with ``timeout_s`` and TVM builds that may use the tuning database, tuning and
        searching share the time (:mod:`precsearch.jobs.shared_budget`); ``"off"``: the search only uses
        what ``precsearch tune`` left in the workdir.  Not an objective setting: a resumed study may change it.
    bf16 : str
        Whether each conv may also run bf16: ``"auto"`` (default: where the CPU runs bf16 natively and the
        backend is TVM; decided when the study is made and stored with it), ``"on"`` (an error where it
        cannot) or ``"off"``.  Studies stored before this setting existed load as ``"auto"`` and keep the
        int8/float space they were made with.
    """

    model: str
    input_shapes: dict = field(default_factory=dict)
    data: str = "samples"
    preset: str | None = None
    calibration: str = "minmax"
    calibration_batches: int = 8
    eval_batches: int | None = None
    metric: str | None = None
    max_drop: float | None = None
    goal: float | None = None
    sampler: str | None = None
    trials: int | None = None
    timeout_s: float | None = None
    seed: int = 0
    sensitivity_k: int = 4
    workers: int = 1
    threads: int = 2
    requant: str = "float64"
    block_size: int | None = None
    float_layout: str = "blocked"
    warmup: int = 10
    repeats: int = 50
    untuned: bool = False
    study_name: str | None = None
    heartbeat_interval_s: int = 15
    grace_period_s: int = 120
    max_retry: int = 2
    check_batches: int = 1
    backend: str = "tvm"
    ort_model: str = "quantize_static"
    conv_backend: str = "onednn"
    goal_on: str = "value"
    onednn_int8: str = "auto"
    guided: bool = True
    bf16: str = "auto"
    activation_layout: str = "auto"
    tune: str = "auto"

    def __post_init__(self):
        if self.eval_batches is not None:
            check_int(self.eval_batches, "eval_batches", "search", 1)
        check_goal_on(self.goal_on, self.metric, "search")
        for name, low in (("calibration_batches", 1), ("sensitivity_k", 0), ("workers", 1),
                          ("threads", 1), ("warmup", 0), ("repeats", 3), ("heartbeat_interval_s", 1),
                          ("grace_period_s", 1), ("max_retry", 0), ("seed", 0), ("check_batches", 1)):
            check_int(getattr(self, name), name, "search", low)
        check_int(self.trials, "trials", "search", 1, allow_none=True)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"The 'sampler' parameter of search must be one of {list(SAMPLERS)}; "
                              f"got {self.sampler!r} instead.")
        if self.timeout_s is not None and not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ConfigError(f"The 'timeout' parameter of search must be a positive duration; "
                              f"got {self.timeout_s!r} instead.")
        if self.max_drop is not None:
            if not (isinstance(self.max_drop, (int, float)) and 0 <= self.max_drop < 1):
                raise ConfigError(f"The 'max_drop' parameter of search must be a float in [0, 1); "
                                  f"got {self.max_drop!r} instead.")
            if self.goal is not None:
                raise ConfigError("The 'max_drop' and 'goal' parameters of search exclude each other; got both "
                                  f"({self.max_drop!r} and {self.goal!r}).")
            if self.metric is not None and self.metric not in DROP_METRICS:
                raise ConfigError(f"The 'max_drop' parameter of search applies to the metrics {list(DROP_METRICS)} "
                                  f"(a fraction of float's perfect 1.0); got metric {self.metric!r}, "
                                  "give --goal instead.")
        if self.goal is not None and not (isinstance(self.goal, (int, float)) and math.isfinite(self.goal)):
            raise ConfigError(f"The 'goal' parameter of search must be a finite number; got {self.goal!r} instead.")
        if self.backend not in SEARCH_BACKENDS:
            raise ConfigError(f"The 'backend' parameter of search must be one of {list(SEARCH_BACKENDS)}; "
                              f"got {self.backend!r} instead.")
        if self.ort_model not in ORT_MODELS:
            raise ConfigError(f"The 'ort_model' parameter of search must be one of {list(ORT_MODELS)}; "
                              f"got {self.ort_model!r} instead.")
        if self.requant not in ("float64", "float32"):
            raise ConfigError(f"The 'requant' parameter of search must be 'float64' or 'float32'; "
                              f"got {self.requant!r} instead.")
        if self.onednn_int8 not in ("auto", "on", "off"):
            raise ConfigError(f"The 'onednn_int8' parameter of search must be 'auto', 'on' or 'off'; "
                              f"got {self.onednn_int8!r} instead.")
        if self.activation_layout not in ACTIVATION_LAYOUTS:
            raise ConfigError(f"The 'activation_layout' parameter of search must be one of "
                              f"{', '.join(ACTIVATION_LAYOUTS)}; got {self.activation_layout!r} instead.")
        if self.tune not in ("auto", "off"):
            raise ConfigError(f"The 'tune' parameter of search must be 'auto' or 'off'; got {self.tune!r} instead.")
        if self.bf16 not in BF16_SETTINGS:
            raise ConfigError(f"The 'bf16' parameter of search must be 'auto', 'on' or 'off'; "
                              f"got {self.bf16!r} instead.")
        if self.conv_backend not in ("tir", "onednn"):
            raise ConfigError(f"The 'conv_backend' parameter of search must be 'tir' or 'onednn'; "
                              f"got {self.conv_backend!r} instead.")
        if self.float_layout not in ("blocked", "nchw"):
            raise ConfigError(f"The 'float_layout' parameter of search must be 'blocked' or 'nchw'; "
                              f"got {self.float_layout!r} instead.")
        if self.grace_period_s <= self.heartbeat_interval_s:
            raise ConfigError(f"The 'grace_period_s' parameter of search must exceed the heartbeat interval "
                              f"({self.heartbeat_interval_s} s); got {self.grace_period_s!r} instead.")

    def fidelity_goal(self, metric: str) -> float | None:
        """The least acceptable value of ``metric`` (None: unconstrained)."""
        if self.max_drop is not None:
            return 1.0 - self.max_drop
        return self.goal

    @property
    def shares_time_with_tuning(self) -> bool:
        """Whether tuning and searching share ``timeout_s`` (:mod:`precsearch.jobs.shared_budget`)."""
        return self.tune == "auto" and self.timeout_s is not None and self.backend != "ort" and not self.untuned

    @property
    def backends(self) -> tuple[str, ...]:
        """The runtimes this search builds plans for: ``("tvm",)``, ``("ort",)`` or ``("tvm", "ort")``."""
        return ("tvm", "ort") if self.backend == "both" else (self.backend,)

    def replace(self, **changes) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> SearchConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ConfigError(f"The stored search settings hold unknown keys {unknown}; "
                              "the study was made by another precsearch version.")
        # A study stored before activation_layout existed timed its plans blocked: resuming it asks for that.
        return cls(**{"activation_layout": "blocked", **payload})

    def differences(self, other: SearchConfig) -> list[str]:
        """The objective-defining settings that differ from ``other``'s, as ``name: mine != theirs``."""
        return [f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}" for name in OBJECTIVE_FIELDS
                if getattr(self, name) != getattr(other, name)]


def resolve_settings(model, config: SearchConfig) -> SearchConfig:
    """``config`` with the model's default metric and evaluation set size filled in, checked against the model.

    ``model`` is a :class:`~precsearch.model.LoadedModel`.  The metric must
    apply to its first output (top-k only for a classifier output); the
    evaluation set defaults to :func:`~precsearch.fidelity.metrics.default_eval_batches`.
    A search stores these concrete values with its study.
    """
    from precsearch.fidelity.metrics import default_eval_batches, default_metric, validate_metric
    from precsearch.model.data import batch_size_of

    shapes = model.output_shapes
    metric = validate_metric(config.metric, next(iter(shapes.values()))) if config.metric else default_metric(shapes)
    # replace() validates max_drop and goal_on against the resolved metric.
    return config.replace(metric=metric,
                          eval_batches=config.eval_batches or default_eval_batches(metric, batch_size_of(model)))
