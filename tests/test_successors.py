"""DeepLab v3 / v3+, PSPNet and torchvision's FCN-ResNet / DeepLabV3: the papers' structure,
parameter counts, and torchvision's key layout and computation, checked independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import densepred
from densepred.config import TrainConfig
from densepred.losses import RecipeLoss
from densepred.models.layers import FrozenBatchNorm2d

# torchvision's own figures (the weights' "num_params", 21 classes, auxiliary head included).
TORCHVISION_PARAMS = {
    "fcn_resnet50": 35_322_218,
    "fcn_resnet101": 54_314_346,
    "deeplabv3_resnet50": 42_004_074,
    "deeplabv3_resnet101": 60_996_202,
    "deeplabv3_mobilenet_v3_large": 11_029_328,
    "lraspp_mobilenet_v3_large": 3_221_538,
}
# torchvision's resnet50/101 ImageNet models less their 2048 x 1000 fc layer.
RESNET_TRUNK = {50: 25_557_032 - 2_049_000, 101: 44_549_160 - 2_049_000}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name: str, **options):
    with torch.device("meta"):
        return densepred.create_model(name, **options)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_torchvision_models_have_torchvisions_parameter_counts(name):
    assert _count(_meta(name, num_classes=21)) == TORCHVISION_PARAMS[name]


def _bn(c: int) -> int:
    return 2 * c


def _aspp(cin: int, rates: int) -> int:
    branches = (1 + rates) * 0 + cin * 256 + _bn(256) + rates * (9 * cin * 256 + _bn(256)) + cin * 256 + _bn(256)
    return branches + (rates + 2) * 256 * 256 + _bn(256)


def test_paper_models_parameter_counts_from_their_layer_tables():
    k = 21
    v3 = RESNET_TRUNK[101] + _aspp(2048, 3) + 256 * k + k  # v3 Sec. 3.3: ASPP, then the 1x1 scores
    assert _count(_meta("deeplabv3", num_classes=k)) == v3
    decoder = 256 * 48 + _bn(48) + 9 * (256 + 48) * 256 + _bn(256) + 9 * 256 * 256 + _bn(256) + 256 * k + k
    assert _count(_meta("deeplabv3plus", num_classes=k)) == RESNET_TRUNK[101] + _aspp(2048, 3) + decoder
    # PSPNet: the deep stem replaces the 7x7 (and layer1's first block takes 128 channels).
    stem = 9 * 3 * 64 + _bn(64) + 9 * 64 * 64 + _bn(64) + 9 * 64 * 128 + _bn(128)
    trunk = RESNET_TRUNK[101] - (49 * 3 * 64 + _bn(64)) + stem + (128 - 64) * (64 + 256)
    ppm = 4 * (2048 * 512 + _bn(512))
    head = 9 * 4096 * 512 + _bn(512) + 512 * k + k
    aux = 9 * 1024 * 256 + _bn(256) + 256 * k + k
    assert _count(_meta("pspnet", num_classes=k)) == trunk + ppm + head + aux


@pytest.mark.parametrize(
    ("output_stride", "rates", "grid"), [(16, (6, 12, 18), (2, 4, 8)), (8, (12, 24, 36), (4, 8, 16))]
)
def test_deeplabv3_aspp_rates_and_multi_grid_follow_the_output_stride(output_stride, rates, grid):
    model = densepred.create_model("deeplabv3", num_classes=3, depth=50, output_stride=output_stride).eval()
    aspp = model.aspp()
    assert aspp.rates == rates
    assert [branch[0].dilation[0] for branch in aspp.convs[1:4]] == list(rates)
    assert isinstance(aspp.convs[4][0], torch.nn.AdaptiveAvgPool2d)  # image-level features
    assert tuple(b.conv2.dilation[0] for b in model.backbone.layer4) == grid  # rate x (1, 2, 4)
    x = torch.randn(1, 3, 65, 49)
    assert model.coarse_scores(x).logits.shape[-2:] == (-(-65 // output_stride), -(-49 // output_stride))
    assert model(x).shape == (1, 3, 65, 49)


def test_deeplabv3plus_decodes_at_stride_4():
    model = densepred.create_model("deeplabv3plus", num_classes=3, depth=50).eval()
    assert model.decoder.reduce[0].out_channels == 48 and model.decoder.reduce[0].in_channels == 256
    assert model.output_stride == 4 and model.encoder_stride == 16 and model.aspp().rates == (6, 12, 18)
    x = torch.randn(1, 3, 67, 45)
    assert model.coarse_scores(x).logits.shape[-2:] == (17, 12)
    assert model(x).shape == (1, 3, 67, 45)


def test_torchvisions_dilation_rule_keeps_the_previous_rate_in_a_stages_first_block():
    backbone = _meta("deeplabv3_resnet50").backbone
    assert [b.conv2.dilation[0] for b in backbone.layer3][:2] == [1, 2]
    assert [b.conv2.dilation[0] for b in backbone.layer4] == [2, 4, 4]
    paper = _meta("pspnet", depth=50).backbone  # DeepLab's and PSPNet's rule: the stage's rate throughout
    assert {b.conv2.dilation[0] for b in paper.layer3} == {2} and {b.conv2.dilation[0] for b in paper.layer4} == {4}


def test_pspnet_pyramid_bins_and_auxiliary_head():
    model = densepred.create_model("pspnet", num_classes=3, depth=50)
    ppm = model.pyramid()
    assert ppm.bins == (1, 2, 3, 6) and ppm.out_channels == 4096
    assert all(stage[1].out_channels == 512 for stage in ppm.stages)  # 1/4 of 2048 each
    assert model.backbone.conv1_1.stride == (2, 2) and model.backbone.conv1_3.out_channels == 128  # deep stem
    x = torch.randn(2, 3, 57, 41)
    model.train()
    out = model(x)
    assert set(out) == {"fused", "aux"} and out["aux"].shape == (2, 3, 57, 41)
    assert model.loss_weights() == {"aux": 0.4}
    model.eval()
    assert model(x).shape == (2, 3, 57, 41)


def test_auxiliary_losses_are_weighted():
    loss = RecipeLoss(TrainConfig(), 255, torch.device("cpu"), crop_target=False, branch_weights={"aux": 0.4})
    main, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    expected = F.cross_entropy(main, target) + 0.4 * F.cross_entropy(aux, target)
    torch.testing.assert_close(loss({"fused": main, "aux": aux}, target, None), expected)


# ---------------------------------------------------------------------------------------------
# torchvision's layout and computation, written out here without looking at our modules.


def _torchvision_keys(depth: int, head: str) -> set[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"backbone.conv1.weight", *(f"backbone.bn1.{p}" for p in bn)}
    for stage, blocks in enumerate({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth], start=1):
        for b in range(blocks):
            prefix = f"backbone.layer{stage}.{b}"
            for i in (1, 2, 3):
                keys |= {f"{prefix}.conv{i}.weight", *(f"{prefix}.bn{i}.{p}" for p in bn)}
            if b == 0:
                keys |= {f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{p}" for p in bn)}

    def fcn_head(name: str) -> set[str]:
        return {f"{name}.0.weight", *(f"{name}.1.{p}" for p in bn), f"{name}.4.weight", f"{name}.4.bias"}

    keys |= fcn_head("aux_classifier")
    if head == "fcn":
        return keys | fcn_head("classifier")
    for i in range(4):
        keys |= {f"classifier.0.convs.{i}.0.weight", *(f"classifier.0.convs.{i}.1.{p}" for p in bn)}
    keys |= {"classifier.0.convs.4.1.weight", *(f"classifier.0.convs.4.2.{p}" for p in bn)}
    keys |= {"classifier.0.project.0.weight", *(f"classifier.0.project.1.{p}" for p in bn)}
    keys |= {"classifier.1.weight", *(f"classifier.2.{p}" for p in bn), "classifier.4.weight", "classifier.4.bias"}
    return keys


def _bn_apply(x, sd, name):
    return F.batch_norm(
        x,
        sd[f"{name}.running_mean"],
        sd[f"{name}.running_var"],
        sd[f"{name}.weight"],
        sd[f"{name}.bias"],
        training=False,
        eps=1e-5,
    )


def _torchvision_resnet(x, sd, depth):
    """torchvision's resnet with replace_stride_with_dilation=[False, True, True]: a stage that
    trades its stride multiplies the running dilation, and its first block keeps the old one."""
    x = F.relu(_bn_apply(F.conv2d(x, sd["backbone.conv1.weight"], stride=2, padding=3), sd, "backbone.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    feats, dilation = {}, 1
    for stage, (blocks, stride, dilate) in enumerate(
        zip({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth], (1, 2, 2, 2), (False, False, True, True), strict=True), 1
    ):
        previous = dilation
        if dilate:
            dilation, stride = dilation * stride, 1
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            d = previous if b == 0 else dilation
            s = stride if b == 0 else 1
            out = F.relu(_bn_apply(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            out = F.relu(
                _bn_apply(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=d, dilation=d), sd, f"{p}.bn2")
            )
            out = _bn_apply(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            if b == 0:
                x = _bn_apply(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), sd, f"{p}.downsample.1")
            x = F.relu(out + x)
        feats[stage] = x
    return feats


def _torchvision_fcn_head(x, sd, name):
    x = F.relu(_bn_apply(F.conv2d(x, sd[f"{name}.0.weight"], padding=1), sd, f"{name}.1"))
    return F.conv2d(x, sd[f"{name}.4.weight"], sd[f"{name}.4.bias"])


def _torchvision_deeplab_head(x, sd):
    c = "classifier.0.convs"
    branches = [F.relu(_bn_apply(F.conv2d(x, sd[f"{c}.0.0.weight"]), sd, f"{c}.0.1"))]
    for i, rate in enumerate((12, 24, 36), start=1):
        conv = F.conv2d(x, sd[f"{c}.{i}.0.weight"], padding=rate, dilation=rate)
        branches.append(F.relu(_bn_apply(conv, sd, f"{c}.{i}.1")))
    pooled = F.relu(_bn_apply(F.conv2d(x.mean((2, 3), keepdim=True), sd[f"{c}.4.1.weight"]), sd, f"{c}.4.2"))
    branches.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
    y = F.relu(
        _bn_apply(F.conv2d(torch.cat(branches, 1), sd["classifier.0.project.0.weight"]), sd, "classifier.0.project.1")
    )
    y = F.relu(_bn_apply(F.conv2d(y, sd["classifier.1.weight"], padding=1), sd, "classifier.2"))
    return F.conv2d(y, sd["classifier.4.weight"], sd["classifier.4.bias"])


def _random_state(keys: set[str], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for k in sorted(keys):
        shape = shapes[k]
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(0)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("bn1.weight") or ".bn" in k and k.endswith("weight"):
            state[k] = torch.rand(shape, generator=g) * 0.5 + 0.5
        else:
            fan_in = shape[1:].numel() if len(shape) > 1 else 1
            state[k] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


@pytest.mark.parametrize(("name", "head"), [("fcn_resnet50", "fcn"), ("deeplabv3_resnet50", "deeplab")])
def test_a_file_in_torchvisions_layout_loads_strict_and_computes_what_torchvision_computes(name, head):
    model = densepred.create_model(name, num_classes=5)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    keys = _torchvision_keys(50, head)
    assert set(shapes) == keys  # key for key
    state = _random_state(keys, shapes)
    model.load_state_dict(state, strict=True)
    model.eval()
    for size in ((33, 45), (50, 37)):
        x = torch.randn(1, 3, *size)
        with torch.inference_mode():
            ours = model.outputs(x)
            feats = _torchvision_resnet(x, state, 50)
            main = (
                _torchvision_fcn_head(feats[4], state, "classifier")
                if head == "fcn"
                else _torchvision_deeplab_head(feats[4], state)
            )
            aux = _torchvision_fcn_head(feats[3], state, "aux_classifier")
        for got, expected in ((ours["out"], main), (ours["aux"], aux)):
            expected = F.interpolate(expected, size=size, mode="bilinear", align_corners=False)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), ours["out"])


def test_deeplabv3_mobilenet_taps_torchvisions_stage_indices():
    model = densepred.create_model("deeplabv3_mobilenet_v3_large", num_classes=3).eval()
    assert model.backbone.taps == {"out": 16, "aux": 4}
    assert model.output_stride == 16 and model.backbone.feature_info["aux"].stride == 8
    assert model.aux_classifier[0].in_channels == 40 and model.aspp().convs[1][0].in_channels == 960
    keys = set(model.state_dict())
    assert {"backbone.16.0.weight", "classifier.0.convs.4.1.weight", "aux_classifier.4.bias"} <= keys
    assert not any(k.startswith("backbone.17") for k in keys)
    x = torch.randn(1, 3, 57, 75)
    out = model.outputs(x)
    assert out["out"].shape == out["aux"].shape == (1, 3, 57, 75)


def test_torchvision_keys_of_the_101_layer_models():
    assert set(_meta("deeplabv3_resnet101", num_classes=21).state_dict()) == _torchvision_keys(101, "deeplab")
    assert set(_meta("fcn_resnet101", num_classes=21).state_dict()) == _torchvision_keys(101, "fcn")


def test_frozen_batch_norm_is_not_used_by_the_successors():
    # Their recipes train batch norm (v3 Sec. 4.1: "batch normalization parameters are fine-tuned").
    for name in ("deeplabv3", "deeplabv3plus", "pspnet", "deeplabv3_resnet50"):
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in _meta(name).modules())


def test_median_frequency_class_weights_are_computed_from_the_training_masks(tmp_path):
    import yaml

    from densepred.build import build_dataset
    from densepred.data.stats import compute_stats, median_frequency_weights
    from densepred.trainer import train
    from tiny import tiny_experiment

    exp = tiny_experiment("train.class_weights=median_frequency")
    train(exp, tmp_path, progress=False)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    expected = median_frequency_weights(compute_stats(build_dataset(exp, "train", train=True)))
    assert saved["train"]["class_weights"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert saved["resolved"]["class_weights"] == saved["train"]["class_weights"]
    assert len(expected) == 6 and (expected > 0).any()


SUCCESSORS_SMALL = {
    "fcn_resnet50": {},
    "deeplabv3_resnet50": {},
    "deeplabv3_mobilenet_v3_large": {},
    "lraspp_mobilenet_v3_large": {},
    "deeplabv3": {"depth": 50},
    "deeplabv3plus": {"depth": 50},
    "pspnet": {"depth": 50},
    "segnet": {},
}


# Three in the default tier (taps + ASPP pooling, the pyramid, unpooling), all in the slow tier.
_PICTURE_DEFAULT = {"deeplabv3_mobilenet_v3_large", "pspnet", "segnet"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[] if n in _PICTURE_DEFAULT else [pytest.mark.slow]) for n in sorted(SUCCESSORS_SMALL)],
)
def test_heat_maps_and_feature_maps_work_for_every_successor(name):
    from densepred.visualize import class_heatmaps, default_layers, feature_maps

    model = densepred.create_model(name, num_classes=4, **SUCCESSORS_SMALL[name]).eval()
    image = torch.randn(3, 97, 81)
    maps = class_heatmaps(model, image, 2)
    assert maps.dense.shape == (97, 81)
    assert maps.coarse.shape == model.coarse_scores(image[None]).logits.shape[-2:]
    assert maps.stride == model.output_stride
    layers = default_layers(model)
    features = feature_maps(model, image, layers, top_k=2)
    assert list(features) == layers and all(f.channels.shape[0] == 2 for f in features.values())
    strides = [f.stride for f in features.values()]
    assert strides == sorted(strides) and strides[-1] > 1  # shallow to deep


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param("lraspp_mobilenet_v3_large", "{}", marks=pytest.mark.slow),
        pytest.param("pspnet", "{depth: 50}", marks=pytest.mark.slow),
    ],
)
def test_the_server_segments_with_a_successor(name, options, tmp_path):
    pytest.importorskip("fastapi")
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from densepred.prediction import Predictor
    from densepred.serve import create_app
    from tiny import tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path, f"model.name={name}", f"model.options={options}", "data.batch_size=2")
    predictor = Predictor.from_checkpoint(checkpoint)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(buf, format="PNG")
    with TestClient(create_app(predictor, memory_budget=2**30)) as client:
        r = client.post("/api/segment", files={"image": ("a.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (90, 70)
