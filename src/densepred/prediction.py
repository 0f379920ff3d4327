"""Prediction with a trained checkpoint: arrays in, label maps, overlays and figures out."""

from __future__ import annotations

import copy
import glob
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .backends import accelerate, probe_input, stream_models
from .build import build_dataset, normalization_for
from .checkpoint import Trained, load_released_trained, load_trained
from .config import EvalConfig
from .crf import CRFParams, crf_params, dense_crf_any_channels
from .data.files import IMAGE_SUFFIXES
from .data.io import read_image
from .data.labels import colorize
from .inference import forward_size, predict_logits
from .metrics import class_map
from .streams import streamed

__all__ = [
    "Predictor",
    "predict",
    "collect_inputs",
    "image_size_of",
    "predict_files",
    "PredictedFiles",
    "save_index_png",
    "overlay",
    "OVERLAY_FORMATS",
    "save_overlay",
    "predict_dataset_figures",
]


@dataclass
class Predictor:
    """Segment uint8 images (H, W, C) with a trained model: ``labels, probabilities = p(image)``.

    ``options``: how (inference mode, scales, flip, precision, the CRF); the checkpoint's own
    recipe's ``eval`` section unless given. ``image_size``: (H, W) of the images it will mostly
    see, if known: the backend is then chosen at the size of their forward passes.
    """

    trained: Trained
    device: torch.device = torch.device("cpu")
    options: EvalConfig = field(default_factory=EvalConfig)
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        o = self.options
        self.crf: CRFParams | None = crf_params(o.crf, o.crf_params) if o.crf else None
        # The forward passes run on the fastest backend that computes what eager does (backends).
        model = self.trained.model
        size = forward_size(model, self.image_size, o) if self.image_size else None
        self._example = probe_input(model, self.trained.in_channels, self.device, size)
        self.model, self.backend = accelerate(model, o.backend, self._example, o.amp)
        self._streams: dict[int, list[Predictor]] = {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "cpu",
        options: EvalConfig | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> Predictor:
        trained = load_trained(path, device)
        return cls(trained, torch.device(device), options or trained.experiment.eval, image_size)

    @classmethod
    def from_weights(
        cls,
        name: str,
        device: str = "cpu",
        options: EvalConfig | None = None,
        *,
        file: str | Path | None = None,
    ) -> Predictor:
        """A predictor for the released weights ``name`` (``"fcn8s.voc_caffe"``, see
        ``densepred weights list``): the entry's classes, palette and preprocessing, whole-image
        inference unless ``options`` say otherwise."""
        trained = load_released_trained(name, device, file=file)
        return cls(trained, torch.device(device), options or trained.experiment.eval)

    def logits(self, image: np.ndarray, options: EvalConfig | None = None) -> torch.Tensor:
        """Float logits ``(1, classes, H, W)`` of a uint8 image, with ``options`` or the predictor's."""
        if image.ndim == 2:
            image = image[..., None]
        channels = self.trained.in_channels
        if image.shape[-1] != channels:
            raise ValueError(f"the model takes {channels}-channel images, got shape {image.shape}")
        norm = normalization_for(self.trained.normalization, channels)
        x = norm(np.ascontiguousarray(image))[None].to(self.device)
        return predict_logits(self.model, x, options or self.options)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = self.logits(image)
        probs = torch.softmax(logits, 1)[0].cpu().numpy()
        if self.crf is not None:
            probs = dense_crf_any_channels(image, probs, self.crf)
            return probs.argmax(0).astype(np.uint8), probs
        return class_map(logits)[0].to(torch.uint8).cpu().numpy(), probs  # as labels(): ties never differ

    def in_streams(self, frames: int) -> list[Predictor]:
        """Predictors to segment ``frames`` images with, several at once: one per thread, each
        thread on an equal share of torch's threads (:mod:`densepred.streams`). ``options.streams`` of
        them, or the count measured to segment the most frames a second here (one, for most
        networks: see :func:`~densepred.backends.stream_models`); never more than ``frames``."""
        if frames not in self._streams:
            models = stream_models(self.model, self._example, self.options.streams, frames)
            # Every stream on a module of its own share of the threads: this predictor's own
            # module keeps all of them, and beside another stream would starve it (LR-ASPP on
            # ONNX Runtime: 36 ms a frame on its two threads, the other's one thread 60-75 ms).
            self._streams[frames] = [self] if models == [self.model] else [self._on(model) for model in models]
        return self._streams[frames]

    def _on(self, model: torch.nn.Module) -> Predictor:
        clone = copy.copy(self)
        clone.model = model
        return clone

    def labels(self, image: np.ndarray, options: EvalConfig | None = None) -> np.ndarray:
        """Class ids only: the logits' argmax, without keeping probabilities (unless the CRF needs them)."""
        if self.crf is not None:
            return self(image)[0]
        return class_map(self.logits(image, options))[0].to(torch.uint8).cpu().numpy()


def predict(
    checkpoint: str | Path,
    images: Sequence[np.ndarray | str | Path],
    *,
    options: EvalConfig | None = None,
    device: str = "cpu",
) -> list[np.ndarray]:
    """Label maps (uint8 class ids) for images given as arrays ``(H, W[, C])`` or files, with a
    training checkpoint and its recipe's inference options (or ``options``)."""
    size = None
    if images:  # the backend is chosen at the first image's size
        first = images[0]
        size = image_size_of(first) if isinstance(first, str | Path) else first.shape[:2]
    predictor = Predictor.from_checkpoint(checkpoint, device, options, size)
    channels = predictor.trained.in_channels
    return [
        predictor(read_image(image, channels=channels) if isinstance(image, str | Path) else image)[0]
        for image in images
    ]


def save_index_png(labels: np.ndarray, palette, path: str | Path | BinaryIO) -> Path | BinaryIO:
    """An 8-bit palette PNG: pixel values are class ids, viewers show the dataset's colours.
    ``path`` may be an open binary file (the web app writes into a buffer)."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for colour in palette for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))  # 256 entries keep the PNG at 8 bits per pixel
    img.save(path, format="PNG", compress_level=1)  # masks compress well at the fastest level too
    return path if hasattr(path, "write") else Path(path)


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """Colour labels blended over the image (gray images are shown in gray)."""
    rgb = np.repeat(image, 3, axis=-1) if image.ndim == 3 and image.shape[-1] == 1 else image
    rgb = np.stack([rgb] * 3, -1) if rgb.ndim == 2 else rgb
    # uint8 arithmetic in one pass (OpenCV), not a float64 copy of the frame per term.
    return cv2.addWeighted(np.ascontiguousarray(rgb, dtype=np.uint8), 1 - alpha, colorize(labels, palette), alpha, 0.0)


OVERLAY_FORMATS = ("jpg", "png", "none")  # predict's overlay file: JPEG (default), lossless PNG, or none


def save_overlay(image: np.ndarray, labels: np.ndarray, palette, path: str | Path) -> Path:
    """:func:`overlay` as an image file, its format by ``path``'s suffix.

    ``.jpg``/``.jpeg``: quality 90 with full-resolution colour (4:4:4, so class edges keep their
    colour), 0.9 ms and 48 KiB for a CamVid frame. ``.png``: lossless, by OpenCV with zlib level
    1, Huffman-only coding and every row Paeth-filtered, 4-10 ms and 230 KiB for the same frame
    (PIL's default level takes 56 ms; libpng's default of trying several filters per row, 2.5x
    the time for the same size). The overlay is a picture to look at; the mask beside it is the
    lossless result.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    elif suffix == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
        if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]
    else:
        raise ValueError(f"{path}: an overlay is written as .jpg, .jpeg or .png, not {path.suffix or 'no suffix'!r}")
    bgr = cv2.cvtColor(overlay(image, labels, palette), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the overlay as {suffix[1:].upper()}")
    path.write_bytes(encoded.tobytes())  # bytes, not cv2.imwrite: any path name works
    return path


def image_size_of(path: str | Path) -> tuple[int, int] | None:
    """(H, W) of an image file from its header alone, or None where it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError):
        return None


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from paths, folders (their images, sorted) and glob patterns; errors name the input.

    A ``Path`` is taken literally (a file or folder, never a pattern): collected inputs pass again unchanged.
    """
    found: list[Path] = []
    for item in inputs:
        if isinstance(item, str) and any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"the pattern {item!r} matches no file")
            found += matches
        elif Path(item).is_dir():
            images = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"the folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif Path(item).is_file():
            found.append(Path(item))
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return list(dict.fromkeys(found))  # keep order, drop repeats


class PredictedFiles(NamedTuple):
    written: list[Path]  # the masks written
    failed: list[tuple[Path, str]]  # inputs that could not be read, and why


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    probabilities: bool = False,
    progress: bool = True,
    fail_fast: bool = False,
    overlay: str = "jpg",
) -> PredictedFiles:
    """Segment every input image: ``NAME.png`` (class ids, palette PNG), ``NAME_overlay.jpg``
    (``overlay``: "jpg", "png" or "none"), and with ``probabilities`` one 8-bit map per class in
    ``NAME_probs/``.

    An input that cannot be read (damaged, not an image, the wrong channels) is reported in
    ``failed`` and the others are still segmented; ``fail_fast`` raises at the first instead.
    A failed write (a full disk) always stops: every later file would fail the same way.

    Several images at once where that is measured faster (:meth:`Predictor.in_streams`, the
    ``streams`` option): each read, segmented and written by a thread of its own on its share of
    the cores. Otherwise one at a time: decoding ahead and writing behind in helper threads was
    measured no faster (``python -m benchmarks.pipeline``, per frame of a folder), since the network
    already keeps every core busy, and a few percent slower on the large nets, whose thread pools
    wait for the slowest thread.
    """
    if overlay not in OVERLAY_FORMATS:
        raise ValueError(f"overlay must be one of {', '.join(OVERLAY_FORMATS)}, got {overlay!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = collect_inputs(inputs)
    written, failed = [], []

    def segment(one: Predictor, path: Path) -> Path | ValueError:
        return _segment_file(one, path, out, probabilities, overlay)

    with streamed(segment, predictor.in_streams(len(files)), files) as results:
        paired = zip(files, results, strict=True)
        for path, result in tqdm(paired, total=len(files), desc="predict", unit="img", disable=not progress):
            if isinstance(result, ValueError):
                if fail_fast:
                    raise result
                failed.append((path, str(result)))
            else:
                written.append(result)
    return PredictedFiles(written, failed)


def _segment_file(predictor: Predictor, path: Path, out: Path, probabilities: bool, overlay: str) -> Path | ValueError:
    """Writes ``path``'s mask (and overlay, probabilities) and returns the mask's path, or returns
    why ``path`` could not be segmented; a failed write raises."""
    trained = predictor.trained
    try:
        image = read_image(path, channels=trained.in_channels)
        # Probabilities (a softmax over the whole map) only where they are written or the CRF needs them.
        labels, probs = predictor(image) if probabilities else (predictor.labels(image), None)
    except ValueError as exc:  # DataError included: the file's own fault, named in the message
        return exc
    mask = save_index_png(labels, trained.palette, out / f"{path.stem}.png")
    if overlay != "none":
        save_overlay(image, labels, trained.palette, out / f"{path.stem}_overlay.{overlay}")
    if probs is not None:
        folder = out / f"{path.stem}_probs"
        folder.mkdir(exist_ok=True)
        maps = (probs * 255).round().astype(np.uint8)
        for c, name in enumerate(trained.class_names):
            # zlib level 1: a 360x480 map in 6 ms where the default level takes 18, for a file 16% larger
            Image.fromarray(maps[c]).save(folder / f"{c:02d}_{name}.png", compress_level=1)
    return mask


def predict_dataset_figures(run_dir: str | Path, count: int = 4) -> Path:
    """Predict the first ``count`` validation images of a run: index PNGs, overlays, one figure."""
    from .plots import plot_side_by_side

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        ckpt = sorted((run_dir / "checkpoints").glob("iter_*.pt"))[-1]
    predictor = Predictor.from_checkpoint(ckpt)
    trained = predictor.trained
    dataset = build_dataset(trained.experiment, trained.experiment.data.val_split, train=False)
    out = run_dir / "predictions"
    out.mkdir(exist_ok=True)
    rows = []
    for i in range(min(count, len(dataset))):
        image, gt, name = dataset.load(i)
        labels, _ = predictor(image)
        save_index_png(labels, trained.palette, out / f"{name}.png")
        save_overlay(image, labels, trained.palette, out / f"{name}_overlay.jpg")
        if gt.shape != labels.shape:  # valid U-Net: compare on the centre it predicts
            top, left = (gt.shape[0] - labels.shape[0]) // 2, (gt.shape[1] - labels.shape[1]) // 2
            gt = gt[top : top + labels.shape[0], left : left + labels.shape[1]]
            image = image[top : top + labels.shape[0], left : left + labels.shape[1]]
        rows.append((name, image.squeeze(), gt, labels))
    return plot_side_by_side(rows, trained.class_names, trained.palette, run_dir / "predictions.png")
