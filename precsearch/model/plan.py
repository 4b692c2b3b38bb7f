"""A plan: the set of conv layers that stay float; every other int8-capable conv runs int8."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from precsearch.errors import PlanError
from precsearch.model._load import LoadedModel, describe_ids

logger = logging.getLogger(__name__)

KEY_PREFIX = "float:"
#: The runtimes a plan can be built for: TVM (precsearch's own build) and ONNX Runtime (``quantize_static``).
TVM, ORT = "tvm", "ort"
BACKENDS = (TVM, ORT)


@dataclass(frozen=True)
class Plan:
    """The float layers of one build, as a value.

    ``float_ids`` are the layers the plan chose to keep float; layers that
    cannot run int8 are float whatever the plan says (see
    :meth:`float_layer_ids`).  Plans made by :func:`parse_plan` hold only
    int8-capable ids, so one build has one plan and one key.
    """

    float_ids: frozenset[str]
    backend: str = TVM  # the runtime that builds and runs it: "tvm" or "ort"

    def __post_init__(self):
        object.__setattr__(self, "float_ids", frozenset(self.float_ids))
        if self.backend not in BACKENDS:
            raise PlanError(f"The 'backend' parameter of Plan must be one of {list(BACKENDS)}; "
                            f"got {self.backend!r} instead.")

    def key(self) -> str:
        """Canonical string form: ``"float:"`` + the sorted float ids joined by ``","``.

        The all-int8 plan is ``"float:"``.  A plan for ONNX Runtime is prefixed
        with its backend (``"ort:float:conv1"``): the same float set on two
        runtimes is two plans.  TVM plans keep the bare form, so studies made
        before there was a second backend keep their keys.  Used as cache key,
        Optuna user attribute and report column.
        """
        bare = KEY_PREFIX + ",".join(sorted(self.float_ids))
        return bare if self.backend == TVM else f"{self.backend}:{bare}"

    def on(self, backend: str) -> Plan:
        """The same float layers on ``backend``."""
        return Plan(self.float_ids, backend)

    def int8_ids(self, model: LoadedModel) -> tuple[str, ...]:
        """Int8-capable layers not kept float, in layer order."""
        return tuple(i for i in model.capable_ids() if i not in self.float_ids)

    def float_layer_ids(self, model: LoadedModel) -> tuple[str, ...]:
        """Every layer that runs float: the plan's float ids and the incapable layers, in layer order."""
        return tuple(layer.id for layer in model.layers if layer.id in self.float_ids or not layer.int8_capable)

    def to_dict(self, model: LoadedModel) -> dict:
        """``{"int8_layers": [...], "float_layers": [...]}`` in layer order."""
        return {"int8_layers": list(self.int8_ids(model)), "float_layers": list(self.float_layer_ids(model))}


def parse_plan(spec: str, model: LoadedModel) -> Plan:
    """Parse a plan given on the command line or in a config file.

    Parameters
    ----------
    spec : str
        ``"none"`` (no layer kept float: all int8), ``"all"`` (every conv
        float), or comma-separated layer ids (whitespace around ids ignored).
        The key form ``"float:id,id"`` is accepted too (``"ort:float:id,id"``
        gives the ONNX Runtime plan).
    model : LoadedModel

    Returns
    -------
    Plan
        Holding only int8-capable ids (naming an incapable layer is allowed:
        it is float anyway).

    Raises
    ------
    PlanError
        Empty spec, empty item, or ids the model does not have.
    """
    text = str(spec).strip()
    for backend in BACKENDS:
        if backend != TVM and text.startswith(f"{backend}:{KEY_PREFIX}"):
            return parse_plan(text[len(backend) + 1:], model).on(backend)
    if text.startswith(KEY_PREFIX):
        text = text[len(KEY_PREFIX) :].strip()
        if not text:
            return Plan(frozenset())
    if text == "none":
        return Plan(frozenset())
    if text == "all":
        return Plan(frozenset(model.capable_ids()))
    items = [item.strip() for item in text.split(",")]
    if not text or any(not item for item in items):
        raise PlanError(
            f"The 'plan' parameter must be 'none', 'all' or comma-separated layer ids; got {spec!r} instead."
        )
    known = {layer.id for layer in model.layers}
    unknown = sorted(set(items) - known)
    if unknown:
        raise PlanError(f"unknown layer ids {unknown}; {describe_ids(model)}")
    capable = set(model.capable_ids())
    incapable = sorted(set(items) - capable)
    if incapable:
        logger.debug("plan names layers that are float anyway: %s", incapable)
    return Plan(frozenset(set(items) & capable))


def standard_plans(model: LoadedModel, seed: int = 0) -> dict[str, Plan]:
    """Five plans that together exercise every int8/float boundary a model can have.

    all-float, all-int8, alternating (every second int8-capable conv float),
    first+last float (the usual hand-made choice), and a random mix (each conv
    float with probability 1/2, drawn with ``seed``).  The zoo tests and
    ``experiments/zoo.py`` build each of them on every packaged model.
    """
    import numpy as np

    capable = model.capable_ids()
    rng = np.random.default_rng(seed)
    return {
        "all-float": Plan(frozenset(capable)),
        "all-int8": Plan(frozenset()),
        "alternating": Plan(frozenset(capable[1::2])),
        "first+last float": Plan(frozenset({capable[0], capable[-1]}) if capable else frozenset()),
        "random": Plan(frozenset(layer_id for layer_id in capable if rng.random() < 0.5)),
    }
