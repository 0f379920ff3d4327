"""Untrusted input: checkpoints, archives, images, masks and configs that are malicious, broken
or merely unusual. Each is refused (or read correctly) with an error that names the file or the
option and says what to do. Cases already covered elsewhere are listed in docs/reliability.md.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densepred.checkpoint import CheckpointError, load_checkpoint, load_trained, save_atomic
from densepred.cli import main
from densepred.config import ConfigError, load_experiment
from densepred.data import DataError, DownloadError, create_dataset
from densepred.data import extract as extract_module
from densepred.data.extract import safe_extract
from densepred.data.io import read_image, read_image_stack, read_mask, read_mask_stack
from densepred.precision import torch_threads
from densepred.trainer import train

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fakedata import make_camvid, rng_image, rng_mask, save  # noqa: E402

from tiny import TINY as TINY_RECIPE  # noqa: E402

TINY = [*TINY_RECIPE, "data.options={num_images: 4, size: 32}", "data.batch_size=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# ---------------------------------------------------------------------------------------------
# Checkpoints and weights


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_commands_refuse_a_checkpoint_that_would_run_a_command(tmp_path, capsys, command):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "dataset": {}, "x": _Payload(marker)}, evil)
    image = save(tmp_path / "in.png", rng_image(0))
    argv = {
        "eval": ["eval", "--checkpoint", str(evil)],
        "predict": ["predict", "--checkpoint", str(evil), str(image), "--out", str(tmp_path / "out")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"refused to load {evil}" in err and "could execute code" in err
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    return train(load_experiment(None, TINY), run, progress=False).checkpoint


def test_a_checkpoint_whose_weights_do_not_fit_its_class_count_is_named(trained_checkpoint, tmp_path):
    state = load_checkpoint(trained_checkpoint)
    edited = save_atomic({**state, "dataset": {**state["dataset"], "num_classes": 3}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as err:
        load_trained(edited)
    message = str(err.value)
    assert message.startswith(f"{edited}: weights do not fit unet_padded with 3 classes")
    assert "final.weight is (6, 4, 1, 1), expected (3, 4, 1, 1)" in message


def test_a_checkpoint_of_another_architecture_is_summarised(trained_checkpoint, tmp_path):
    state = load_checkpoint(trained_checkpoint)
    config = {**state["config"], "model": {**state["config"]["model"], "name": "fcn32s", "options": {}}}
    edited = save_atomic({**state, "config": config}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"do not fit fcn32s .*missing keys \(\d+\): backbone.conv1_1.bias, "
    ) as err:
        load_trained(edited)
    assert "unexpected keys (" in str(err.value) and len(str(err.value)) < 600  # a summary, not 60 key names


def test_weights_of_another_class_count_name_the_layers(trained_checkpoint):
    import densepred
    from densepred.weights import WeightsError

    with pytest.raises(WeightsError, match=r"final.weight \(6, 4, 1, 1\) cannot fill final.weight \(21, 4, 1, 1\)"):
        densepred.create_model(
            "unet_padded",
            num_classes=21,
            in_channels=3,
            pretrained=str(trained_checkpoint),
            base_channels=4,
            depth=2,
            batch_norm=False,
        )


# ---------------------------------------------------------------------------------------------
# Archives


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if isinstance(m, tuple):
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
            else:
                tar.addfile(m)
    return path


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return path


@pytest.mark.parametrize(
    ("kind", "build", "message"),
    [
        ("tar hard link", lambda p: _tar(p, [("a", b"x"), _special("h", tarfile.LNKTYPE, "/etc/passwd")]), "is a link"),
        ("tar symlink", lambda p: _tar(p, [_special("s", tarfile.SYMTYPE, "../../x")]), "is a link"),
        ("tar device", lambda p: _tar(p, [_special("dev", tarfile.CHRTYPE)]), "is a special file"),
        ("tar fifo", lambda p: _tar(p, [_special("fifo", tarfile.FIFOTYPE)]), "is a special file"),
        ("tar dotdot", lambda p: _tar(p, [("ok/../../evil.txt", b"x")]), "points outside"),
        ("tar absolute", lambda p: _tar(p, [("/tmp/evil.txt", b"x")]), "points outside"),
        ("zip absolute", lambda p: _zip(p, {"/tmp/evil.txt": b"x"}), "points outside"),
        ("zip drive", lambda p: _zip(p, {"C:/evil.txt": b"x"}), "points outside"),
        ("zip backslash dotdot", lambda p: _zip(p, {"a\\..\\..\\evil.txt": b"x"}), "points outside"),
    ],
)
def test_unsafe_archive_members_are_refused(tmp_path, kind, build, message):
    archive = build(tmp_path / "evil.bin")
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(DownloadError, match=message):
        safe_extract(archive, dest)
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path / "etc").exists()


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_oversized_members_are_refused_before_writing(tmp_path, fmt):
    members = {"data/small.txt": b"s" * 100, "data/big.bin": b"\0" * 50_000}
    archive = _zip(tmp_path / "a.zip", members) if fmt == "zip" else _tar(tmp_path / "a.tgz", list(members.items()))
    with pytest.raises(DownloadError, match=r"member 'data/big.bin' \(50000 bytes\) is larger than the per-file limit"):
        safe_extract(archive, tmp_path / "out1", max_member_bytes=10_000)
    assert not (tmp_path / "out1" / "data" / "big.bin").exists()  # refused from its header, nothing written
    with pytest.raises(DownloadError, match=r"'data/big.bin' \(50000 bytes\) would exceed the extraction budget"):
        safe_extract(archive, tmp_path / "out2", max_total_bytes=20_000)
    assert safe_extract(archive, tmp_path / "out3") == 2  # the defaults let a normal archive through


def test_a_zip_bomb_is_refused_by_its_expansion_ratio(tmp_path, monkeypatch):
    bomb = _zip(tmp_path / "bomb.zip", {f"z{i}.bin": b"\0" * 4_000_000 for i in range(3)})  # 12 MB in ~36 kB
    assert bomb.stat().st_size * extract_module.MAX_EXPANSION < 12_000_000
    monkeypatch.setattr(extract_module, "MIN_BUDGET_BYTES", 1 << 20)  # the 1 GiB floor, scaled down for a test
    with pytest.raises(DownloadError, match="would exceed the extraction budget .*archive-bomb guard"):
        safe_extract(bomb, tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated tar.gz", "flipped byte in zip"])
def test_a_corrupt_archive_is_a_download_error(tmp_path, damage):
    if damage == "truncated tar.gz":
        data = _tar(tmp_path / "a.tgz", [("a.txt", os.urandom(20_000))]).read_bytes()
        data = data[: len(data) // 2]
    else:
        data = bytearray(_zip(tmp_path / "a.zip", {"a.txt": b"hello world " * 1000}).read_bytes())
        data[60] ^= 0xFF  # inside the compressed stream
        data = bytes(data)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    refused = r"bad.bin: (corrupt or unreadable archive|neither a zip nor a readable tar)"
    with pytest.raises(DownloadError, match=refused):
        safe_extract(bad, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Images and masks


def test_zero_byte_image_and_mask(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for reader in (read_image, read_mask):
        with pytest.raises(DataError, match=r"empty.png: empty file \(0 bytes\), not an image"):
            reader(empty)


def test_the_content_decides_the_format_not_the_extension(tmp_path):
    pixels = rng_image(0)
    png_named_jpg = tmp_path / "really_png.jpg"
    Image.fromarray(pixels).save(png_named_jpg, format="PNG")
    np.testing.assert_array_equal(read_image(png_named_jpg), pixels)  # lossless, whatever the name says
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match=r"notes.png: not a readable image"):
        read_image(text)


def test_cmyk_images_are_converted_to_rgb(tmp_path):
    pixels = rng_image(1)
    cmyk = Image.fromarray(pixels).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif"), np.asarray(cmyk.convert("RGB")))
    cmyk.save(tmp_path / "c.jpg", quality=95)
    assert read_image(tmp_path / "c.jpg").shape == (24, 32, 3)


def _exif_rotated(path: Path, pixels: np.ndarray) -> Path:
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: displayed rotated by 90 degrees
    im.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_not_applied_and_a_mask_drawn_rotated_is_explained(tmp_path):
    root = make_camvid(tmp_path / "camvid", n=1, splits=("train",))
    (root / "train" / "f0.png").unlink()
    photo = _exif_rotated(root / "train" / "f0.jpg", rng_image(0))  # stored 32 wide x 24 high
    assert read_image(photo).shape == (24, 32, 3)  # pixels as stored, so they match a mask made from them
    save(root / "trainannot" / "f0.png", rng_mask(0, range(11), h=32, w=24))  # a mask drawn on the rotated view
    with pytest.raises(DataError, match=r"sizes are transposed: if the image has an EXIF orientation tag"):
        create_dataset("camvid", root=root)[0]


def test_a_multi_page_file_cannot_hide_a_bomb_behind_a_small_first_page(tmp_path):
    small, big = (Image.fromarray(np.zeros(s, np.uint8)) for s in ((8, 8), (400, 400)))
    small.save(tmp_path / "hidden.tif", save_all=True, append_images=[big])
    for reader in (read_image_stack, read_mask_stack):
        with pytest.raises(DataError, match=r"hidden.tif: frame 1 \(400x400\) brings the stack to 160064 pixels"):
            reader(tmp_path / "hidden.tif", max_pixels=10_000)
    pages = [Image.fromarray(np.zeros((50, 50), np.uint8))] * 20  # each page small, the stack too big
    pages[0].save(tmp_path / "many.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=r"many.tif: frame 4 \(50x50\) brings the stack to 12500 pixels"):
        read_mask_stack(tmp_path / "many.tif", max_pixels=10_000)
    assert len(read_mask_stack(tmp_path / "many.tif", max_pixels=50_000)) == 20


def test_palette_and_sixteen_bit_masks_keep_their_label_values(tmp_path):
    labels = rng_mask(3, [0, 1, 2, 255])
    palette = save(tmp_path / "p.png", labels, palette=True)
    assert Image.open(palette).mode == "P"
    np.testing.assert_array_equal(read_mask(palette), labels)  # the indices, not the colours
    wide = save(tmp_path / "w.png", labels.astype(np.uint16) * 257)
    assert read_mask(wide).max() == 255 * 257  # raw values, for the label map to check


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.lr=1" + "0" * 400, "optim.lr must be a number"),
        ("optim.betas=[1.5, 0.9]", r"optim.betas must be two numbers in \[0, 1\)"),
        ("schedule.gamma=0", "schedule.gamma must be > 0"),
        ("schedule.min_lr_factor=2", r"schedule.min_lr_factor must be in \[0, 1\]"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*63\)"),
        ("train.max_minutes=0", "train.max_minutes must be > 0 or null"),
        ("train.class_weights=[1, -2]", "train.class_weights must be >= 0"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("eval.tile=0", "eval.tile must be a positive size or null"),
        ("eval.max_images=0", "eval.max_images must be >= 1 or null"),
        ("data.crop=-5", "data.crop must be a positive size or null"),
        ("data.workers=many", "data.workers must be a number"),
        ("model.options=3", "model.options must be a mapping"),
        ("model.options={depthh: 3}", r"model.options.depthh: not an option of unet_padded; its options: base_ch"),
        ("model.options={1: 3}", r"model.options: keys must be names, got \[1\]"),
        ("model.name=fcn9s", r"model.name: unknown model 'fcn9s'. Did you mean: fcn8s"),
        ("eval.crf_params={w1: [3]}", "eval.crf_params.w1 must be a number"),
        ("optim.lr=[unclosed", "value is not valid YAML"),
    ],
)
def test_bad_values_name_the_option_and_the_valid_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, [override])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"- just\n- a list\n", "a config must be a mapping with sections model, data"),
        (b"optim: [1, 2]\n", "section 'optim' must be a mapping"),
        (b"\xff\xfe\x00binary", "is not valid UTF-8 YAML"),
        (b"optim: {lr: 0.1\n", "is not valid UTF-8 YAML"),
        (
            b"a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nmodel: {options: {depth: *b}}\n",  # billion laughs, small
            r"YAML aliases \(\*a\) are not allowed in recipes",
        ),
        (b"optim: {learning_rate: 0.1}\n", r"unknown key\(s\) optim.learning_rate; valid keys in 'optim': betas"),
        (b"optim: {lr: 0.1}\noptim: {lr: 0.2}\n", r"key 'optim' is given twice \(first on line 1\)"),
        (b"optim:\n  lr: 0.1\n  lr: 0.2\n", r"key 'lr' is given twice \(first on line 2\)"),
    ],
)
def test_bad_config_files_name_the_file_and_the_fault(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_experiment(path, ["optim.lr=0.5"])
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.crop=24"], r"data.crop=24 has no effect with data.augment=none .*set data.crop=null"),
        (
            ["model.name=unet", "model.options={base_channels: 2}", "data.augment=deeplab", "data.crop=100"],
            r"data.crop=100 does not fit unet: .*Nearest valid sizes: 100 -> 188",
        ),
        (["train.class_weights=[1, 2]"], r"train.class_weights has 2 values but synthetic has 6 classes \(background,"),
    ],
)
def test_recipes_that_cannot_train_are_refused_before_the_first_step(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(load_experiment(None, [*TINY, *overrides]), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_dataset_options_list_the_valid_ones():
    with pytest.raises(DataError, match=r"dataset 'synthetic' has no option\(s\) nimages .*its options: .*num_images"):
        create_dataset("synthetic", nimages=3)


def test_whole_images_of_different_sizes_in_one_batch_are_explained(tmp_path):
    root = make_camvid(tmp_path / "camvid", n=2, splits=("train", "val"))
    save(root / "train" / "f1.png", rng_image(5, h=28))
    save(root / "trainannot" / "f1.png", rng_mask(5, range(11), h=28))
    exp = load_experiment(None, [*TINY, "data.dataset=camvid", f"data.root={root}", "data.options={}"])
    sizes = r"cannot batch images of different sizes: f\d \(32x\d\d\), f\d \(32x\d\d\); .*data.batch_size=1"
    with pytest.raises(DataError, match=sizes):
        train(exp, tmp_path / "run", progress=False)
