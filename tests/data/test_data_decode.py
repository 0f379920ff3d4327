"""Fast decoders give exactly PIL's pixels: libspng for PNG (when installed), OpenCV otherwise."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from fakedata import rng_image
from PIL import Image

from densepred.data import DataError
from densepred.data import io as image_io
from densepred.data.io import read_image

# (x0, y0, dx, dy) of the seven Adam7 passes (PNG spec, section 8.2).
_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def interlaced_png(path: Path, image: np.ndarray) -> Path:
    """An Adam7-interlaced 8-bit PNG (PIL and OpenCV write none), rows unfiltered."""
    h, w = image.shape[:2]
    colour = 2 if image.ndim == 3 else 0
    raw = b""
    for x0, y0, dx, dy in _ADAM7:
        sub = image[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 1)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    )
    return path


def _variants(tmp_path: Path) -> list[Path]:
    rgb, gray = rng_image(3, 37, 53), rng_image(4, 37, 53, channels=1)
    files = [interlaced_png(tmp_path / "adam7_rgb.png", rgb), interlaced_png(tmp_path / "adam7_gray.png", gray)]
    for level in (0, 1, 9):  # stored, fast and best deflate; PIL picks each row's filter adaptively
        Image.fromarray(rgb).save(tmp_path / f"pil_rgb_{level}.png", compress_level=level)
        Image.fromarray(gray).save(tmp_path / f"pil_gray_{level}.png", compress_level=level)
        files += [tmp_path / f"pil_rgb_{level}.png", tmp_path / f"pil_gray_{level}.png"]
    for name in ("NONE", "SUB", "UP", "AVG", "PAETH"):  # one filter type on every row, where OpenCV can
        flag = getattr(cv2, f"IMWRITE_PNG_FILTER_{name}", None)
        if flag is not None:
            ok, data = cv2.imencode(".png", rgb[..., ::-1], [cv2.IMWRITE_PNG_FILTER, flag])
            assert ok
            (tmp_path / f"cv_{name}.png").write_bytes(data.tobytes())
            files.append(tmp_path / f"cv_{name}.png")
    return files


def test_png_decoders_give_pils_pixels(tmp_path, monkeypatch):
    for path in _variants(tmp_path):
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(read_image(path), expected, err_msg=str(path))
    monkeypatch.setattr(image_io, "_DECODE_PNG", None)  # OpenCV's libpng, as without pyspng
    for path in _variants(tmp_path):
        with Image.open(path) as im:
            np.testing.assert_array_equal(read_image(path), np.asarray(im.convert("RGB")), err_msg=str(path))


def test_libspng_decodes_pngs_when_installed(tmp_path, monkeypatch):
    pyspng = pytest.importorskip("pyspng")
    assert image_io._DECODE_PNG is not None
    calls = []

    def counted(data: bytes) -> np.ndarray:
        calls.append(len(data))
        return pyspng.load(data)

    monkeypatch.setattr(image_io, "_DECODE_PNG", counted)
    path = interlaced_png(tmp_path / "a.png", rng_image(0))
    read_image(path)
    assert calls == [path.stat().st_size]
    Image.fromarray(rng_image(0)).save(tmp_path / "b.jpg")
    read_image(tmp_path / "b.jpg")  # JPEG: OpenCV
    assert len(calls) == 1


@pytest.mark.parametrize("fault", ["truncated", "bad crc"])
def test_a_damaged_png_is_named_by_pils_error(tmp_path, fault):
    good = Image.fromarray(rng_image(0, 64, 64))
    good.save(tmp_path / "good.png")
    data = bytearray((tmp_path / "good.png").read_bytes())
    if fault == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped byte inside the image data: the chunk's CRC no longer matches
        data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad.png: truncated or corrupt image data"):
        read_image(tmp_path / "bad.png")
