"""A plan: the precision of every int8-capable conv — int8, bf16 or float (float32).

The two-state plan is the set of convs that stay float; every other one runs
int8.  Where the target has bf16 a plan may run some of its float convs in
bf16 (activations and weights rounded to bfloat16, float32 sums): they are
float convs of the QDQ model, so ``float_ids`` holds them too and everything
that only asks "int8 or not" reads the plan as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from precsearch.errors import PlanError
from precsearch.model._load import LoadedModel, describe_ids

logger = logging.getLogger(__name__)

KEY_PREFIX = "float:"
BF16_PREFIX = ";bf16:"  # the key's bf16 part, after its float32 ids
INT8, BF16, FLOAT = "int8", "bf16", "float"
#: Each conv's choices in a search: int8 or float, or int8, bf16 or float where the CPU runs bf16.
TWO_STATES, THREE_STATES = (INT8, FLOAT), (INT8, BF16, FLOAT)
#: The runtimes a plan can be built for: TVM (precsearch's own build) and ONNX Runtime (``quantize_static``).
TVM, ORT = "tvm", "ort"
BACKENDS = (TVM, ORT)
#: What an ONNX Runtime plan's model is: ``quantize_static`` with its defaults and the plan's float convs excluded
#: (the user's int8 model made partial), or precsearch's Conv-only QDQ model (the one TVM builds), run by ORT.
QUANTIZE_STATIC, CONV_QDQ = "quantize_static", "conv-qdq"
ORT_MODELS = (QUANTIZE_STATIC, CONV_QDQ)


@dataclass(frozen=True)
class Plan:
    """The precisions of one build, as a value.

    ``float_ids`` are the layers the plan chose not to run int8; layers that
    cannot run int8 are float whatever the plan says (see
    :meth:`float_layer_ids`).  ``bf16_ids`` (a subset of ``float_ids``) are the
    ones among them that run bf16; the rest run float32.  Plans made by
    :func:`parse_plan` hold only int8-capable ids, so one build has one plan
    and one key.
    """

    float_ids: frozenset[str]
    backend: str = TVM  # the runtime that builds and runs it: "tvm" or "ort"
    bf16_ids: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "float_ids", frozenset(self.float_ids))
        object.__setattr__(self, "bf16_ids", frozenset(self.bf16_ids))
        if self.backend not in BACKENDS:
            raise PlanError(f"The 'backend' parameter of Plan must be one of {list(BACKENDS)}; "
                            f"got {self.backend!r} instead.")
        if not self.bf16_ids <= self.float_ids:
            raise PlanError(f"bf16 layers {sorted(self.bf16_ids - self.float_ids)} must be among the plan's "
                            "float layers (a bf16 conv is a float conv of the QDQ model)")
        if self.bf16_ids and self.backend != TVM:
            raise PlanError(f"bf16 convs are built by precsearch's TVM pipeline only; the {self.backend!r} "
                            f"plan cannot run {sorted(self.bf16_ids)} in bf16")

    def key(self) -> str:
        """Canonical string form: ``"float:"`` + the sorted float ids joined by ``","``.

        The all-int8 plan is ``"float:"``.  A plan for ONNX Runtime is prefixed
        with its backend (``"ort:float:conv1"``): the same float set on two
        runtimes is two plans.  TVM plans keep the bare form, so studies made
        before there was a second backend keep their keys.  Used as cache key,
        Optuna user attribute and report column.
        """
        bare = KEY_PREFIX + ",".join(sorted(self.float_ids - self.bf16_ids))
        if self.bf16_ids:
            bare += BF16_PREFIX + ",".join(sorted(self.bf16_ids))
        return bare if self.backend == TVM else f"{self.backend}:{bare}"

    def on(self, backend: str) -> Plan:
        """The same float layers on ``backend`` (which must be TVM if the plan has bf16 layers)."""
        return Plan(self.float_ids, backend, self.bf16_ids)

    def with_bf16(self, layer_ids) -> Plan:
        """This plan with ``layer_ids`` (int8-capable ids) run in bf16, whatever they were."""
        ids = frozenset(layer_ids)
        return Plan(self.float_ids | ids, self.backend, self.bf16_ids | ids)

    def precision(self, layer_id: str) -> str:
        """``"int8"``, ``"bf16"`` or ``"float"`` for an int8-capable layer (the others are float)."""
        return BF16 if layer_id in self.bf16_ids else FLOAT if layer_id in self.float_ids else INT8

    def int8_ids(self, model: LoadedModel) -> tuple[str, ...]:
        """Int8-capable layers not kept float, in layer order."""
        return tuple(i for i in model.capable_ids() if i not in self.float_ids)

    def float_layer_ids(self, model: LoadedModel) -> tuple[str, ...]:
        """Every layer that runs float (float32 or bf16): the plan's float ids and the incapable layers, in
        layer order."""
        return tuple(layer.id for layer in model.layers if layer.id in self.float_ids or not layer.int8_capable)

    def bf16_layer_ids(self, model: LoadedModel) -> tuple[str, ...]:
        """The layers that run bf16, in layer order."""
        return tuple(layer.id for layer in model.layers if layer.id in self.bf16_ids)

    def to_dict(self, model: LoadedModel) -> dict:
        """``{"int8_layers": [...], "float_layers": [...]}`` in layer order, and ``"bf16_layers"`` (a subset of
        the float ones) when there are any."""
        result = {"int8_layers": list(self.int8_ids(model)), "float_layers": list(self.float_layer_ids(model))}
        if self.bf16_ids:
            result["bf16_layers"] = list(self.bf16_layer_ids(model))
        return result


def parse_plan(spec: str, model: LoadedModel, bf16: str | None = None) -> Plan:
    """Parse a plan given on the command line or in a config file.

    Parameters
    ----------
    spec : str
        ``"none"`` (no layer kept float: all int8), ``"all"`` (every conv
        float), or comma-separated layer ids (whitespace around ids ignored).
        The key form ``"float:id,id"`` is accepted too (``"ort:float:id,id"``
        gives the ONNX Runtime plan, ``"float:id;bf16:id,id"`` a plan with bf16
        layers).
    model : LoadedModel
    bf16 : str, optional
        The layers that run bf16, in the same forms (``"none"``, ``"all"``:
        every int8-capable conv, or ids); they are taken out of int8 whatever
        ``spec`` says.

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
            return parse_plan(text[len(backend) + 1:], model, bf16).on(backend)
    plan = None
    if text.startswith(KEY_PREFIX):
        text = text[len(KEY_PREFIX):].strip()
        if BF16_PREFIX in text:
            text, bf16_text = text.split(BF16_PREFIX, 1)
            bf16_ids = _parse_ids(bf16_text, spec, model, "bf16") if bf16_text.strip() else frozenset()
            float_ids = _parse_ids(text, spec, model, "plan") if text.strip() else frozenset()
            plan = Plan(float_ids).with_bf16(bf16_ids)
        elif not text:
            plan = Plan(frozenset())
    if plan is None:
        plan = Plan(_parse_ids(text, spec, model, "plan"))
    if bf16 is not None:
        plan = plan.with_bf16(_parse_ids(str(bf16).strip(), bf16, model, "bf16"))
    return plan


def _parse_ids(text: str, spec: str, model: LoadedModel, parameter: str) -> frozenset[str]:
    """The int8-capable ids of ``"none"``, ``"all"`` or comma-separated ids."""
    if text == "none":
        return frozenset()
    if text == "all":
        return frozenset(model.capable_ids())
    items = [item.strip() for item in text.split(",")]
    if not text or any(not item for item in items):
        raise PlanError(
            f"The '{parameter}' parameter must be 'none', 'all' or comma-separated layer ids; got {spec!r} instead."
        )
    known = {layer.id for layer in model.layers}
    unknown = sorted(set(items) - known)
    if unknown:
        raise PlanError(f"unknown layer ids {unknown}; {describe_ids(model)}")
    capable = set(model.capable_ids())
    incapable = sorted(set(items) - capable)
    if incapable:
        logger.debug("plan names layers that are float anyway: %s", incapable)
    return frozenset(set(items) & capable)


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
