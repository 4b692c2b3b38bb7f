"""Layer identity in the IR: the names precsearch gives, and reading the layer back."""

import pytest
from tvm.script import tirx as T

from precsearch.tvm._naming import (binding_name, conv_kernel_name, kernel_attrs, kernel_layer, layer_in_text,
                                    layer_of_func, layer_of_weight, weight_name)


@T.prim_func
def _kernel(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
    for i in range(4):
        b[i] = a[i]


def test_names_round_trip():
    assert conv_kernel_name(3, "int8", "NCHW16c") == "ps_conv_L3_int8_NCHW16c"
    assert layer_of_weight(weight_name(12)) == 12
    assert layer_of_weight("ps_w12_extra") is None and layer_of_weight("conv.weight") is None
    assert layer_in_text(binding_name(7, "acc_bias")) == 7


def test_a_kernel_is_known_by_its_attribute_first():
    marked = _kernel.with_attrs(kernel_attrs(5))
    assert layer_of_func(marked) == 5 and layer_of_func(_kernel) is None
    assert kernel_layer("ps_conv_L2_int8_NCHW8c", marked) == 5  # the attribute wins over the name
    # FuseTIR drops the attribute: a fused kernel has its name only
    assert kernel_layer("fused_ps_conv_L2_int8_NCHW8c_add3_cast1", _kernel) == 2
    assert kernel_layer("fused_matmul_add7") is None
    assert kernel_layer("ps_repack_L4") is None  # the weight repack is not the conv


@pytest.mark.parametrize("text, expected", [
    ("Check failed: ... in fused_ps_conv_L3_float_NCHW8c_relu", 3),
    ("add(L2_acc, metadata[0]): shapes are not broadcastable", 2),
    ("the parameter ps_w4 has no value", 4),
    ("binding lv12 = R.add(lv3, lv4)", None),
    ("TL1_x and ps_w are not layer names", None),
])
def test_the_layer_named_in_an_error_text(text, expected):
    assert layer_in_text(text) == expected


def test_an_index_the_model_does_not_have_is_skipped():
    assert layer_in_text("L9_acc then L1_acc", ["conv0", "conv1"]) == 1
    assert layer_in_text("L9_acc", ["conv0"]) is None


def test_conv_kernel_parts_reads_fused_and_plain_kernel_names():
    from precsearch.tvm._naming import conv_kernel_name, conv_kernel_parts

    assert conv_kernel_parts(conv_kernel_name(7, "int8", "NCHW16c")) == (7, "int8", "NCHW16c")
    assert conv_kernel_parts("fused_ps_conv_L12_float_NCHW_add3_relu") == (12, "float", "NCHW")
    assert conv_kernel_parts("fused_ps_conv_L3_int8_NCHW8c1_add") == (3, "int8", "NCHW8c")
    assert conv_kernel_parts("fused_add_relu") is None and conv_kernel_parts("ps_repack_L2") is None
