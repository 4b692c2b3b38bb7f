"""The exception hierarchy of precsearch.

Every error inherits a built-in as well, so callers may catch ``ValueError`` or
``RuntimeError`` without knowing precsearch.  Messages are one line and name the
parameter, layer or pass involved and the offending value.
"""

from __future__ import annotations

import re

import numpy as np

# SQLAlchemy prefixes a driver's message with the driver's class, "(sqlite3.OperationalError) ...":
# the class tells a user nothing the message does not.
_WRAPPER_PREFIX = re.compile(r"^\([\w.]+\) ")


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message, or its type name when it has none (for one-line errors).

    ``with_type`` puts the exception's type first (``"CompileError: ..."``), as a failed trial records it.
    TVM errors, whose informative line is the last one, go through
    :func:`precsearch.tvm.tvm_error_line` instead.
    """
    text = str(exc).strip()
    line = _WRAPPER_PREFIX.sub("", text.splitlines()[0]).strip() if text else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if with_type else line


def check_int(value, name: str, owner: str, minimum: int, *, allow_none: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int ``>= minimum`` (or None when allowed); bools are not ints."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ConfigError(f"The {name!r} parameter of {owner} must be an int >= {minimum}{extra}; got {value!r} instead.")


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
