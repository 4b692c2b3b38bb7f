import dataclasses
import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import models
from precsearch.model import data as data_module
from precsearch.model.data import (
    CALIBRATION_SOURCES,
    PRESETS,
    DataSource,
    Preprocess,
    data_hash,
    image_batches,
    load_batches,
    preprocess,
    read_image,
    sample_images,
    sample_pool,
    split_batches,
)
from precsearch.errors import ConfigError, DataError
from precsearch.model import load_model, resolve_model


@pytest.fixture(scope="module")
def textcls():
    path, shapes, _ = resolve_model("mobilenetv3-textcls")
    return load_model(path, shapes)


def test_sample_images_are_fixed_rgb_uint8():
    images = sample_images()
    assert len(images) >= 8
    names = [name for name, _ in images]
    assert names[:4] == ["astronaut", "chelsea", "coffee", "rocket"] and "grace_hopper" in names and "china" in names
    assert len(set(names)) == len(names)
    assert names == [name for name, _ in sample_images()]
    for _, image in images:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    camera = dict(images)["camera"]
    assert np.array_equal(camera[:, :, 0], camera[:, :, 2])  # grey expanded to RGB


def test_textcls_preprocess_pads_right_with_zero_and_uses_bgr():
    spec = PRESETS["mobilenetv3-textcls"]
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, :, 0] = 255  # pure red
    out = preprocess(image, spec)
    assert out.shape == (3, 48, 192) and out.dtype == np.float32
    # A square image becomes 48 wide; the rest is the normalized value 0.
    assert np.all(out[:, :, 48:] == 0)
    np.testing.assert_allclose(out[2, :, :48], 1.0)  # red lands last in BGR: (1 - 0.5) / 0.5
    np.testing.assert_allclose(out[0, :, :48], -1.0)
    wide = preprocess(np.full((10, 1000, 3), 128, np.uint8), spec)
    np.testing.assert_allclose(wide, (128 / 255 - 0.5) / 0.5, atol=1e-6)  # capped at 192, no padding


def test_imagenet_preprocess_centre_crops_and_normalizes():
    spec = PRESETS["imagenet"]
    image = np.full((300, 400, 3), 128, np.uint8)
    out = preprocess(image, spec)
    assert out.shape == (3, 224, 224)
    expected = (128 / 255 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(out[:, 100, 100], expected, rtol=1e-5)
    # A left-half-black image: the centre crop of the resized 256-high image keeps both halves.
    image[:, :200] = 0
    out = preprocess(image, Preprocess(height=4, width=4, mean=(0, 0, 0), std=(1, 1, 1), crop_fraction=1.0))
    assert out[0, 0, 0] == 0 and out[0, 0, 3] == pytest.approx(128 / 255)
    with pytest.raises(DataError, match="H x W x 3"):
        preprocess(np.zeros((4, 4), np.uint8), spec)


def test_image_batches_shapes_determinism_and_offsets(textcls):
    batches = image_batches(textcls, "mobilenetv3-textcls", count=30)
    assert len(batches) == 30
    assert all(set(b) == {"x"} and b["x"].shape == (1, 3, 48, 192) and b["x"].dtype == np.float32 for b in batches)
    # 30 > 22 raw images: the extra ones are crops/mirrors/rescalings, still all distinct.
    assert len(sample_images()) == 22
    assert len({b["x"].tobytes() for b in batches}) == 30
    assert data_hash(batches) == data_hash(image_batches(textcls, "mobilenetv3-textcls", count=30))
    later = image_batches(textcls, "mobilenetv3-textcls", count=3, offset=27)
    assert data_hash(later) == data_hash(batches[27:30])
    other_seed = image_batches(textcls, "mobilenetv3-textcls", count=30, seed=1)
    assert data_hash(other_seed) != data_hash(batches)


def test_sample_pools_never_share_a_source_image(textcls, monkeypatch):
    names = [name for name, _ in sample_images()]
    calibration, evaluation = sample_pool("calibration"), sample_pool("evaluation")
    assert len(calibration) == CALIBRATION_SOURCES and not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == list(range(len(names)))
    assert sample_pool(None) == calibration + evaluation  # one seeded order, split
    assert sample_pool("calibration", seed=1) != calibration
    by_identity = {id(image): name for name, image in sample_images()}
    drawn = []
    real_variant = data_module._variant

    def recording(image, seed, index):
        drawn.append(by_identity[id(image)])
        return real_variant(image, seed, index)

    monkeypatch.setattr(data_module, "_variant", recording)
    cal, ev = split_batches(textcls, "samples", "mobilenetv3-textcls", calibration_count=40, evaluation_count=300)
    calibration_draws, evaluation_draws = drawn[:40 - CALIBRATION_SOURCES], drawn[40 - CALIBRATION_SOURCES:]
    assert set(calibration_draws) == {names[i] for i in calibration}
    assert set(evaluation_draws) == {names[i] for i in evaluation}  # crops of every evaluation image, of no other
    assert len(evaluation_draws) == 300 - len(evaluation)
    # The raw images come first, then distinct derived ones: 300 different inputs.
    assert len({b["x"].tobytes() for b in ev}) == 300
    assert not {b["x"].tobytes() for b in cal} & {b["x"].tobytes() for b in ev}
    with pytest.raises(ConfigError, match="'pool' parameter"):
        image_batches(textcls, None, 1, pool="test")


def test_default_preset_follows_the_input_size(textcls):
    (batch,) = image_batches(textcls, None, count=1)
    assert batch["x"].shape == (1, 3, 48, 192)
    (resized,) = image_batches(textcls, "imagenet", count=1)
    assert resized["x"].shape == (1, 3, 48, 192)


def test_non_image_models_get_seeded_noise(tmp_path):
    model = load_model(models.save(models.chain_model(), tmp_path, "chain"))  # 8 input channels
    a = image_batches(model, None, count=3, seed=4)
    assert a[0]["input"].shape == (1, 8, 16, 16) and a[0]["input"].dtype == np.float32
    assert abs(float(np.concatenate([b["input"] for b in a]).std()) - 1.0) < 0.1
    assert data_hash(a) == data_hash(image_batches(model, None, count=3, seed=4))
    assert data_hash(a[1:]) == data_hash(image_batches(model, None, count=2, offset=1, seed=4))
    assert data_hash(a) != data_hash(image_batches(model, None, count=3, seed=5))


def test_bad_arguments(textcls):
    with pytest.raises(ConfigError, match=r"The 'preset' parameter must be one of .* got 'nope' instead"):
        image_batches(textcls, "nope", count=1)
    with pytest.raises(ConfigError, match=r"The 'count' parameter"):
        image_batches(textcls, None, count=0)
    with pytest.raises(ConfigError, match=r"The 'offset' parameter"):
        image_batches(textcls, None, count=1, offset=-1)


def test_data_hash_sees_values_names_and_dtypes():
    a = [{"x": np.zeros((2, 2), np.float32)}]
    assert data_hash(a) == data_hash([{"x": np.zeros((2, 2), np.float32)}])
    assert data_hash(a) != data_hash([{"x": np.ones((2, 2), np.float32)}])
    assert data_hash(a) != data_hash([{"y": np.zeros((2, 2), np.float32)}])
    assert data_hash(a) != data_hash([{"x": np.zeros((2, 2), np.float64)}])
    assert data_hash(a) != data_hash([{"x": np.zeros((4,), np.float32)}])


# --------------------------------------------------------------------------- sources: folders, tensor files, split

def _nhwc_model(dtype=TensorProto.FLOAT, size: int = 16):
    """Input (1, size, size, 3) of ``dtype`` -> (Cast) -> Transpose to NCHW -> conv0 (3->4)."""
    rng = np.random.default_rng(0)
    nodes, x = [], "input"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["cast.out"], name="cast", to=TensorProto.FLOAT))
        x = "cast.out"
    nodes.append(helper.make_node("Transpose", [x], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
    nodes.append(helper.make_node("Conv", ["nchw", "w"], ["output"], name="conv0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        nodes,
        "nhwc",
        [helper.make_tensor_value_info("input", dtype, [1, size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, size, size])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    return model


def _two_input_model():
    """Inputs a, b (1, 3, 8, 8) -> Add -> conv0 (3->4)."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"], name="add"),
            helper.make_node("Conv", ["sum", "w"], ["output"], name="conv0", kernel_shape=[1, 1]),
        ],
        "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in ("a", "b")],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Small models: 'rgb' (1,3,16,16), 'nhwc', 'nhwc_u8', 'two', 'batch2' (2,3,8,8), 'chain' (8 channels)."""
    d = tmp_path_factory.mktemp("models")
    return {
        "rgb": load_model(models.save(models.kinds_model(), d, "kinds")),
        "nhwc": load_model(models.save(_nhwc_model(), d, "nhwc")),
        "nhwc_u8": load_model(models.save(_nhwc_model(TensorProto.UINT8), d, "nhwc_u8")),
        "two": load_model(models.save(_two_input_model(), d, "two")),
        "batch2": load_model(models.save(models.dynamic_input_model(), d, "dyn"), {"input": (2, 3, 8, 8)}),
        "chain": load_model(models.save(models.chain_model(), d, "chain")),
    }


def _write_images(folder, count: int, size=(20, 24), prefix: str = "img"):
    """``count`` RGB PNGs of distinct constant colours, named so that name order is index order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:02d}.png"
        Image.fromarray(np.full((*size, 3), (10 * i, 255 - 10 * i, 7 * i), np.uint8)).save(path)
        paths.append(path)
    return paths


def _one_line_error(exc_info, *fragments):
    text = str(exc_info.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_preprocess_layout_and_dtype_options():
    image = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    nchw = preprocess(image, PRESETS["imagenet"])
    nhwc = preprocess(image, Preprocess(**{**PRESETS["imagenet"].__dict__, "layout": "NHWC"}))
    np.testing.assert_array_equal(nhwc, nchw.transpose(1, 2, 0))
    raw = preprocess(np.full((224, 224, 3), 77, np.uint8), Preprocess(224, 224, (0.5,) * 3, (0.5,) * 3, dtype="uint8", crop_fraction=1.0))
    assert raw.dtype == np.uint8 and raw.shape == (3, 224, 224) and np.all(raw == 77)
    with pytest.raises(ConfigError, match=r"The 'layout' parameter of Preprocess must be one of \['NCHW', 'NHWC'\]; got 'CHW'"):
        Preprocess(4, 4, (0, 0, 0), (1, 1, 1), layout="CHW")


def test_image_folder_loads_in_name_order_with_mixed_modes(tiny, tmp_path):
    paths = _write_images(tmp_path / "imgs", 3)
    Image.fromarray(np.full((16, 16), 90, np.uint8), mode="L").save(tmp_path / "imgs" / "img03.png")
    Image.fromarray(np.full((16, 16, 2), 40, np.uint8), mode="LA").save(tmp_path / "imgs" / "img04.png")
    Image.fromarray(np.full((16, 16, 4), 200, np.uint8), mode="RGBA").save(tmp_path / "imgs" / "img05.PNG")
    Image.fromarray(np.full((16, 16, 3), 5, np.uint8)).save(tmp_path / "imgs" / "img06.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    batches = load_batches(tiny["rgb"], tmp_path / "imgs", seed=None)
    assert len(batches) == 7
    assert all(set(b) == {"input"} and b["input"].shape == (1, 3, 16, 16) and b["input"].dtype == np.float32 for b in batches)
    spec = dataclasses.replace(PRESETS["imagenet"], height=16, width=16)
    np.testing.assert_array_equal(batches[0]["input"][0], preprocess(read_image(paths[0]), spec))
    # Grey and grey+alpha replicate the grey level; RGBA drops its alpha.
    np.testing.assert_array_equal(read_image(tmp_path / "imgs" / "img04.png"), np.full((16, 16, 3), 40, np.uint8))
    np.testing.assert_array_equal(read_image(tmp_path / "imgs" / "img05.PNG"), np.full((16, 16, 3), 200, np.uint8))
    np.testing.assert_allclose(batches[3]["input"][0, :, 0, 0], (90 / 255 - np.array(spec.mean)) / np.array(spec.std), rtol=1e-5)


def test_recursive_folders(tiny, tmp_path):
    _write_images(tmp_path / "imgs", 2)
    _write_images(tmp_path / "imgs" / "sub", 3, prefix="deep")
    assert len(load_batches(tiny["rgb"], tmp_path / "imgs")) == 2
    assert len(load_batches(tiny["rgb"], tmp_path / "imgs", recursive=True)) == 5


def test_nhwc_and_uint8_inputs_follow_the_model(tiny, tmp_path):
    paths = _write_images(tmp_path / "imgs", 2, size=(16, 16))
    (nhwc,) = load_batches(tiny["nhwc"], tmp_path / "imgs", count=1, seed=None)
    (nchw,) = load_batches(tiny["rgb"], tmp_path / "imgs", count=1, seed=None)
    assert nhwc["input"].shape == (1, 16, 16, 3) and nhwc["input"].dtype == np.float32
    np.testing.assert_array_equal(nhwc["input"], nchw["input"].transpose(0, 2, 3, 1))
    (raw,) = load_batches(tiny["nhwc_u8"], tmp_path / "imgs", count=1, seed=None)
    assert raw["input"].dtype == np.uint8 and raw["input"].shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(raw["input"][0], read_image(paths[0]))  # constant colour: resizing keeps it
    assert image_batches(tiny["nhwc_u8"], None, count=1)[0]["input"].dtype == np.uint8
    with pytest.raises(ConfigError, match="gives uint8 pixels but input 'input' takes float32"):
        load_batches(tiny["rgb"], tmp_path / "imgs", Preprocess(16, 16, (0, 0, 0), (1, 1, 1), dtype="uint8"))


def test_npy_round_trip_rechunking_and_single_item(tiny, tmp_path, caplog):
    data = np.random.default_rng(0).normal(size=(5, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    batches = load_batches(tiny["rgb"], tmp_path / "x.npy", seed=None)
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), data)
    np.save(tmp_path / "one.npy", data[0].astype(np.float64))  # one item without batch axis, cast to float32
    (one,) = load_batches(tiny["rgb"], tmp_path / "one.npy")
    assert one["input"].dtype == np.float32 and np.array_equal(one["input"][0], data[0])
    # Batch size 2: 5 rows make 2 batches, the last row is dropped with a log line.
    np.save(tmp_path / "small.npy", data[:, :, :8, :8])
    with caplog.at_level(logging.INFO, logger="precsearch.model.data"):
        pairs = load_batches(tiny["batch2"], tmp_path / "small.npy", seed=None)
    assert [b["input"].shape for b in pairs] == [(2, 3, 8, 8)] * 2
    np.testing.assert_array_equal(pairs[1]["input"], data[2:4, :, :8, :8])
    assert "5 items make 2 batches of 2; the last 1 items of the order are dropped" in caplog.text


def test_npz_per_input_and_single_array(tiny, tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 3, 8, 8)).astype(np.float32), rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "two.npz", b=b, a=a, labels=np.arange(3))
    batches = load_batches(tiny["two"], tmp_path / "two.npz", seed=None)
    assert len(batches) == 3 and set(batches[2]) == {"a", "b"}
    np.testing.assert_array_equal(batches[2]["a"][0], a[2])
    np.testing.assert_array_equal(batches[2]["b"][0], b[2])
    np.savez(tmp_path / "single.npz", whatever=a[:, :, :, :].repeat(2, axis=2).repeat(2, axis=3))
    assert len(load_batches(tiny["rgb"], tmp_path / "single.npz")) == 3


def test_split_is_disjoint_and_seeded(tiny, tmp_path):
    _write_images(tmp_path / "imgs", 10)
    calibration, evaluation = split_batches(tiny["rgb"], tmp_path / "imgs", calibration_count=4, evaluation_count=6)
    seen = [b["input"].tobytes() for b in calibration + evaluation]
    assert len(calibration) == 4 and len(evaluation) == 6 and len(set(seen)) == 10
    # Same seed, same sets; the default evaluation set is everything after calibration.
    again = split_batches(tiny["rgb"], tmp_path / "imgs", calibration_count=4)
    assert data_hash(again[0]) == data_hash(calibration) and data_hash(again[1]) == data_hash(evaluation)
    other = split_batches(tiny["rgb"], tmp_path / "imgs", calibration_count=4, seed=1)
    assert data_hash(other[0]) != data_hash(calibration)
    assert data_hash(load_batches(tiny["rgb"], tmp_path / "imgs", count=4)) == data_hash(calibration)
    with pytest.raises(DataError) as exc:
        split_batches(tiny["rgb"], tmp_path / "imgs", calibration_count=8, evaluation_count=8)
    _one_line_error(exc, str(tmp_path / "imgs"), "has 10 items (10 batches of 1)", "need 16 batches without overlap", "allow_overlap=True")
    calibration, evaluation = split_batches(tiny["rgb"], tmp_path / "imgs", calibration_count=8, evaluation_count=8, allow_overlap=True)
    shared = {b["input"].tobytes() for b in calibration} & {b["input"].tobytes() for b in evaluation}
    assert len(calibration) == len(evaluation) == 8 and len(shared) == 6
    with pytest.raises(DataError, match="even with overlap"):
        split_batches(tiny["rgb"], tmp_path / "imgs", calibration_count=11, evaluation_count=1, allow_overlap=True)
    # The endless sample stream: each set from its own pool of source images.
    cal, ev = split_batches(tiny["rgb"], "samples", calibration_count=2, evaluation_count=3)
    assert data_hash(cal) == data_hash(image_batches(tiny["rgb"], None, count=2, pool="calibration"))
    assert data_hash(ev) == data_hash(image_batches(tiny["rgb"], None, count=3, pool="evaluation"))
    assert data_hash(load_batches(tiny["rgb"], "samples", count=2)) == data_hash(cal)
    with pytest.raises(ConfigError, match="'evaluation_count' parameter of split_batches"):
        split_batches(tiny["rgb"], "samples", calibration_count=2)


def test_bad_folders_and_images(tiny, tmp_path):
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], tmp_path / "nope")
    _one_line_error(exc, f"The data source {str(tmp_path / 'nope')!r} does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], tmp_path / "empty")
    _one_line_error(exc, f"The image folder {str(tmp_path / 'empty')!r} holds no .jpg/.jpeg/.png file")
    bad = tmp_path / "bad"
    _write_images(bad, 1)
    (bad / "z_corrupt.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], bad, seed=None)
    _one_line_error(exc, f"Cannot read the image file {str(bad / 'z_corrupt.png')!r}")
    truncated = tmp_path / "truncated"
    _write_images(truncated, 1, size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated / "t.jpg")
    (truncated / "t.jpg").write_bytes((truncated / "t.jpg").read_bytes()[:300])
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], truncated, seed=None)
    _one_line_error(exc, f"Cannot read the image file {str(truncated / 't.jpg')!r}")
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.full((8, 8), 60000, np.uint16)).save(deep / "i16.png")
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], deep)
    _one_line_error(exc, str(deep / "i16.png"), "16-bit image (mode 'I;16')")
    with pytest.raises(DataError) as exc:
        load_batches(tiny["chain"], bad)
    _one_line_error(exc, f"The image folder {str(bad)!r} can only feed a model with one 3-channel image input", "(1, 8, 16, 16)", ".npy")
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], bad, count=5)
    _one_line_error(exc, "has 2 items (2 batches of 1); asked for 5 batches from batch 0")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match=r"must be a folder of .* or 'samples'; got a '.txt' file instead"):
        load_batches(tiny["rgb"], tmp_path / "x.txt")


def test_bad_tensor_files(tiny, tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], tmp_path / "shape.npy")
    _one_line_error(exc, str(tmp_path / "shape.npy"), "input 'input' shaped (N, 3, 16, 16) or (3, 16, 16); got (4, 3, 8, 8) instead")
    data = np.zeros((4, 3, 16, 16), np.float32)
    data[1, 0, 0, :2] = np.nan
    data[3, 2, 5, 5] = np.inf
    np.save(tmp_path / "nan.npy", data)
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], tmp_path / "nan.npy")
    _one_line_error(exc, str(tmp_path / "nan.npy"), "holds 3 NaN/Inf values of 3072 in input 'input'")
    np.savez(tmp_path / "missing.npz", a=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(DataError) as exc:
        load_batches(tiny["two"], tmp_path / "missing.npz")
    _one_line_error(exc, str(tmp_path / "missing.npz"), "lacks arrays for inputs ['b']; it holds ['a']")
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError) as exc:
        load_batches(tiny["rgb"], tmp_path / "corrupt.npy")
    _one_line_error(exc, f"Cannot read the tensor file {str(tmp_path / 'corrupt.npy')!r}")
    (tmp_path / "corrupt.npz").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="Cannot read the tensor file"):
        load_batches(tiny["rgb"], tmp_path / "corrupt.npz")
    np.save(tmp_path / "float.npy", np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(DataError, match="holds float32 values for input 'input', which takes uint8"):
        load_batches(tiny["nhwc_u8"], tmp_path / "float.npy")
    np.save(tmp_path / "two.npy", np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"holds one array but the model has 2 inputs \['a', 'b'\]"):
        load_batches(tiny["two"], tmp_path / "two.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match="holds no item"):
        load_batches(tiny["rgb"], tmp_path / "empty.npy")
    with pytest.raises(ConfigError, match="The 'count' parameter of load_batches"):
        load_batches(tiny["rgb"], "samples", count=0)


def test_data_source_parsing(tmp_path):
    assert DataSource.from_spec("samples") == DataSource("samples")
    (tmp_path / "d").mkdir()
    assert DataSource.from_spec(tmp_path / "d", recursive=True) == DataSource("folder", tmp_path / "d", True)
    with open(tmp_path / "a.NPY", "wb") as f:  # np.save would append ".npy"
        np.save(f, np.zeros(2))
    assert DataSource.from_spec(str(tmp_path / "a.NPY")).kind == "npy"
