import pytest

import models
from precsearch.errors import PlanError
from precsearch.model import load_model
from precsearch.model.plan import Plan, parse_plan


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return load_model(models.save(models.chain_model(), tmp_path_factory.mktemp("m"), "chain"))


@pytest.fixture(scope="module")
def transpose(tmp_path_factory):
    return load_model(models.save(models.conv_transpose_model(), tmp_path_factory.mktemp("m"), "ct"))


def test_none_all_and_lists(chain):
    assert parse_plan("none", chain) == Plan(frozenset())
    assert parse_plan("all", chain).float_ids == {"conv0", "conv1", "conv2"}
    assert parse_plan(" conv2 , conv0 ", chain).float_ids == {"conv0", "conv2"}
    assert parse_plan("conv1,conv1", chain).float_ids == {"conv1"}


def test_key_is_canonical_and_parses_back(chain):
    plan = parse_plan("conv2,conv0", chain)
    assert plan.key() == "float:conv0,conv2"
    assert plan.key() == parse_plan("conv0, conv2", chain).key()
    assert Plan(frozenset()).key() == "float:"
    assert parse_plan(plan.key(), chain) == plan
    assert parse_plan("float:", chain) == Plan(frozenset())
    assert hash(plan) == hash(Plan(frozenset({"conv0", "conv2"})))


def test_layer_lists_in_layer_order(chain):
    plan = parse_plan("conv2,conv0", chain)
    assert plan.int8_ids(chain) == ("conv1",)
    assert plan.float_layer_ids(chain) == ("conv0", "conv2")
    assert plan.to_dict(chain) == {"int8_layers": ["conv1"], "float_layers": ["conv0", "conv2"]}


def test_incapable_layers_are_always_float(transpose):
    none = parse_plan("none", transpose)
    assert none.int8_ids(transpose) == ("conv0", "conv1")
    assert none.float_layer_ids(transpose) == ("deconv0",)
    # Naming an incapable layer is allowed and does not change the plan (one build, one key).
    assert parse_plan("deconv0", transpose) == none
    assert parse_plan("all", transpose).float_ids == {"conv0", "conv1"}
    assert parse_plan("all", transpose).float_layer_ids(transpose) == ("conv0", "deconv0", "conv1")


def test_unknown_ids_are_listed_with_the_known_range(chain):
    with pytest.raises(PlanError) as info:
        parse_plan("conv0,conv_99,zz", chain)
    assert str(info.value) == "unknown layer ids ['conv_99', 'zz']; the model has conv0, conv1, conv2 (3 conv layers)"


def test_unknown_ids_on_the_real_model():
    from precsearch.model import resolve_model

    path, shapes, _ = resolve_model("mobilenetv3-textcls")
    model = load_model(path, shapes)
    with pytest.raises(PlanError, match=r"^unknown layer ids \['conv_99'\]; the model has Conv@0 … Conv@52 \(53 conv layers\)$"):
        parse_plan("conv_99", model)


@pytest.mark.parametrize("spec", ["", "  ", "conv0,,conv1", "conv0,"])
def test_empty_items_are_rejected(chain, spec):
    with pytest.raises(PlanError, match=r"The 'plan' parameter must be 'none', 'all' or comma-separated layer ids; got"):
        parse_plan(spec, chain)


def test_bf16_layers_are_a_third_state_with_a_key_that_parses_back(chain):
    plan = parse_plan("conv0", chain, bf16="conv2")
    assert [plan.precision(i) for i in ("conv0", "conv1", "conv2")] == ["float", "int8", "bf16"]
    assert plan.key() == "float:conv0;bf16:conv2"
    assert parse_plan(plan.key(), chain) == plan
    assert plan.to_dict(chain) == {"int8_layers": ["conv1"], "float_layers": ["conv0", "conv2"],
                                   "bf16_layers": ["conv2"]}
    # bf16 takes a layer out of int8 whatever the float spec said; "all" is every int8-capable conv
    everything = parse_plan("none", chain, bf16="all")
    assert everything.key() == "float:;bf16:conv0,conv1,conv2" and everything.int8_ids(chain) == ()
    assert parse_plan(everything.key(), chain) == everything
    assert parse_plan("conv1", chain, bf16="conv1") == Plan(frozenset({"conv1"}), bf16_ids=frozenset({"conv1"}))
    # no bf16 layer: the key is the two-state key of every earlier study
    assert parse_plan("conv0", chain, bf16="none").key() == "float:conv0"
    assert parse_plan("float:conv0;bf16:", chain) == parse_plan("conv0", chain)


def test_bf16_layers_must_be_float_ones_on_tvm(chain):
    with pytest.raises(PlanError, match=r"bf16 layers \['conv1'\] must be among the plan's float layers"):
        Plan(frozenset({"conv0"}), bf16_ids=frozenset({"conv1"}))
    with pytest.raises(PlanError, match=r"^bf16 convs are built by precsearch's TVM pipeline only; the 'ort' plan"):
        parse_plan("ort:float:conv0;bf16:conv1", chain)
    with pytest.raises(PlanError, match=r"^unknown layer ids \['convX'\]"):
        parse_plan("none", chain, bf16="convX")
    with pytest.raises(PlanError, match=r"^The 'bf16' parameter must be 'none', 'all' or comma-separated layer ids"):
        parse_plan("none", chain, bf16="conv0,")
