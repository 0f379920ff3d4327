"""Heat maps and feature maps: FCN's coarse-vs-dense geometry (Sec. 3.1, 3.3), ZFNet-style hooks, the CLI."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import densepred
from densepred.cli import main
from densepred.data.synthetic import SyntheticShapes
from densepred.models.backbones import VGG16
from densepred.models.backbones.vgg import vgg16_classifier
from densepred.models.fcn import FCN_CROP_OFFSETS
from densepred.models.layers import centre_geometry
from densepred.visualize import (
    class_heatmaps,
    classifier_heatmap,
    default_layers,
    feature_maps,
    resolve_layer,
)
from densepred.weights import WeightsError, load_vgg16_classifier, vgg16_classifier_key
from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("unet"))


@pytest.fixture(scope="module")
def deeplab_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("deeplab"), "model.name=deeplab_v1_largefov", "model.options={}")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(SyntheticShapes("val", num_images=1, size=(56, 72)).load(0)[0]).save(path)
    return path


def _cli(*argv):
    return main([str(a) for a in argv])


def _tiny_classifier(classes=5):
    """Three conv+pool stages (stride 8) and two fully connected layers, trained at 16x16."""

    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    features = nn.Sequential(*stage(3, 4), *stage(4, 8), *stage(8, 8))
    return nn.Sequential(features, nn.Flatten(1), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


# --------------------------------------------------------------------------------------------
# Geometry: paper facts


def test_geometry_reproduces_fcn32s_crop_offset_and_the_vgg16_window_centre():
    with torch.device("meta"):
        fcn = densepred.create_model("fcn32s")
        classifier = densepred.convolutionalize(vgg16_classifier(1000), (224, 224))
    chain = [getattr(fcn.backbone, n) for n in fcn.backbone.layer_names] + [fcn.fc6, fcn.fc7, fcn.score_fr]
    # The 64-pixel deconvolution centres cell j on 32 j + 31.5; FCN-32s crops 19 (Caffe's crop layer).
    assert centre_geometry(chain) == (32, 31.5 - FCN_CROP_OFFSETS["upscore32"]) == (32, 12.5)
    # A 224x224 image is one window of VGG16, centred on the image's centre pixel (223 / 2).
    assert centre_geometry(classifier) == (32, 111.5)


# --------------------------------------------------------------------------------------------
# Heat maps


def test_classifier_heatmap_on_a_larger_image():
    classifier = _tiny_classifier()
    image = torch.randn(3, 48, 64)
    maps = classifier_heatmap(classifier, image, 2, (16, 16), padding=1)
    # Only windows wholly inside: (48 - 16) / 8 + 1 by (64 - 16) / 8 + 1.
    assert maps.coarse.shape == (5, 7) and maps.dense.shape == (48, 64) and maps.stride == 8
    assert maps.offset == 7.5  # 0.5 + 1 + 2 from the three poolings, + 8 * 0.5 from the 2x2 "fc" kernel
    # At the training size the net is the classifier: one cell, the classifier's probability.
    with torch.no_grad():
        window = float(torch.softmax(classifier(image[None, :, :16, :16]), 1)[0, 2])
    one = classifier_heatmap(classifier, image[:, :16, :16], 2, (16, 16), padding=1)
    assert one.coarse.shape == (1, 1) and one.coarse[0, 0] == pytest.approx(window, abs=1e-6)
    padded = classifier_heatmap(classifier, image, 2, (16, 16))  # FCN's padding of 100: windows cover every pixel
    assert padded.coarse.shape[0] > maps.coarse.shape[0] and not np.isnan(padded.dense).any()
    assert classifier.training is False and all(p.requires_grad for p in classifier.parameters())


@pytest.mark.parametrize("padding", [1, 100])
def test_dense_map_is_the_bilinear_upsampling_of_the_coarse_grid(padding):
    """FCN-32s' fixed deconvolution: between cell centres, dense = bilinear interpolation of coarse."""
    maps = classifier_heatmap(_tiny_classifier(), torch.randn(3, 48, 64), 1, (16, 16), padding=padding)
    s, o = maps.stride, maps.offset
    rows, cols = np.arange(48), np.arange(64)
    centres_r, centres_c = o + s * np.arange(maps.coarse.shape[0]), o + s * np.arange(maps.coarse.shape[1])
    along_cols = np.stack([np.interp(cols, centres_c, row) for row in maps.coarse])
    expected = np.stack([np.interp(rows, centres_r, col) for col in along_cols.T], 1)
    inside_r = (rows >= centres_r[0]) & (rows <= centres_r[-1])
    inside_c = (cols >= centres_c[0]) & (cols <= centres_c[-1])
    assert inside_r.sum() >= 30 and inside_c.sum() >= 40
    np.testing.assert_allclose(maps.dense[np.ix_(inside_r, inside_c)], expected[np.ix_(inside_r, inside_c)], atol=1e-5)


def test_fcn32s_dense_output_interpolates_its_stride32_scores():
    """FCN-32s: the output is the score_fr grid upsampled, cell j on pixel 32 j + 12.5."""
    model = densepred.create_model("fcn32s", num_classes=2).eval()
    nn.init.normal_(model.score_fr.weight, std=1.0)  # zero-initialised (Sec. 4.3): give it scores
    maps = class_heatmaps(model, torch.randn(3, 32, 40), 1)
    assert (maps.stride, maps.offset) == (32, 12.5) and maps.dense.shape == (32, 40)
    assert maps.coarse.shape == (2, 2)  # (32 + 198) / 32 -> 8 after pool5, minus fc6's 7x7 -> 2
    # Two classes: P(1) = sigmoid(score_1 - score_0); the deconvolution interpolates the scores.
    diff = np.log(maps.coarse / (1 - maps.coarse))
    pix = np.arange(13, 32)  # between the centres of cells 0 and 1 (12.5, 44.5), inside the image
    t = (pix - 12.5) / 32
    rows = diff[0] + (diff[1] - diff[0]) * t[:, None]  # along rows, then along columns
    scores = rows[:, :1] + (rows[:, 1:] - rows[:, :1]) * t[None, :]
    expected = 1 / (1 + np.exp(-scores))
    np.testing.assert_allclose(maps.dense[np.ix_(pix, pix)], expected, atol=1e-4)


def test_heatmap_cli_writes_pngs_for_unet_and_deeplab(tmp_path, scene, unet_ckpt, deeplab_ckpt):
    out = tmp_path / "unet.png"
    assert _cli("heatmap", scene, "--checkpoint", unet_ckpt, "--class", "disk", "--out", out, "--device", "cpu") == 0
    assert Image.open(out).size[0] > 300
    out = tmp_path / "deeplab.png"
    assert _cli("heatmap", scene, "--checkpoint", deeplab_ckpt, "--class", "2", "--out", out, "--size", "65") == 0
    assert Image.open(out).format == "PNG"


def test_deeplab_heatmaps_are_stride8(deeplab_ckpt):
    from densepred.checkpoint import load_trained

    trained = load_trained(deeplab_ckpt)
    maps = class_heatmaps(trained.model, torch.randn(3, 65, 81), 3)
    assert (maps.stride, maps.offset, maps.coarse.shape, maps.dense.shape) == (8, 0.0, (9, 11), (65, 81))


# --------------------------------------------------------------------------------------------
# Feature maps


def test_feature_hooks_return_layers_at_their_strides_strongest_first():
    backbone = VGG16().eval()
    image = torch.randn(3, 32, 48)
    feats = feature_maps(backbone, image, ["pool3", "conv1_2"], top_k=5)
    assert list(feats) == ["conv1_2", "pool3"]  # the order they ran: shallow first
    assert feats["conv1_2"].channels.shape == (5, 32, 48) and feats["conv1_2"].stride == 1
    assert feats["pool3"].channels.shape == (5, 4, 6) and feats["pool3"].stride == 8
    # The recorded conv1_2 is relu1_2's output (the in-place ReLU did not alter the clone later).
    with torch.no_grad():
        x = backbone.relu1_2(backbone.conv1_2(backbone.relu1_1(backbone.conv1_1(image[None]))))[0]
    means = x.mean((1, 2))
    f = feats["conv1_2"]
    assert list(f.indices) == torch.argsort(means, descending=True)[:5].tolist()
    np.testing.assert_allclose(f.strength, means[f.indices].numpy(), rtol=1e-5)
    assert (np.diff(f.strength) <= 0).all() and f.num_channels == 64 and (f.channels >= 0).all()


def test_feature_maps_are_cropped_to_the_image_under_fcn_padding():
    backbone = VGG16(first_padding=100).eval()  # FCN's conv1_1: conv1_2 is 230x230 for a 32x32 image
    feats = feature_maps(backbone, torch.randn(3, 32, 32), ["conv1_2", "pool4"], top_k=2)
    assert feats["conv1_2"].channels.shape == (2, 32, 32) and feats["conv1_2"].stride == 1
    assert feats["pool4"].stride == 16 and feats["pool4"].channels.shape[-2:] == (2, 2)


def test_unet_default_layers_and_narrow_layers_keep_all_channels(unet_ckpt):
    from densepred.checkpoint import load_trained

    model = load_trained(unet_ckpt).model
    feats = feature_maps(model, torch.randn(3, 32, 32), default_layers(model), top_k=100)
    assert list(feats) == ["down.0", "down.2", "dec.0", "dec.1"]
    assert [f.stride for f in feats.values()] == [1, 4, 2, 1]
    assert [f.channels.shape[0] for f in feats.values()] == [4, 16, 8, 4]  # fewer channels than top_k: all


def test_layer_names_resolve_by_unique_suffix_with_helpful_errors():
    with torch.device("meta"):
        fcn = densepred.create_model("fcn8s")
        deeplab = densepred.create_model("deeplab_v2_vgg16")  # four ASPP branches, each with an fc7
    assert resolve_layer(fcn, "conv1_2") == "backbone.conv1_2" and resolve_layer(fcn, "fc7") == "fc7"
    assert resolve_layer(deeplab, "head.branches.1.fc7") == "head.branches.1.fc7"
    assert default_layers(fcn) == ["backbone.conv1_2", "backbone.conv3_3", "backbone.conv5_3", "fc7"]
    with pytest.raises(ValueError, match=r"ambiguous.*head\.branches\.0\.fc7.*head\.branches\.3\.fc7"):
        resolve_layer(deeplab, "fc7")
    with pytest.raises(ValueError, match=r"no layer 'conv1_3'; close matches: .*conv1_2.*valid names include"):
        resolve_layer(fcn, "conv1_3")


def test_features_cli_writes_a_grid(tmp_path, scene, deeplab_ckpt, unet_ckpt):
    out = tmp_path / "deeplab.png"
    assert _cli("features", scene, "--checkpoint", deeplab_ckpt, "--out", out, "--top-k", "3") == 0
    assert Image.open(out).size[1] > 300
    out = tmp_path / "unet.png"
    assert _cli("features", scene, "--checkpoint", unet_ckpt, "--layers", "down.0", "dec.1", "--out", out) == 0
    assert out.is_file()


# --------------------------------------------------------------------------------------------
# User errors


@pytest.mark.parametrize(
    ("cls", "message"),
    [("zebra", r"unknown class 'zebra'; the checkpoint's classes are: background, disk, square"), ("6", r"0\.\.5")],
)
def test_heatmap_cli_class_errors(tmp_path, scene, unet_ckpt, capsys, cls, message):
    assert _cli("heatmap", scene, "--checkpoint", unet_ckpt, "--class", cls, "--out", tmp_path / "x.png") == 2
    assert not (tmp_path / "x.png").exists()
    assert re.search(message, capsys.readouterr().err)


def test_cli_reports_unreadable_images_unknown_layers_and_missing_weights(tmp_path, scene, unet_ckpt, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert _cli("heatmap", broken, "--checkpoint", unet_ckpt, "--class", "disk") == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
    assert _cli("features", scene, "--checkpoint", unet_ckpt, "--layers", "down.9") == 2
    assert "no layer 'down.9'" in capsys.readouterr().err
    assert _cli("heatmap", scene, "--classifier", "vgg16", "--weights", tmp_path / "none.pth", "--class", "1") == 2
    assert "none.pth does not exist" in capsys.readouterr().err
    assert _cli("heatmap", scene, "--classifier", "vgg16", "--class", "1") == 2
    assert "needs --weights" in capsys.readouterr().err
    assert _cli("heatmap", scene, "--classifier", "vgg16", "--weights", "x.pth", "--class", "tabby") == 2
    assert "give the class id 0..999" in capsys.readouterr().err


def test_vgg16_classifier_weights_mapping(tmp_path):
    with torch.device("meta"):
        ours = vgg16_classifier(1000).state_dict()
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision's features.N of conv1_1 ... conv5_3
    torchvision = [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    torchvision += [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    assert sorted(vgg16_classifier_key(k) for k in torchvision) == sorted(ours)
    backbone_only = tmp_path / "vgg16_features.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, backbone_only)
    with pytest.raises(WeightsError, match=r"no ImageNet classifier \(classifier\.6, fc8\)"):
        load_vgg16_classifier(backbone_only)


def test_colorize_and_the_overlay_files_keep_each_class_colour(tmp_path):
    """Class ids of any integer dtype map to their palette colour, 255 (ignore) to the ignore
    colour, out-of-range ids to the nearest table end; the overlay PNG decodes to the blend, the
    JPEG to within JPEG's loss, and any other suffix is refused."""
    import cv2

    from densepred.data.labels import IGNORE_INDEX, colorize
    from densepred.prediction import overlay, save_overlay

    palette = [(10, 20, 30), (200, 100, 50), (0, 255, 0)]
    mask = np.array([[0, 1, 2], [IGNORE_INDEX, 1, 0]], dtype=np.uint8)
    expected = np.array([[palette[0], palette[1], palette[2]], [(0, 0, 0), palette[1], palette[0]]], np.uint8)
    assert colorize(mask, palette).dtype == np.uint8
    np.testing.assert_array_equal(colorize(mask, palette), expected)
    np.testing.assert_array_equal(colorize(mask.astype(np.int64), palette), expected)
    np.testing.assert_array_equal(colorize(np.array([[-3, 300]]), palette)[0, 0], palette[0])  # clipped to 0
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)

    def written(name: str) -> np.ndarray:
        return cv2.cvtColor(cv2.imread(str(save_overlay(image, mask, palette, tmp_path / name))), cv2.COLOR_BGR2RGB)

    np.testing.assert_array_equal(written("o.png"), overlay(image, mask, palette))  # PNG is lossless
    # A larger frame for JPEG, whose loss is per 8x8 block: class regions over a smooth photo.
    rng = np.random.default_rng(1)
    image = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (64, 48), interpolation=cv2.INTER_LINEAR)
    mask = np.repeat(np.repeat(rng.integers(0, 3, (3, 4), dtype=np.uint8), 16, 0), 16, 1)
    blend = overlay(image, mask, palette).astype(int)
    error = np.abs(written("o.jpg").astype(int) - blend)
    assert error.mean() < 3 and np.percentile(error, 99) < 24, (error.mean(), error.max())
    assert (written("o.JPEG") == written("o.jpg")).all()
    with pytest.raises(ValueError, match=r"o\.gif: an overlay is written as \.jpg, \.jpeg or \.png"):
        save_overlay(image, mask, palette, tmp_path / "o.gif")
