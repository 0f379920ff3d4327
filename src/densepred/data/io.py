"""Safe reading of images and label masks.

Every reader checks the header first (size against a pixel limit, so a decompression bomb is
refused before any pixel is decoded), then decodes, and turns every failure into a
:class:`DataError` that names the file, the fault and the fix. Pixel modes are handled one by
one and explicitly: nothing is converted silently in a way that could change a label.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from .errors import DataError

__all__ = [
    "MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "read_image",
    "read_image_stack",
    "read_mask",
    "read_mask_stack",
    "image_size",
    "colours_to_index",
    "check_same_size",
    "PNG_DECODER",
]

# 64 Mpx: ~30x a Cityscapes frame, far above any dataset here, far below what exhausts memory.
MAX_PIXELS = 1 << 26
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_CONVERT_TO_RGB = {"P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


@contextmanager
def _opened(path: str | Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open ``path`` lazily (header only) and refuse it if it is too large or not an image."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not an image; re-download or re-export the file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its own limits; we want one clear error instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e}); re-download or re-export the file") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise DataError(
                f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (decompression-bomb "
                "guard); if the file is trusted, pass a larger max_pixels"
            )
        yield im


def _decode(im: Image.Image, path: Path) -> Image.Image:
    """Decode the pixels now, so a truncated file fails here with its name."""
    try:
        im.load()
        return im
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: truncated or corrupt image data ({e}); re-download or re-export the file") from None


def image_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` of an image from its header, without decoding the pixels."""
    with _opened(path, max_pixels) as im:
        return im.size[1], im.size[0]


def _frames(im: Image.Image, path: Path, max_pixels: int) -> list[Image.Image]:
    """Every frame of a multi-page file, decoded (a truncated stack fails here with its name).

    Each frame has its own header, so each is checked before it is decoded, and the whole stack
    shares one pixel budget: a small first page cannot smuggle in a huge second one.
    """
    frames, total = [], 0
    try:
        for k, frame in enumerate(ImageSequence.Iterator(im)):
            w, h = frame.size
            total += w * h
            if total > max_pixels:
                raise DataError(
                    f"{path}: frame {k} ({w}x{h}) brings the stack to {total} pixels, over the limit of "
                    f"{max_pixels} (decompression-bomb guard); if the file is trusted, pass a larger max_pixels"
                )
            frames.append(frame.copy())
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: truncated or corrupt image stack ({e}); re-download the file") from None
    return frames


def _drop_opaque_alpha(arr: np.ndarray, path: Path) -> np.ndarray:
    # A transparent pixel has no defined colour, so only a fully opaque alpha can be dropped.
    alpha = arr[..., -1]
    if alpha.min() < 255:
        raise DataError(
            f"{path}: image has transparent pixels (alpha < 255 in {int((alpha < 255).sum())} pixels); "
            "transparent pixels have no colour, so flatten the image onto a background and save it as RGB"
        )
    return arr[..., :-1]


try:  # libspng's PNG decoder (the ``pyspng`` wheel, where the platform has one)
    from pyspng import load as _DECODE_PNG
except ImportError:
    _DECODE_PNG = None
PNG_DECODER = "libspng" if _DECODE_PNG is not None else "OpenCV"  # what read_image decodes 8-bit PNGs with


def _png_chunks_intact(data: bytes) -> bool:
    """Whether every chunk of a PNG up to IEND is whole and matches its CRC-32.

    pyspng has libspng skip these checks (and the zlib stream's Adler-32), so a damaged file
    would decode into wrong pixels without an error; libpng and PIL refuse it. 0.08 ms for a
    CamVid frame (276 KB).
    """
    view, pos, end = memoryview(data), 8, len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end or zlib.crc32(view[pos + 4 : stop]) != struct.unpack_from(">I", data, stop)[0]:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos = stop + 4
    return False


def _fast_decode(im: Image.Image, path: Path) -> np.ndarray | None:
    """8-bit RGB / gray PNG (libspng, else OpenCV) and JPEG (OpenCV); None: use PIL.

    A CamVid frame's PNG: libspng 3.1 ms, OpenCV's libpng 4.6 ms, PIL 5.7 ms (2-core Zen 2).
    Neither applies EXIF orientation or gamma, as PIL does not, so masks stay aligned. Anything
    unexpected (a failed decode, 16 bits, an alpha channel) falls back to PIL, whose errors are precise.
    """
    if im.format not in {"PNG", "JPEG"} or im.mode not in {"RGB", "L"} or "transparency" in im.info:
        return None
    data = path.read_bytes()
    if im.format == "PNG" and _DECODE_PNG is not None:
        if not _png_chunks_intact(data):
            return None  # PIL names the fault
        try:
            arr = _DECODE_PNG(data)  # RGB order already
        except Exception:  # noqa: BLE001 - libspng's error text is terse: PIL says what is wrong
            return None
    else:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None and arr.ndim == 3 and arr.shape[2] == 3:
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if (
        arr is None
        or arr.dtype != np.uint8
        or arr.ndim != (3 if im.mode == "RGB" else 2)
        or arr.shape[:2] != im.size[::-1]
        or (arr.ndim == 3 and arr.shape[2] != 3)
    ):
        return None
    return arr


def _pil_decode(im: Image.Image, path: Path) -> np.ndarray:
    """Decode with PIL and bring every supported mode to uint8 gray ``(H, W)`` or RGB ``(H, W, 3)``."""
    im = _decode(im, path)
    if im.mode in _CONVERT_TO_RGB:
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    mode, arr = im.mode, np.asarray(im)
    if mode in _SIXTEEN_BIT:
        # Rescale the full 16-bit range linearly (x / 257); PIL's convert("L") would clip at 255.
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode == "1":
        return arr.astype(np.uint8) * 255
    if mode in {"RGBA", "LA"}:
        arr = _drop_opaque_alpha(arr, path)
        return arr[..., 0] if arr.shape[2] == 1 else arr
    if mode not in {"L", "RGB"}:
        raise DataError(
            f"{path}: unsupported image mode {mode!r} ({arr.dtype} pixels); save it as 8-bit or 16-bit "
            "grayscale or 8-bit RGB"
        )
    return arr


def _to_channels(arr: np.ndarray, path: Path, channels: int) -> np.ndarray:
    """uint8 gray ``(H, W)`` or RGB ``(H, W, 3)`` -> ``(H, W, channels)``."""
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB) if channels == 3 else arr[..., None]
    if channels == 3:
        return arr
    # An RGB file for a grayscale dataset is only accepted when it really is gray.
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return arr[..., :1]
    raise DataError(
        f"{path}: colour image, but this dataset expects single-channel grayscale images; convert it "
        "first (e.g. PIL.Image.open(p).convert('L').save(p))"
    )


def _image_array(im: Image.Image, path: Path, channels: int) -> np.ndarray:
    """The pixels of one frame as uint8 ``(H, W, channels)``; every mode is handled here."""
    arr = _fast_decode(im, path)  # stack frames are in-memory copies without a format: PIL decodes them
    return _to_channels(_pil_decode(im, path) if arr is None else arr, path, channels)


def read_image(path: str | Path, channels: int = 3, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as uint8 ``(H, W, channels)``, ``channels`` being 3 (RGB) or 1 (grayscale).

    Grayscale files are repeated to RGB when ``channels == 3``; 16-bit files are rescaled to
    8 bits over their full range; RGBA is accepted only when fully opaque; palette, CMYK and
    YCbCr files are converted to RGB; 32-bit integer and float images are refused.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    with _opened(path, max_pixels) as im:
        return _image_array(im, path, channels)


def read_image_stack(path: str | Path, channels: int = 1, max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
    """All frames of a multi-page image (e.g. the ISBI 2012 ``train-volume.tif``), each as :func:`read_image`."""
    path = Path(path)
    with _opened(path, max_pixels) as im:
        return [_image_array(frame, path, channels) for frame in _frames(im, path, max_pixels)]


def _mask_array(im: Image.Image, path: Path, colours: Mapping[tuple[int, int, int], int] | None) -> np.ndarray:
    """Raw label values of one frame as a 2-D integer array."""
    mode = im.mode
    arr = np.asarray(_decode(im, path))  # for mode "P": the palette indices, i.e. the class ids (VOC)
    if mode in {"L", "P"} or mode in _SIXTEEN_BIT:
        return arr
    if mode == "1":
        return arr.astype(np.uint8)
    if mode == "I":
        if arr.size and arr.min() < 0:
            raise DataError(f"{path}: mask has negative values (min {arr.min()}); labels must be >= 0")
        return arr
    if mode in {"RGB", "RGBA"}:
        if colours is None:
            raise DataError(
                f"{path}: colour ({mode}) mask, but this dataset expects index masks (one class id per pixel, "
                "PNG mode L or P); save index PNGs, or give the class colours (a palette) so colours can be mapped"
            )
        rgb = _drop_opaque_alpha(arr, path) if mode == "RGBA" else arr
        return colours_to_index(rgb, colours, path)
    raise DataError(f"{path}: unsupported mask mode {mode!r}; save masks as 8-bit index PNGs (mode L or P)")


def read_mask(
    path: str | Path,
    colours: Mapping[tuple[int, int, int], int] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read a label mask as a 2-D integer array of raw label values (not yet checked or mapped).

    Index masks (8-bit L, palette P whose indices are the labels, 16-bit, 32-bit) are returned as
    stored. Colour masks (RGB) are mapped through ``colours`` (RGB -> raw label); an unknown
    colour is an error listing the colours found. Without ``colours``, a colour mask is refused.
    """
    path = Path(path)
    with _opened(path, max_pixels) as im:
        return _mask_array(im, path, colours)


def read_mask_stack(path: str | Path, max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
    """All frames of a multi-page label file, each as :func:`read_mask`."""
    path = Path(path)
    with _opened(path, max_pixels) as im:
        return [_mask_array(frame, path, None) for frame in _frames(im, path, max_pixels)]


def colours_to_index(rgb: np.ndarray, colours: Mapping[tuple[int, int, int], int], path: str | Path) -> np.ndarray:
    """Map an ``(H, W, 3)`` colour mask to labels with ``colours``; unknown colours are an error."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    known = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in colours), dtype=np.int32)
    values = np.array([colours[_unpack(c)] for c in known], dtype=np.int32)
    idx = np.clip(np.searchsorted(known, codes), 0, len(known) - 1)
    unknown = known[idx] != codes
    if unknown.any():
        found = [_unpack(c) for c in np.unique(codes[unknown])[:8]]
        raise DataError(
            f"{path}: colour mask has {int(unknown.sum())} pixels with colours that are not in the palette, "
            f"e.g. {found}; add them to the palette (or ignore_colour) or fix the mask "
            "(a JPEG or resized mask blends colours: masks must be lossless PNGs)"
        )
    out = values[idx]
    return out.astype(np.uint8) if out.max(initial=0) <= 255 else out


def _unpack(code: int) -> tuple[int, int, int]:
    code = int(code)
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


def check_same_size(
    image_shape: tuple[int, ...], mask_shape: tuple[int, ...], image: str | Path, mask: str | Path
) -> None:
    """Refuse an image/mask pair whose height and width differ (they would silently misalign)."""
    if tuple(image_shape[:2]) != tuple(mask_shape[:2]):
        hint = "re-export the mask at the image's size with nearest-neighbour resampling"
        if tuple(image_shape[:2]) == tuple(mask_shape[:2])[::-1]:
            # Photos often carry an EXIF orientation; densepred reads pixels as stored (no rotation),
            # while an annotation tool may have drawn the mask on the rotated view.
            hint = (
                "the sizes are transposed: if the image has an EXIF orientation tag, densepred reads its pixels "
                "as stored, without rotating them; save the image with the rotation applied "
                "(PIL.ImageOps.exif_transpose) so that it matches the mask"
            )
        raise DataError(
            f"image {image} is {image_shape[1]}x{image_shape[0]} but its mask {mask} is "
            f"{mask_shape[1]}x{mask_shape[0]} (width x height); they must be the same size: {hint}"
        )
