"""Tiny on-disk datasets in every supported layout, built by the tests themselves."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def rng_image(seed: int, h: int = 24, w: int = 32, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def rng_mask(seed: int, values: Sequence[int], h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed + 1000).choice(np.asarray(values, dtype=np.uint8), size=(h, w))


def save(path: Path, array: np.ndarray, mode: str | None = None, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette:  # VOC-style: mode P, the indices are the labels (putpalette turns L into P as is)
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)
    return path


def make_camvid(root: Path, n: int = 3, splits: Sequence[str] = ("train", "val")) -> Path:
    for split in splits:
        for i in range(n):
            save(root / split / f"f{i}.png", rng_image(i))
            save(root / f"{split}annot" / f"f{i}.png", rng_mask(i, range(12)))
    return root


def make_voc(
    root: Path, train: Sequence[str] = ("2007_000001", "2007_000002"), val: Sequence[str] = ("2007_000033",)
) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, ids in (("train", train), ("val", val), ("trainval", [*train, *val])):
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for k, ident in enumerate([*train, *val]):
        save(voc / "JPEGImages" / f"{ident}.jpg", rng_image(k))
        save(voc / "SegmentationClass" / f"{ident}.png", rng_mask(k, [*range(21), 255]), palette=True)
    return root


def make_sbd(root: Path, train: Sequence[str], val: Sequence[str]) -> Path:
    from scipy.io import savemat

    ds = root / "benchmark_RELEASE" / "dataset"
    (ds / "cls").mkdir(parents=True)
    (ds / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (ds / "val.txt").write_text("".join(f"{i}\n" for i in val))
    for k, ident in enumerate([*train, *val]):
        save(ds / "img" / f"{ident}.jpg", rng_image(100 + k))
        seg = rng_mask(100 + k, range(21))
        savemat(ds / "cls" / f"{ident}.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.unique(seg)}})
    return root


def make_cityscapes(root: Path, cities: Sequence[str] = ("aachen", "bonn")) -> Path:
    for k, city in enumerate(cities):
        for split in ("train", "val"):
            stem = f"{city}_{k:06d}_000019"
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng_image(k))
            save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", rng_mask(k, range(34)))
    return root


def make_ade20k(root: Path, n: int = 2) -> Path:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            save(base / "images" / split / f"{name}.jpg", rng_image(i))
            save(base / "annotations" / split / f"{name}.png", rng_mask(i, range(151)))
    return root


def make_isbi_pngs(root: Path, n: int = 3) -> Path:
    for i in range(n):
        save(root / "train" / "images" / f"{i:02d}.png", rng_image(i, channels=1))
        save(root / "train" / "labels" / f"{i:02d}.png", rng_mask(i, [0, 255]))
        save(root / "test" / "images" / f"{i:02d}.png", rng_image(50 + i, channels=1))
    return root


def save_stack(path: Path, frames: Sequence[np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def make_isbi_tifs(root: Path, n: int = 3) -> Path:
    save_stack(root / "train-volume.tif", [rng_image(i, channels=1) for i in range(n)])
    save_stack(root / "train-labels.tif", [rng_mask(i, [0, 255]) for i in range(n)])
    save_stack(root / "test-volume.tif", [rng_image(50 + i, channels=1) for i in range(n)])
    return root


def png_with_claimed_size(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header then claims ``width`` x ``height`` (a decompression bomb's header)."""
    save(path, np.zeros((1, 1), np.uint8))
    data = bytearray(path.read_bytes())
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", then width and height, then CRC.
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path
