"""Inference modes: their equivalences, and the prediction command's files."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import densepred
from densepred.config import EvalConfig
from densepred.inference import (
    forward_size,
    mirror_pad,
    multi_scale_flip,
    overlap_tile,
    predict_logits,
    sliding_window,
)
from densepred.models.unet import UNet
from densepred.precision import torch_threads

EXACT = EvalConfig(amp="none")  # fp32 on every CPU: compared with the fp32 primitives below


def _pointwise_model() -> nn.Module:
    # Per-pixel: every tiling of the image must give exactly the whole-image logits.
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_sliding_window_equals_whole_image_for_a_pointwise_model(blend):
    model, x = _pointwise_model(), torch.randn(2, 3, 70, 53)
    whole = predict_logits(model, x, EXACT)
    tiled = sliding_window(model, x, tile=24, overlap=0.5, blend=blend, batch_size=3)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_a_tile_covering_the_image_is_whole_image_inference():
    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=4).eval()
    x = torch.randn(1, 3, 48, 40)
    torch.testing.assert_close(sliding_window(model, x, tile=64), predict_logits(model, x, EXACT))


def test_sliding_window_tiles_cover_every_pixel_of_a_large_image():
    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=4).eval()
    x = torch.randn(1, 3, 150, 97)
    out = sliding_window(model, x, tile=64, overlap=0.25)
    assert out.shape == (1, 3, 150, 97) and torch.isfinite(out).all()


@pytest.mark.parametrize("tile", [572, 252, 204])
def test_overlap_tile_equals_direct_inference_on_the_mirrored_image(tile):
    model = UNet(3, 1, base_channels=4).eval()
    x = torch.randn(1, 1, 300, 250)
    stitched = overlap_tile(model, x, tile=tile)
    # One pass over the whole image, mirror-padded by the 92-pixel context (fits in memory here).
    direct = model(mirror_pad(x, 92, 92 + 388 - 300, 92, 92 + 388 - 250))[:, :, :300, :250]
    assert stitched.shape == (1, 3, 300, 250)
    torch.testing.assert_close(stitched, direct)


def test_valid_unet_whole_image_prediction_uses_overlap_tile():
    model = UNet(2, 1, base_channels=4).eval()
    x = torch.randn(1, 1, 37, 45)  # far too small for one valid pass: mirrored context fills in
    assert predict_logits(model, x, EXACT).shape == (1, 2, 37, 45)


def test_forward_size_is_the_size_each_mode_feeds_the_network():
    padded = densepred.create_model("unet_padded", num_classes=2, in_channels=1, base_channels=4)
    valid = UNet(2, 1, base_channels=4)
    assert forward_size(padded, (360, 480), EvalConfig()) == (360, 480)
    assert forward_size(padded, (360, 480), EvalConfig(mode="slide", tile=256)) == (256, 256)
    assert forward_size(padded, (200, 480), EvalConfig(mode="slide", tile=256)) == (200, 256)  # clipped
    assert forward_size(valid, (37, 45), EvalConfig()) == (572, 572)  # whole on a valid U-Net: overlap-tile
    assert forward_size(valid, (37, 45), EvalConfig(mode="overlap_tile", tile=252)) == (252, 252)


def test_the_probe_input_takes_the_work_size_the_model_accepts():
    from densepred.backends import probe_input

    padded = densepred.create_model("unet_padded", num_classes=2, in_channels=1, base_channels=4)
    assert probe_input(padded, 1).shape == (1, 1, 128, 128)
    assert probe_input(padded, 1, size=(360, 480)).shape == (1, 1, 360, 480)
    valid = UNet(2, 1, base_channels=4)
    assert probe_input(valid, 1, size=(250, 250)).shape == (1, 1, 252, 252)  # the nearest valid tile


def test_mirror_pad_repeats_reflections_beyond_the_image():
    x = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 1, 2, 3)
    padded = mirror_pad(x, 0, 0, 5, 5)
    assert padded[0, 0, 0].tolist() == [1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]  # period 4: 0 1 2 1


def test_flip_tta_is_symmetric():
    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=4).eval()
    x = torch.randn(1, 3, 32, 40)
    a = multi_scale_flip(model, x, (1.0,), flip=True)
    b = multi_scale_flip(model, x.flip(-1), (1.0,), flip=True)
    torch.testing.assert_close(a.flip(-1), b)


def test_multi_scale_fusion():
    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=4).eval()
    x = torch.randn(1, 3, 48, 48)
    single = EvalConfig(amp="none", scales=[1.0], flip=False)
    torch.testing.assert_close(predict_logits(model, x, single), predict_logits(model, x, EXACT))
    mean = predict_logits(model, x, EvalConfig(amp="none", scales=[0.5, 1.0, 1.5], fusion="mean"))
    top = predict_logits(model, x, EvalConfig(amp="none", scales=[0.5, 1.0, 1.5], fusion="max"))
    assert mean.shape == top.shape == (1, 3, 48, 48)
    assert (top >= mean - 1e-5).all()
    with pytest.raises(ValueError, match="scales must be positive"):
        predict_logits(model, x, EvalConfig(scales=[0.0, 1.0]))


def test_tiles_smaller_than_the_model_allows_name_the_minimum():
    with pytest.raises(ValueError, match=r"not one \(next valid: 204, output 20\)"):
        overlap_tile(UNet(2, 1, base_channels=4).eval(), torch.randn(1, 1, 64, 64), tile=200)
    with pytest.raises(ValueError, match="use tile >= 204"):
        overlap_tile(UNet(2, 1, base_channels=4).eval(), torch.randn(1, 1, 64, 64), tile=188)
    padded = densepred.create_model("unet_padded", num_classes=2, in_channels=3, base_channels=4).eval()
    with pytest.raises(ValueError, match="at least 16x16"):
        sliding_window(padded, torch.randn(1, 3, 64, 64), tile=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from densepred.config import load_experiment
    from densepred.trainer import train

    run = tmp_path_factory.mktemp("run")
    exp = load_experiment(
        None,
        [
            "model.name=unet_padded",
            "model.options={base_channels: 4, depth: 2, batch_norm: false}",
            "data.options={num_images: 4, size: 32}",
            "data.augment=none",
            "data.batch_size=2",
            "data.workers=0",
            "train.iterations=2",
            "eval.max_images=1",
            "train.checkpoint_every=0",
        ],
    )
    return train(exp, run, progress=False).checkpoint


def _images(folder, n=3, size=(30, 41)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_predict_command_writes_masks_overlays_and_probabilities(checkpoint, tmp_path, capsys):
    from densepred.cli import main

    images = _images(tmp_path / "in")
    out = tmp_path / "out"
    args = [
        "predict",
        "--checkpoint",
        str(checkpoint),
        str(images / "img0.png"),
        str(images),
        str(tmp_path / "in" / "img*.png"),
        "--out",
        str(out),
        "--probs",
        "--no-progress",
        "--flip",
    ]
    assert main(args) == 0
    masks = sorted(out.glob("img?.png"))
    assert [m.name for m in masks] == ["img0.png", "img1.png", "img2.png"]  # inputs named twice counted once
    mask = Image.open(masks[0])
    assert mask.mode == "P" and mask.size == (41, 30)
    assert mask.getpalette()[3:6] == [230, 25, 75]  # the synthetic set's colour of class 1
    assert np.asarray(mask).max() < 6
    probs = sorted((out / "img0_probs").glob("*.png"))
    assert len(probs) == 6 and probs[0].name == "00_background.png"
    total = sum(np.asarray(Image.open(p), dtype=np.float64) for p in probs)
    assert np.abs(total - 255).max() <= 6  # per-pixel probabilities sum to 1 (8-bit rounding)
    assert (out / "img0_overlay.jpg").is_file() and not list(out.glob("*_overlay.png"))  # JPEG by default
    assert "wrote 3 masks (+ JPEG overlays and probability maps)" in capsys.readouterr().out


@pytest.mark.parametrize("overlay", ["png", "none"])
def test_predict_command_writes_the_overlay_format_asked_for_or_none(checkpoint, tmp_path, capsys, overlay):
    from densepred.cli import main

    images = _images(tmp_path / "in", n=2)
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(out), "--no-progress"]
    assert main([*args, "--overlay", overlay]) == 0
    assert sorted(p.name for p in out.iterdir()) == (
        ["img0.png", "img0_overlay.png", "img1.png", "img1_overlay.png"]
        if overlay == "png"
        else ["img0.png", "img1.png"]
    )
    said = capsys.readouterr().out
    assert ("PNG overlays" in said) == (overlay == "png") and "wrote 2 masks" in said and "JPEG" not in said
    with pytest.raises(SystemExit):  # argparse names the choices
        main([*args, "--overlay", "gif"])
    assert "invalid choice: 'gif'" in capsys.readouterr().err


def test_predict_chooses_the_backend_at_its_first_images_size(checkpoint, tmp_path, monkeypatch):
    import densepred.prediction as prediction
    from densepred.backends import BackendChoice
    from densepred.checkpoint import load_trained
    from densepred.cli import main
    from densepred.models.base import input_rule_of

    probed = []

    def recording(model, backend, example, amp):
        probed.append(tuple(example.shape[-2:]))
        return model, BackendChoice("eager")

    monkeypatch.setattr(prediction, "accelerate", recording)
    images = _images(tmp_path / "in", n=1, size=(90, 61))
    assert (
        main(["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(tmp_path / "o"), "--no-progress"])
        == 0
    )
    rule = input_rule_of(load_trained(checkpoint).model)
    assert probed == [(rule.nearest(90), rule.nearest(61))]
    # Without a known size (a Predictor built from a checkpoint alone), the 128-pixel probe.
    prediction.Predictor.from_checkpoint(checkpoint)
    assert probed[-1] == (rule.nearest(128), rule.nearest(128))


def test_predict_command_errors(checkpoint, tmp_path, capsys):
    from densepred.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["predict", "--checkpoint", str(checkpoint), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "none*.png"), "--out", str(tmp_path)]) == 2
    assert "matches no file" in capsys.readouterr().err
    images = _images(tmp_path / "in")
    blocker = tmp_path / "a_file"  # --out names a file, not a folder: the OS error names it, no traceback
    blocker.write_text("")
    assert main(["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(blocker), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densepred predict: error:") and "a_file" in err and "Traceback" not in err


def test_eval_uses_the_recipes_inference_options_and_crf(checkpoint):
    """eval.flip / eval.crf change what evaluate computes (and CRF probabilities stay valid)."""
    from densepred.build import build_dataset
    from densepred.checkpoint import load_trained
    from densepred.config import EvalConfig
    from densepred.evaluation import evaluate

    trained = load_trained(checkpoint)
    dataset = build_dataset(trained.experiment, "val", train=False)
    plain = evaluate(trained.model, dataset, EvalConfig(max_images=2), progress=False)
    crf = evaluate(trained.model, dataset, EvalConfig(max_images=2, crf="deeplab_v2", flip=True), progress=False)
    assert 0 <= crf["pixel_acc"] <= 1 and plain.keys() == crf.keys()


def test_predict_with_crf(checkpoint, tmp_path):
    from densepred.cli import main

    images = _images(tmp_path / "in", n=1)
    out = tmp_path / "out"
    args = [
        "predict",
        "--checkpoint",
        str(checkpoint),
        str(images),
        "--out",
        str(out),
        "--no-progress",
        "--crf",
        "deeplab_v2",
        "--crf-param",
        "iterations=3",
        "--crf-param",
        "w1=5",
    ]
    assert main(args) == 0
    assert (out / "img0.png").is_file()
    assert main([*args[:-1], "w9=5"]) == 2  # unknown CRF parameter is a clear error


@pytest.mark.parametrize("streams", [1, 2])
def test_predict_over_many_files_reports_each_failure_and_writes_the_rest(checkpoint, tmp_path, capsys, streams):
    """Before: one bad file among good ones stopped the command with nothing written for the others."""
    from densepred.cli import main

    images = _images(tmp_path / "in", n=2)
    (images / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # sorted first
    out = tmp_path / "out"
    source = ["predict", "--checkpoint", str(checkpoint), str(images), "--streams", str(streams)]
    assert main([*source, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "a_broken.png" in err and "1 of 3 inputs failed" in err
    assert sorted(p.name for p in out.glob("img*.png") if "overlay" not in p.name) == ["img0.png", "img1.png"]

    fast = tmp_path / "fast"
    assert main([*source, "--out", str(fast), "--no-progress", "--fail-fast"]) == 2
    assert "a_broken.png" in capsys.readouterr().err
    # Stopped at the first input: only a frame already in flight beside it may have been written.
    assert len([p for p in fast.glob("img*.png") if "overlay" not in p.name]) <= streams - 1


def test_every_stream_runs_on_a_module_of_its_own_share_not_the_predictors_own(checkpoint, monkeypatch):
    """The predictor's own module keeps all the threads; as one of several streams it would
    starve the others, so each stream gets one of the modules stream_models returns."""
    import copy

    from densepred import prediction
    from densepred.prediction import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    own = predictor.model
    shares = [copy.deepcopy(own), copy.deepcopy(own)]
    monkeypatch.setattr(prediction, "stream_models", lambda model, example, streams, limit: shares)
    streams = predictor.in_streams(2)
    assert [s.model for s in streams] == shares and predictor.model is own
    assert all(s.trained is predictor.trained for s in streams)
    monkeypatch.setattr(prediction, "stream_models", lambda model, example, streams, limit: [model])
    assert predictor.in_streams(1) == [predictor]


@pytest.mark.parametrize("streams", [1, 2])
def test_predict_files_over_a_folder_writes_what_one_image_at_a_time_does_and_stops_at_a_failed_write(
    checkpoint, tmp_path, monkeypatch, streams
):
    """A folder's masks are byte for byte one image's at a time, in input order with several
    frames at once too, and a full disk stops the run at once (the frames in flight aside)."""
    import errno

    from densepred import prediction
    from densepred.prediction import Predictor, predict_files, save_index_png

    images = _images(tmp_path / "in", n=3)
    predictor = Predictor.from_checkpoint(checkpoint, options=EvalConfig(streams=streams))
    with torch_threads(2):
        assert len(predictor.in_streams(3)) == streams and len(predictor.in_streams(1)) == 1
        result = predict_files(predictor, [str(images)], tmp_path / "out", progress=False)
    assert [p.name for p in result.written] == ["img0.png", "img1.png", "img2.png"] and not result.failed
    for k in range(3):
        image = np.asarray(Image.open(images / f"img{k}.png").convert("RGB"))
        save_index_png(predictor.labels(image), predictor.trained.palette, tmp_path / f"alone{k}.png")
        assert (tmp_path / f"alone{k}.png").read_bytes() == (tmp_path / "out" / f"img{k}.png").read_bytes()

    calls = []

    def full_disk(labels, palette, path):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(prediction, "save_index_png", full_disk)
    with pytest.raises(OSError, match="No space left"):
        predict_files(predictor, [str(images)], tmp_path / "full", progress=False)
    assert 1 <= len(calls) <= streams  # stopped at the first failed write, not one per image
