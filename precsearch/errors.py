"""The exception hierarchy of precsearch.

Every error inherits a built-in as well, so callers may catch ``ValueError`` or
``RuntimeError`` without knowing precsearch.  Messages are one line and name the
parameter, layer or pass involved and the offending value.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none (for one-line errors)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PrecsearchError(Exception):
    """Base class of every error precsearch raises on purpose."""


class ConfigError(PrecsearchError, ValueError):
    """A setting or command-line value is invalid."""


class ModelError(PrecsearchError, ValueError):
    """The model file cannot be used (not ONNX, no conv layers, bad input shape...)."""


class PlanError(PrecsearchError, ValueError):
    """A plan names layers the model does not have, or layers that cannot run int8."""


class DataError(PrecsearchError, ValueError):
    """Input data cannot be used (unreadable, wrong shape, NaN...)."""


class CompileError(PrecsearchError, RuntimeError):
    """A TVM pass or build failed; names the pass and, when known, the layer."""

    def __init__(self, message: str, *, pass_name: str | None = None, layer_id: str | None = None):
        parts = []
        if pass_name:
            parts.append(f"pass {pass_name!r}")
        if layer_id:
            parts.append(f"layer {layer_id!r}")
        prefix = f"[{', '.join(parts)}] " if parts else ""
        super().__init__(prefix + message)
        self.pass_name = pass_name
        self.layer_id = layer_id


class VerificationError(CompileError):
    """The built graph does not hold the plan it was built for."""
