"""Bad input: each gets a clear error naming the file and the fault, never a silent wrong label."""

from __future__ import annotations

import numpy as np
import pytest
from fakedata import make_camvid, make_sbd, png_with_claimed_size, rng_image, rng_mask, save
from PIL import Image

from densepred.data import DataError, LabelMap, create_dataset
from densepred.data.io import image_size, read_image, read_mask


def test_mask_value_out_of_range_lists_the_values(tmp_path):
    root = make_camvid(tmp_path)
    bad = rng_mask(0, range(12))
    bad[0, :3] = [12, 40, 40]
    save(root / "trainannot" / "f1.png", bad)
    ds = create_dataset("camvid", root=root)
    ds[0]  # other files are fine
    with pytest.raises(
        DataError, match=r"trainannot/f1.png: mask has values \[12, 40\] in 3 pixels .*classes 0-10, ignored 11, 255"
    ):
        ds[1]


def test_jpeg_mask_hint(tmp_path):
    with pytest.raises(DataError, match="JPEG mask blends labels"):
        LabelMap.identity(3)(np.array([[0, 7]], np.uint8), tmp_path / "m.jpg")


def test_sixteen_bit_mask_values_are_checked(tmp_path):
    path = save(tmp_path / "m.png", np.array([[0, 1], [300, 2]], np.uint16))
    raw = read_mask(path)
    assert raw.dtype == np.uint16
    with pytest.raises(DataError, match=r"values \[300\]"):
        LabelMap.identity(3)(raw, path)
    ok = save(tmp_path / "ok.png", np.array([[0, 1], [255, 2]], np.uint16))
    np.testing.assert_array_equal(LabelMap.identity(3)(read_mask(ok), ok), [[0, 1], [255, 2]])


def test_image_mask_size_mismatch(tmp_path):
    root = make_camvid(tmp_path)
    save(root / "trainannot" / "f2.png", rng_mask(2, range(12), h=20, w=32))
    ds = create_dataset("camvid", root=root)
    with pytest.raises(DataError, match=r"image .*train/f2.png is 32x24 but its mask .*trainannot/f2.png is 32x20"):
        ds[2]
    with pytest.raises(DataError, match="32x20"):
        ds.load_mask(2)  # the statistics path checks sizes too


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path, suffix):
    root = make_camvid(tmp_path)
    good = tmp_path / f"whole{suffix}"
    Image.fromarray(rng_image(0, 64, 64)).save(good)
    data = good.read_bytes()
    target = root / "train" / "f0.png"
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train/f0.png: truncated or corrupt image data"):
        create_dataset("camvid", root=root)[0]


def test_unreadable_image(tmp_path):
    root = make_camvid(tmp_path)
    (root / "train" / "f0.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"train/f0.png: not a readable image"):
        create_dataset("camvid", root=root)[0]


def test_missing_mask_is_named_at_construction(tmp_path):
    root = make_camvid(tmp_path)
    (root / "trainannot" / "f1.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) in .*train have no mask: .*train/f1.png"):
        create_dataset("camvid", root=root)


def test_missing_sbd_mat_is_named(tmp_path):
    make_sbd(tmp_path, train=("2008_000001",), val=())
    (tmp_path / "benchmark_RELEASE/dataset/cls/2008_000001.mat").unlink()
    with pytest.raises(DataError, match="2008_000001.jpg"):
        create_dataset("sbd", root=tmp_path)


def test_corrupt_sbd_mat(tmp_path):
    make_sbd(tmp_path, train=("2008_000001",), val=())
    (tmp_path / "benchmark_RELEASE/dataset/cls/2008_000001.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(DataError, match="2008_000001.mat: not a readable SBD class annotation"):
        create_dataset("sbd", root=tmp_path)[0]


def test_empty_dataset(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(DataError, match=r"no images found in .*train"):
        create_dataset("camvid", root=tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"CamVid train images not found: .*train is not a directory"):
        create_dataset("camvid", root=tmp_path)


def test_grayscale_image_is_repeated_to_rgb(tmp_path):
    gray = rng_image(0, channels=1)
    out = read_image(save(tmp_path / "g.png", gray))
    assert out.shape == (24, 32, 3) and (out == gray[..., None]).all()


def test_rgb_image_for_grayscale_dataset(tmp_path):
    gray = rng_image(0, channels=1)
    as_rgb = read_image(save(tmp_path / "grey_rgb.png", np.repeat(gray[..., None], 3, 2)), channels=1)
    np.testing.assert_array_equal(as_rgb[..., 0], gray)  # RGB that is really gray: accepted
    with pytest.raises(DataError, match="colour image, but this dataset expects single-channel"):
        read_image(save(tmp_path / "colour.png", rng_image(1)), channels=1)


def test_rgba(tmp_path):
    rgba = np.dstack([rng_image(0), np.full((24, 32), 255, np.uint8)])
    np.testing.assert_array_equal(read_image(save(tmp_path / "opaque.png", rgba)), rgba[..., :3])
    rgba[3, 4, 3] = 10
    with pytest.raises(DataError, match=r"transparent.png: image has transparent pixels \(alpha < 255 in 1 pixels\)"):
        read_image(save(tmp_path / "transparent.png", rgba))


def test_sixteen_bit_image_uses_the_full_range(tmp_path):
    values = np.array([[0, 257, 65535, 32896]], np.uint16)
    out = read_image(save(tmp_path / "g16.png", values), channels=1)
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 255, 128]])  # PIL's convert would clip 257 -> 255


def test_float_image_is_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.zeros((4, 4), np.float32)).save(path)
    with pytest.raises(DataError, match=r"f.tif: unsupported image mode 'F'"):
        read_image(path)


def test_palette_image_is_converted_to_rgb(tmp_path):
    im = Image.fromarray(rng_image(0)).convert("P")
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(im.convert("RGB")))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = png_with_claimed_size(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(DataError, match=r"bomb.png: .*decompression"):
        read_image(bomb)
    with pytest.raises(DataError, match=r"bomb.png: .*decompression"):
        image_size(bomb)
    small = save(tmp_path / "small.png", rng_image(0))
    with pytest.raises(DataError, match=r"small.png: 32x24 = 768 pixels exceeds the limit of 100"):
        read_image(small, max_pixels=100)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")
