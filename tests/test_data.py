import numpy as np
import pytest

import models
from precsearch.data import PRESETS, Preprocess, data_hash, image_batches, preprocess, sample_images
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
    batches = image_batches(textcls, "mobilenetv3-textcls", count=20)
    assert len(batches) == 20
    assert all(set(b) == {"x"} and b["x"].shape == (1, 3, 48, 192) and b["x"].dtype == np.float32 for b in batches)
    # 20 > 13 raw images: the extra ones are crops/mirrors, still all distinct.
    assert len({b["x"].tobytes() for b in batches}) == 20
    assert data_hash(batches) == data_hash(image_batches(textcls, "mobilenetv3-textcls", count=20))
    later = image_batches(textcls, "mobilenetv3-textcls", count=3, offset=17)
    assert data_hash(later) == data_hash(batches[17:20])
    other_seed = image_batches(textcls, "mobilenetv3-textcls", count=20, seed=1)
    assert data_hash(other_seed) != data_hash(batches)


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
