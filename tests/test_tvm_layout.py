"""The layout decision per conv and the block size, table-driven: no model, no build."""

import pytest
from tvm import relax

from precsearch.model._load import ConvLayer
from precsearch.tvm._layout import LayerLayout, choose_block_size, decide_layouts, layout_callback


def conv(index, in_channels, out_channels, *, groups=1, kernel=(3, 3), op_type="Conv", size=8):
    """A conv layer of the inventory; MACs as the inventory counts them (batch 1, stride 1, same padding)."""
    macs = out_channels * (in_channels // groups) * kernel[0] * (kernel[1] if len(kernel) > 1 else 1) * size * size
    return ConvLayer(index=index, id=f"conv{index}", op_type=op_type, weight=f"conv{index}.weight", bias=None,
                     in_channels=in_channels, out_channels=out_channels, kernel=kernel, stride=(1,) * len(kernel),
                     dilation=(1,) * len(kernel), pads=(1,) * (2 * len(kernel)), groups=groups,
                     input_shape=(1, in_channels, size, size), output_shape=(1, out_channels, size, size),
                     macs=macs, int8_capable=op_type == "Conv", reason="")


BLOCKED_8 = LayerLayout("NCHW8c", "OIHW8i8o")


@pytest.mark.parametrize("layer, int8, expected", [
    (conv(0, 16, 32), True, BLOCKED_8),
    (conv(0, 16, 32), False, BLOCKED_8),
    (conv(0, 8, 8, kernel=(1, 1)), True, BLOCKED_8),
    (conv(0, 16, 16, groups=16), True, LayerLayout("NCHW8c", "OIHW1i8o")),  # depthwise
    (conv(0, 16, 16, groups=16), False, LayerLayout("NCHW8c", "OIHW1i8o")),
    (conv(0, 3, 16), True, LayerLayout("NCHW", "OIHW", "channels 3→16 not divisible by block 8")),
    (conv(0, 16, 20), False, LayerLayout("NCHW", "OIHW", "channels 16→20 not divisible by block 8")),
    (conv(0, 16, 16, groups=2), True, LayerLayout("NCHW", "OIHW", "grouped conv (groups=2) has no blocked kernel")),
    (conv(0, 16, 32, groups=16), False,  # channel multiplier 2 is not depthwise here
     LayerLayout("NCHW", "OIHW", "grouped conv (groups=16) has no blocked kernel")),
    (conv(0, 16, 16, kernel=(3,)), True, LayerLayout("NCHW", "OIHW", "only 2-D convs are blocked")),
])
def test_layout_of_one_conv_in_block_8(layer, int8, expected):
    decisions = decide_layouts([layer], {0} if int8 else set(), 8)
    assert decisions == {0: expected}
    assert decisions[0].blocked == (expected.data_layout != "NCHW")


@pytest.mark.parametrize("float_blocked, int8_blocked, expected_int8, expected_float", [
    (True, True, BLOCKED_8, BLOCKED_8),
    (False, True, BLOCKED_8, LayerLayout("NCHW", "OIHW", "float convs kept NCHW by option")),
    (True, False, LayerLayout("NCHW", "OIHW", "int8 convs kept NCHW by option"), BLOCKED_8),
    (False, False, LayerLayout("NCHW", "OIHW", "int8 convs kept NCHW by option"),
     LayerLayout("NCHW", "OIHW", "float convs kept NCHW by option")),
])
def test_options_keep_one_precision_nchw(float_blocked, int8_blocked, expected_int8, expected_float):
    layers = [conv(0, 16, 16), conv(1, 16, 16)]
    decisions = decide_layouts(layers, {0}, 8, float_blocked=float_blocked, int8_blocked=int8_blocked)
    assert decisions == {0: expected_int8, 1: expected_float}


def test_the_option_is_reported_before_a_shape_reason():
    decisions = decide_layouts([conv(0, 3, 16)], set(), 8, float_blocked=False)
    assert decisions[0].reason == "float convs kept NCHW by option"


def test_int8_needs_a_block_of_whole_vnni_lanes_float_and_depthwise_do_not():
    layers = [conv(0, 6, 6), conv(1, 6, 6), conv(2, 6, 6, groups=6)]
    decisions = decide_layouts(layers, {0, 2}, 2)  # block 2: not a multiple of the 4 int8 lanes
    assert decisions[0] == LayerLayout("NCHW", "OIHW", "block 2 is not a multiple of 4 int8 lanes")
    assert decisions[1] == LayerLayout("NCHW2c", "OIHW2i2o")
    assert decisions[2] == LayerLayout("NCHW2c", "OIHW1i2o")


def test_block_16_layouts_and_transposed_convs_get_no_decision():
    layers = [conv(0, 32, 16), conv(1, 16, 16, groups=16), conv(2, 16, 8, op_type="ConvTranspose")]
    decisions = decide_layouts(layers, {0, 1}, 16)
    assert decisions == {0: LayerLayout("NCHW16c", "OIHW16i16o"), 1: LayerLayout("NCHW16c", "OIHW1i16o")}


@pytest.mark.parametrize("channels, requested, expected", [
    ([(16, 32), (32, 32)], None, 16),  # both block everything: the tie goes to the larger block
    ([(16, 32), (32, 64), (8, 8)], None, 8),  # 8 blocks the 8→8 conv as well: more MACs blocked
    ([(3, 16), (16, 24), (24, 24)], None, 8),  # 24 channels divide by 8 only
    ([(3, 5), (5, 7)], None, 16),  # nothing blocks: the tie goes to the larger block
    ([(3, 16)], None, 16),  # 3 input channels block in neither
    ([(8, 8), (8, 8)], 16, 16),  # a requested block is used as given, even when it blocks nothing
    ([(16, 16)], 4, 4),
])
def test_block_size_is_the_one_that_blocks_the_most_macs(channels, requested, expected):
    layers = [conv(i, cin, cout) for i, (cin, cout) in enumerate(channels)]
    assert choose_block_size(layers, requested) == expected


def test_one_small_conv_only_block_8_can_run_makes_it_8():
    # Whatever divides by 16 divides by 8, so block 8 always blocks at least the MACs 16 does: a single
    # 8-channel depthwise conv with 0.1 % of the MACs decides.  Transposed convs are never blocked: not counted.
    layers = [conv(0, 64, 64, size=32), conv(1, 8, 8, groups=8), conv(2, 8, 16, op_type="ConvTranspose")]
    assert layers[1].macs / layers[0].macs < 1e-3
    assert choose_block_size(layers, None) == 8
    assert choose_block_size([layers[0], layers[2]], None) == 16


def _call(op, weight_name, weight_shape):
    data = relax.Var("x", relax.TensorType((1, 16, 8, 8), "float32"))
    weight = relax.Var(weight_name, relax.TensorType(weight_shape, "float32"))
    return op(data, weight)


def test_the_convert_layout_callback_answers_per_conv_by_its_weight():
    callback = layout_callback({0: LayerLayout("NCHW8c", "OIHW8i8o"), 1: LayerLayout("NCHW", "OIHW", "why")})
    nchw = {"relax.nn.conv2d": ["NCHW", "OIHW"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}
    assert callback(_call(relax.op.nn.conv2d, "ps_w0", (16, 16, 3, 3))) == {
        **nchw, "relax.nn.conv2d": ["NCHW8c", "OIHW8i8o"]}
    assert callback(_call(relax.op.nn.conv2d, "ps_w1", (16, 16, 3, 3))) == nchw
    assert callback(_call(relax.op.nn.conv2d, "ps_w7", (16, 16, 3, 3))) == nchw  # no decision: NCHW
    assert callback(_call(relax.op.nn.conv2d, "other", (16, 16, 3, 3))) == nchw  # not a layer's weight
    assert callback(_call(relax.op.nn.conv2d_transpose, "ps_w0", (16, 16, 3, 3))) == nchw
