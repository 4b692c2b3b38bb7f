"""How a conv layer is recognised in the IR: the names precsearch gives, and reading them back.

ONNX node names do not survive import, so identity is carried by names and one
attribute that precsearch itself sets:

- the weight parameter of layer ``i`` is called ``ps_w<i>`` (set before import);
- the conv kernel of layer ``i`` is a prim func ``ps_conv_L<i>_<int8|float>_<layout>``
  with the attribute ``precsearch.layer = i`` (set at legalization);
- bindings the integer rewrite emits for layer ``i`` are ``L<i>_<what>``.

Read identity from the attribute where a prim func is at hand
(:func:`layer_of_func`); a name is parsed (:func:`layer_in_text`) only where a
name is all there is: TVM error text, and kernels after FuseTIR, which drops the
attributes of the functions it fuses (checked on 0.27) but builds the fused
kernel's name from theirs.
"""

from __future__ import annotations

import re

LAYER_ATTR = "precsearch.layer"
WEIGHT_PREFIX = "ps_w"
CONV_KERNEL_PREFIX = "ps_conv_"

_WEIGHT_NAME = re.compile(rf"^{WEIGHT_PREFIX}(\d+)$")
# The three name forms above, wherever they occur in a longer text: a fused kernel
# "fused_ps_conv_L3_int8_NCHW16c_add2", a binding "L3_acc_bias", a parameter "ps_w3".
_LAYER_IN_TEXT = re.compile(rf"{CONV_KERNEL_PREFIX}L(\d+)_|\bL(\d+)_[a-z]|\b{WEIGHT_PREFIX}(\d+)\b")


def weight_name(index: int) -> str:
    """The Relax parameter name of layer ``index``'s conv weight."""
    return f"{WEIGHT_PREFIX}{index}"


def layer_of_weight(name: str) -> int | None:
    """The layer index of a weight parameter named by :func:`weight_name`, or None."""
    match = _WEIGHT_NAME.match(name)
    return int(match.group(1)) if match else None


def binding_name(index: int, what: str) -> str:
    """A Relax binding emitted for layer ``index``: TVM's error messages print these names."""
    return f"L{index}_{what}"


def conv_kernel_name(index: int, precision: str, layout: str) -> str:
    """The prim func name of layer ``index``'s conv (``precision`` is "int8", "float", or "bf16" for a oneDNN one)."""
    return f"{CONV_KERNEL_PREFIX}L{index}_{precision}_{layout}"


def repack_kernel_name(index: int) -> str:
    """The prim func that repacks layer ``index``'s int8 weights (folded away at build time)."""
    return f"ps_repack_L{index}"


def kernel_attrs(index: int) -> dict:
    """The prim func attributes that mark a conv kernel as layer ``index``."""
    return {LAYER_ATTR: index}


def layer_of_func(func) -> int | None:
    """The ``precsearch.layer`` attribute of a prim func, or None (not a conv kernel, or fused)."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or LAYER_ATTR not in attrs:
        return None
    return int(attrs[LAYER_ATTR])


def kernel_layer(name: str, func=None) -> int | None:
    """The conv layer a kernel computes: its attribute, else (fused kernels) its name."""
    index = layer_of_func(func) if func is not None else None
    if index is not None:
        return index
    return _conv_in_name(name)


def _conv_in_name(name: str) -> int | None:
    for match in _LAYER_IN_TEXT.finditer(name):
        if match.group(1) is not None:
            return int(match.group(1))
    return None


def layer_in_text(text: str, layer_ids=None) -> int | None:
    """The first layer index named in ``text`` (a kernel, binding or weight name), or None.

    With ``layer_ids``, an index the model does not have is None as well.
    """
    for match in _LAYER_IN_TEXT.finditer(text):
        index = int(next(group for group in match.groups() if group is not None))
        if layer_ids is None or index < len(layer_ids):
            return index
    return None


# A conv kernel's whole name, possibly fused: layer, precision and layout in one match.
_CONV_KERNEL = re.compile(rf"{CONV_KERNEL_PREFIX}L(\d+)_(int8|bf16|float)_(NCHW(?:\d+c)?|NHWC)")


def conv_kernel_parts(name: str) -> tuple[int, str, str] | None:
    """``(layer index, "int8" | "bf16" | "float", layout)`` of a (possibly fused) conv kernel's name, or None.

    For kernel names read after the build (profiles, timing tables), where no
    prim func attribute is left to read.
    """
    match = _CONV_KERNEL.search(name)
    return (int(match.group(1)), match.group(2), match.group(3)) if match else None
