"""Pretrained weights: verified fetching, safe reading, and layouts that compute what they define.

Every weight file here is built by the test. The network never leaves 127.0.0.1: downloads come
from the ``http_server`` fixture (``tests/http_server.py``, a server in a thread). Big fully
connected layers are Hankel matrices (``w[o, j] = s[o + j]``) saved as strided views of a small
storage: a 400 MB fc6 costs 100 kB on disk, yet every entry depends on both its row and its
column, so a wrong flatten order, channel or tap shows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import densepred
from densepred import weights
from densepred.catalogue import IMAGENET_RGB as IMAGENET
from densepred.catalogue import Digest
from densepred.models.backbones import VGG16, ResNet, vgg16_classifier
from densepred.models.backbones.mobilenetv3 import FeatureTaps, MobileNetV3Large
from densepred.models.unet import UNet
from densepred.weights import WeightsError, WeightsWarning

VGG_CONVS = [  # (name, in, out, torchvision features index)
    ("conv1_1", 3, 64, 0), ("conv1_2", 64, 64, 2),
    ("conv2_1", 64, 128, 5), ("conv2_2", 128, 128, 7),
    ("conv3_1", 128, 256, 10), ("conv3_2", 256, 256, 12), ("conv3_3", 256, 256, 14),
    ("conv4_1", 256, 512, 17), ("conv4_2", 512, 512, 19), ("conv4_3", 512, 512, 21),
    ("conv5_1", 512, 512, 24), ("conv5_2", 512, 512, 26), ("conv5_3", 512, 512, 28),
]  # fmt: skip
VGG_FCS = {"fc6": (4096, 25088, 0), "fc7": (4096, 4096, 3), "fc8": (1000, 4096, 6)}  # (out, in, classifier index)
POOL_AFTER = {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}


def hankel(rows: int, cols: int, scale: float) -> torch.Tensor:
    return (torch.randn(rows + cols) * scale).as_strided((rows, cols), (1, 1))


def expanded(shape, value: float = 0.0) -> torch.Tensor:
    """A constant tensor of any shape backed by one number (tiny on disk)."""
    return torch.full((1,), value).expand(*shape)


# ---------------------------------------------------------------------------------------------
# VGG16 sources: one set of tensors, written in either layout


@pytest.fixture(scope="module")
def vgg_src() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    src = {}
    for name, cin, cout, _ in VGG_CONVS:
        w = torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
        src[name] = (w, torch.randn(cout, generator=gen) * 0.1)
    torch.manual_seed(2)
    for name, (cout, cin, _) in VGG_FCS.items():
        src[name] = (hankel(cout, cin, (2.0 / cin) ** 0.5), torch.randn(cout) * 0.1)
    return src


def tv_vgg16(src) -> dict[str, torch.Tensor]:
    out = {}
    for name, _, _, idx in VGG_CONVS:
        out[f"features.{idx}.weight"], out[f"features.{idx}.bias"] = src[name]
    for name, (_, _, idx) in VGG_FCS.items():
        out[f"classifier.{idx}.weight"], out[f"classifier.{idx}.bias"] = src[name]
    return out


def caffe_vgg16(src) -> dict[str, torch.Tensor]:
    out = {}
    for name, (w, b) in src.items():
        if name == "fc6":  # as in FCN's convolutionalized Caffe nets: (4096, 512, 7, 7)
            w = w.reshape(4096, 512, 7, 7)
        out[f"{name}.0"], out[f"{name}.1"] = w, b
    return out


def vgg16_reference(src, x: torch.Tensor) -> torch.Tensor:
    """torchvision's VGG16 up to fc7 (before its ReLU), written out with functional ops."""
    for name, _, _, _ in VGG_CONVS:
        x = F.relu(F.conv2d(x, *src[name], padding=1))
        if name in POOL_AFTER:
            x = F.max_pool2d(x, 2, 2)
    x = F.relu(F.linear(x.flatten(1), *src["fc6"]))
    return F.linear(x, *src["fc7"])


@pytest.fixture(scope="module")
def tv_vgg_file(vgg_src, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16-tv.pth"
    torch.save(tv_vgg16(vgg_src), path)
    return path


def test_torchvision_vgg16_in_fcn_computes_the_imagenet_classifier(vgg_src, tv_vgg_file):
    """FCN Sec. 3.1: convolutionalized fc6/fc7 compute the classifier at 224x224."""
    model = densepred.create_model("fcn32s").eval()
    report = weights.load_pretrained(model, tv_vgg_file)
    assert report.layout == "torchvision-vgg16"
    assert report.ignored == ("classifier.6.bias", "classifier.6.weight")  # ImageNet fc8, by design
    x = torch.randn(1, 3, 224, 224)
    backbone = model.backbone
    backbone.conv1_1.padding = (1, 1)  # torchvision's VGG16; FCN's padding 100 is not in the file
    try:
        with torch.no_grad():
            ours = model.fc7(F.relu(model.fc6(backbone(x)["pool5"])))
    finally:
        backbone.conv1_1.padding = (100, 100)
    ref = vgg16_reference(vgg_src, x)
    assert ours.shape == (1, 4096, 1, 1)
    torch.testing.assert_close(ours.flatten(1), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not model.score_fr.weight.any()  # class scoring stays zero-initialised (FCN Sec. 4.3)


def test_caffe_vgg16_loads_the_same_network(vgg_src, tmp_path):
    """Same tensors as the torchvision test, Caffe names: the same network (fc6 stored 4-D here)."""
    path = tmp_path / "vgg16-caffe.pth"
    torch.save(caffe_vgg16(vgg_src), path)
    model = densepred.create_model("fcn32s")
    report = weights.load_pretrained(model, path)
    assert report.layout == "caffe-vgg16" and report.ignored == ("fc8.0", "fc8.1")
    for name, _, _, _ in VGG_CONVS:
        conv = getattr(model.backbone, name)
        assert torch.equal(conv.weight, vgg_src[name][0]) and torch.equal(conv.bias, vgg_src[name][1]), name
    assert torch.equal(model.fc6.weight, vgg_src["fc6"][0].reshape(4096, 512, 7, 7))
    assert torch.equal(model.fc7.weight, vgg_src["fc7"][0].reshape(4096, 4096, 1, 1))
    assert torch.equal(model.fc7.bias, vgg_src["fc7"][1])


def test_largefov_decimates_fc6_and_fc7_by_the_documented_taps(vgg_src, tv_vgg_file):
    """DeepLab v1: fc6 7x7x4096 -> 3x3 (taps 0, 3, 6) x 1024 (every 4th); fc7 every 4th in and out."""
    model = densepred.create_model("deeplab_v1_largefov", pretrained=str(tv_vgg_file))
    keep, taps = torch.arange(0, 4096, 4), torch.tensor([0, 3, 6])
    w6 = vgg_src["fc6"][0].reshape(4096, 512, 7, 7).index_select(0, keep).index_select(2, taps).index_select(3, taps)
    head = model.head
    assert torch.equal(head.fc6.weight, w6)
    assert torch.equal(head.fc6.bias, vgg_src["fc6"][1][keep])
    assert torch.equal(head.fc7.weight[:, :, 0, 0], vgg_src["fc7"][0][keep][:, keep])
    assert torch.equal(head.fc7.bias, vgg_src["fc7"][1][keep])
    assert torch.equal(model.backbone.conv3_2.weight, vgg_src["conv3_2"][0])
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 65, 65))).all()


def test_decimate_fc_keeps_every_nth_channel_and_tap():
    w = torch.arange(8 * 6 * 7 * 7, dtype=torch.float32).reshape(8, 6, 7, 7)
    b = torch.arange(8.0)
    sub, sub_b = weights.decimate_fc(w, b, (2, 3, 3, 3))
    idx = torch.tensor([0, 3, 6])
    assert torch.equal(sub, w[[0, 4]][:, [0, 2, 4]][:, :, idx][:, :, :, idx])
    assert torch.equal(sub_b, torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="cannot decimate"):
        weights.decimate_fc(w, b, (3, 6, 3, 3))


def test_7x7_head_copies_and_aspp_branches_share_the_decimated_fc(vgg_src, tv_vgg_file):
    model = densepred.create_model("deeplab_v1_7x7")
    weights.load_pretrained(model, tv_vgg_file)
    assert torch.equal(model.head.fc6.weight, vgg_src["fc6"][0].reshape(4096, 512, 7, 7))
    assert torch.equal(model.head.fc7.weight.flatten(1), vgg_src["fc7"][0])

    msc = densepred.create_model("deeplab_v2_vgg16", msc=True)  # weights go into .model
    fc8_before = [branch.fc8.weight.clone() for branch in msc.model.head.branches]
    weights.load_pretrained(msc, tv_vgg_file)
    first = msc.model.head.branches[0]
    assert torch.equal(first.fc6.bias, vgg_src["fc6"][1][::4])
    for branch, fc8 in zip(msc.model.head.branches, fc8_before, strict=True):
        assert torch.equal(branch.fc6.weight, first.fc6.weight) and torch.equal(branch.fc7.weight, first.fc7.weight)
        assert torch.equal(branch.fc8.weight, fc8)  # scores are never taken from ImageNet


# ---------------------------------------------------------------------------------------------
# ResNet sources


def tv_resnet_state(depth: int, *, make=None) -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet state dict; ``make(shape, kind)`` gives each tensor."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    make = make or _random_tensor
    state: dict[str, torch.Tensor] = {}

    def conv_bn(conv: str, bn: str, cout: int, cin: int, k: int) -> None:
        state[f"{conv}.weight"] = make((cout, cin, k, k), "conv")
        for p in ("weight", "bias", "running_mean", "running_var"):
            state[f"{bn}.{p}"] = make((cout,), p)
        state[f"{bn}.num_batches_tracked"] = torch.tensor(0)

    conv_bn("conv1", "bn1", 64, 3, 7)
    cin = 64
    for s, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            conv_bn(f"{p}.conv1", f"{p}.bn1", width, cin, 1)
            conv_bn(f"{p}.conv2", f"{p}.bn2", width, width, 3)
            conv_bn(f"{p}.conv3", f"{p}.bn3", 4 * width, width, 1)
            if b == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", 4 * width, cin, 1)
            cin = 4 * width
    state["fc.weight"], state["fc.bias"] = make((1000, 2048), "conv"), make((1000,), "bias")
    return state


def _random_tensor(shape, kind: str) -> torch.Tensor:
    if kind == "conv":
        return torch.randn(shape) * (2.0 / np.prod(shape[1:])) ** 0.5
    if kind == "weight":
        return torch.rand(shape) * 0.5 + 0.25
    if kind == "running_var":
        return torch.rand(shape) * 1.5 + 0.5
    return torch.randn(shape) * 0.1


def msra_names(depth: int) -> dict[str, tuple[str, str, str]]:
    """torchvision conv prefix -> MSRA (conv, bn, scale) layer names, written out by hand."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    names = {"conv1": ("conv1", "bn_conv1", "scale_conv1")}
    for s, n in enumerate(blocks, start=1):
        for b in range(n):
            letter = ("a" if b == 0 else f"b{b}") if depth == 101 and n > 3 else "abcdef"[b]
            for tv, branch in (("conv1", "2a"), ("conv2", "2b"), ("conv3", "2c"), ("downsample.0", "1")):
                tag = f"{s + 1}{letter}_branch{branch}"
                names[f"layer{s}.{b}.{tv}"] = (f"res{tag}", f"bn{tag}", f"scale{tag}")
    return names


def to_caffe(tv: dict[str, torch.Tensor], depth: int, factor: float) -> dict[str, torch.Tensor]:
    """The MSRA Caffe dump of a torchvision-layout state dict (BN blobs scaled by ``factor``)."""
    out = {}
    for conv, (c_conv, c_bn, c_scale) in msra_names(depth).items():
        if f"{conv}.weight" not in tv:
            continue  # blocks without a projection
        bn = conv.replace("conv", "bn") if not conv.endswith("downsample.0") else conv[:-1] + "1"
        out[f"{c_conv}.0"] = tv[f"{conv}.weight"]
        out[f"{c_bn}.0"] = tv[f"{bn}.running_mean"] * factor
        out[f"{c_bn}.1"] = tv[f"{bn}.running_var"] * factor
        out[f"{c_bn}.2"] = torch.tensor([factor])
        out[f"{c_scale}.0"], out[f"{c_scale}.1"] = tv[f"{bn}.weight"], tv[f"{bn}.bias"]
    out["fc1000.0"], out["fc1000.1"] = tv["fc.weight"], tv["fc.bias"]
    return out


def resnet_reference(x, depth, conv, bn, *, caffe: bool) -> torch.Tensor:
    """Bottleneck ResNet with functional ops; ``conv(name, x, stride, padding)``, ``bn(name, x)``."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    x = F.relu(bn("conv1", conv("conv1", x, 2, 3)))
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=caffe)
    for s, n in enumerate(blocks, start=1):
        for b in range(n):
            p, stride = f"layer{s}.{b}", (2 if s > 1 and b == 0 else 1)
            s1, s3 = (stride, 1) if caffe else (1, stride)  # MSRA: stride in the 1x1; torchvision: in the 3x3
            out = F.relu(bn(f"{p}.conv1", conv(f"{p}.conv1", x, s1, 0)))
            out = F.relu(bn(f"{p}.conv2", conv(f"{p}.conv2", out, s3, 1)))
            out = bn(f"{p}.conv3", conv(f"{p}.conv3", out, 1, 0))
            short = bn(f"{p}.downsample.0", conv(f"{p}.downsample.0", x, stride, 0)) if b == 0 else x
            x = F.relu(out + short)
    return x


def assert_matches_reference(model: ResNet, conv, bn, *, caffe: bool) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.eval()(x)["layer4"]
    ref = resnet_reference(x, model.depth, conv, bn, caffe=caffe)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_torchvision_resnet50_computes_the_bottleneck_net(tmp_path):
    tv = tv_resnet_state(50)
    path = tmp_path / "resnet50.pth"
    torch.save(tv, path)
    model = ResNet(50).eval()
    report = weights.load_pretrained(model, path)
    assert report.layout == "torchvision-resnet" and report.ignored == ("fc.bias", "fc.weight")

    def bn_name(conv: str) -> str:
        return conv[:-1] + "1" if conv.endswith("downsample.0") else conv.replace("conv", "bn")

    def conv(name, x, stride, padding):
        return F.conv2d(x, tv[f"{name}.weight"], stride=stride, padding=padding)

    def bn(name, x):
        mean, var, gamma, beta = (tv[f"{bn_name(name)}.{p}"] for p in ("running_mean", "running_var", "weight", "bias"))
        return F.batch_norm(x, mean, var, gamma, beta, eps=1e-5)

    assert_matches_reference(model, conv, bn, caffe=False)


def test_caffe_resnet50_follows_caffe_batchnorm_and_scale(tmp_path):
    """MSRA layout: BN stats divided by the moving-average factor, Scale's gamma/beta, conv1's bias."""
    factor = 999.982  # what Caffe leaves after training; running stats are blob / factor
    caffe = to_caffe(tv_resnet_state(50), 50, factor)
    caffe["conv1.1"] = torch.randn(64)  # MSRA ResNet-50's conv1 has a bias
    path = tmp_path / "ResNet-50-model.npz"
    np.savez(path, **{k: v.numpy() for k, v in caffe.items()})
    model = ResNet(50, caffe_style=True, frozen_bn=True)
    assert weights.load_pretrained(model, path).layout == "caffe-resnet"
    names = msra_names(50)

    def conv(name, x, stride, padding):
        c_conv = names[name][0]
        return F.conv2d(x, caffe[f"{c_conv}.0"], caffe.get(f"{c_conv}.1"), stride=stride, padding=padding)

    def bn(name, x):
        _, c_bn, c_scale = names[name]
        scale = 1.0 / caffe[f"{c_bn}.2"][0]
        mean, var = (caffe[f"{c_bn}.{i}"].view(1, -1, 1, 1) * scale for i in (0, 1))
        x = (x - mean) / torch.sqrt(var + 1e-5)  # Caffe BatchNorm, use_global_stats
        return x * caffe[f"{c_scale}.0"].view(1, -1, 1, 1) + caffe[f"{c_scale}.1"].view(1, -1, 1, 1)  # Scale

    assert_matches_reference(model, conv, bn, caffe=True)


def test_caffe_resnet101_names_long_stages_b1_to_b22(tmp_path):
    tv = tv_resnet_state(101, make=lambda shape, kind: expanded(shape, 1.0))
    caffe = to_caffe(tv, 101, factor=0.5)
    caffe["res4b22_branch2c.0"] = expanded(caffe["res4b22_branch2c.0"].shape, 7.0)
    caffe["res3b3_branch2a.0"] = expanded(caffe["res3b3_branch2a.0"].shape, 3.0)
    caffe["bn5c_branch2b.0"] = expanded((512,), 2.0)
    path = tmp_path / "ResNet-101-model.pth"
    torch.save(caffe, path)
    model = densepred.create_model("deeplab_v2_resnet101")  # caffe_style and frozen BN by default
    weights.load_pretrained(model, path)
    backbone = model.backbone
    assert (backbone.layer3[22].conv3.weight == 7).all() and (backbone.layer2[3].conv1.weight == 3).all()
    assert (backbone.layer4[2].bn2.running_mean == 4).all()  # 2.0 / factor 0.5
    assert (backbone.layer4[2].bn2.running_var == 1).all()  # 1.0 * 0.5 stored, / 0.5


def test_caffe_style_mismatch_through_load_pretrained(tmp_path):
    path = tmp_path / "r.pth"
    torch.save({"conv1.weight": expanded((64, 3, 7, 7)), "layer1.0.conv1.weight": expanded((64, 64, 1, 1))}, path)
    with pytest.raises(WeightsError, match=r"build it with caffe_style=False"):
        weights.load_pretrained(ResNet(50, caffe_style=True), path)
    with pytest.raises(WeightsError, match=r"holds ResNet weights .* VGG16 backbone"):
        weights.load_pretrained(VGG16(), path)
    torch.save({"conv1.0": expanded((64, 3, 7, 7))}, path)
    with pytest.raises(WeightsError, match=r"first 1x1 conv.*build it with caffe_style=True"):
        weights.load_pretrained(ResNet(50), path)


# ---------------------------------------------------------------------------------------------
# Strictness


@pytest.fixture()
def tiny_tv_vgg(tmp_path):
    """A torchvision-layout VGG16 of constants: right keys and shapes, a few kB on disk."""
    state = {k: expanded(v.shape) for k, v in tv_vgg16(_vgg_shapes()).items()}
    return state, tmp_path / "vgg16.pth"


def _vgg_shapes():
    shapes = {name: (torch.empty(cout, cin, 3, 3), torch.empty(cout)) for name, cin, cout, _ in VGG_CONVS}
    shapes.update({n: (torch.empty(o, i), torch.empty(o)) for n, (o, i, _) in VGG_FCS.items()})
    return shapes


def test_missing_and_unexpected_keys_are_named(tiny_tv_vgg):
    state, path = tiny_tv_vgg
    del state["features.0.bias"]
    state["features.99.weight"] = expanded((1,))
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        weights.load_pretrained(VGG16(), path)
    msg = str(err.value)
    assert "missing keys (1): features.0.bias" in msg and "unexpected keys (1): features.99.weight" in msg
    assert path.name in msg


def test_fc_layers_are_required_when_the_model_has_fc6_fc7(tiny_tv_vgg):
    state, path = tiny_tv_vgg
    for k in ("classifier.0.weight", "classifier.0.bias", "classifier.6.weight", "classifier.6.bias"):
        del state[k]  # fc8 may be absent (ignored by design), fc6 may not
    torch.save(state, path)
    weights.load_pretrained(VGG16(), path)  # a bare backbone has no fc6: fine
    with pytest.raises(WeightsError, match=r"missing keys \(2\): classifier.0.bias, classifier.0.weight"):
        weights.load_pretrained(densepred.create_model("deeplab_v1_largefov"), path)


def test_wrong_shape_names_the_key_and_both_shapes_and_loads_nothing(tiny_tv_vgg):
    state, path = tiny_tv_vgg
    state["features.0.weight"] = expanded((64, 3, 5, 5))
    torch.save(state, path)
    model = VGG16()
    before = model.conv1_2.weight.clone()
    shapes = r"features.0.weight \(64, 3, 5, 5\) cannot fill conv1_1.weight \(64, 3, 3, 3\)"
    with pytest.raises(WeightsError, match=shapes):
        weights.load_pretrained(model, path)
    assert torch.equal(model.conv1_2.weight, before)  # nothing was written


def test_own_checkpoint_round_trips_strictly(tmp_path):
    net = UNet(3, 3, padding="same", base_channels=4, depth=2, batch_norm=True)
    path = tmp_path / "unet.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    fresh = UNet(3, 3, padding="same", base_channels=4, depth=2, batch_norm=True)
    report = weights.load_pretrained(fresh, path)
    assert report.layout == "densepred"
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    state = dict(net.state_dict())
    del state["final.bias"]
    torch.save(state, tmp_path / "unet.pth")
    with pytest.raises(WeightsError, match="missing keys \\(1\\): final.bias"):
        weights.load_pretrained(fresh, tmp_path / "unet.pth")


def test_unet_has_no_imagenet_weights():
    with pytest.raises(WeightsError, match="U-Net has no ImageNet weights"):
        densepred.create_model("unet", pretrained="imagenet")


def test_unknown_layout_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.stem.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="unknown weight layout.*encoder.stem.weight"):
        weights.load_pretrained(VGG16(), path)


# ---------------------------------------------------------------------------------------------
# Reading files safely


class _Payload:
    """Unpickling this runs a shell command: what weights_only=True exists to refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is real: plain pickle runs it
    assert live.exists()
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"conv1_1.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(WeightsError, match=r"refused: .* run code .*GLOBAL (posix|os)\.system"):
        weights.read_state_dict(path)
    assert not marker.exists()


def test_read_formats_and_wrappers(tmp_path):
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in t.items()})
    torch.save({"state_dict": t, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save({"model": t}, tmp_path / "m.pt")
    for name in ("w.npz", "ckpt.pth", "m.pt"):
        got = weights.read_state_dict(tmp_path / name)
        assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t), name

    with pytest.raises(WeightsError, match="unknown weight file extension '.h5'"):
        weights.read_state_dict(tmp_path / "w.h5")
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(WeightsError, match="allow_pickle"):
        weights.read_state_dict(tmp_path / "obj.npz")
    torch.save({"a": torch.zeros(1), "note": "hello"}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="not tensors: note"):
        weights.read_state_dict(tmp_path / "mixed.pth")


# ---------------------------------------------------------------------------------------------
# Fetching from a loopback server


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_lands_in_the_cache_and_is_reused_offline(http_server, tmp_path):
    data = os.urandom(300_000)
    http_server.files["/w.pth"] = data
    path = weights.fetch(http_server.url("w.pth"), sha256=_digest(data), cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "w.pth" and path.read_bytes() == data
    http_server.stop()  # no network from here on
    assert weights.fetch(http_server.url("w.pth"), sha256=_digest(data), cache_dir=tmp_path, progress=False) == path
    assert len(http_server.requests) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


def test_sha256_mismatch_is_refused_and_nothing_corrupt_stays(http_server, tmp_path):
    data = os.urandom(50_000)
    http_server.files["/w.pth"] = data
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        weights.fetch(http_server.url("w.pth"), sha256=wrong, cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert wrong in msg and _digest(data) in msg and "check the URL" in msg and "w.pth" in msg
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_cached_file_is_deleted_with_a_warning_and_downloaded_again(http_server, tmp_path):
    data = os.urandom(10_000)
    http_server.files["/w.pth"] = data
    (tmp_path / "w.pth").write_bytes(b"tampered")
    with pytest.warns(WeightsWarning, match=r"sha256 mismatch for .*w.pth.*deleted it, downloading it again"):
        path = weights.fetch(http_server.url("w.pth"), sha256=_digest(data), cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == data and http_server.requests == [("/w.pth", None)]


@pytest.mark.parametrize("honour_range", [True, False])
def test_a_partial_download_resumes(http_server, tmp_path, honour_range):
    data = os.urandom(400_000)
    http_server.files["/w.pth"] = data
    if not honour_range:
        http_server.ignore_range.add("/w.pth")
    (tmp_path / "w.pth.part").write_bytes(data[:150_000])
    path = weights.fetch(http_server.url("w.pth"), sha256=_digest(data), cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == data and not (tmp_path / "w.pth.part").exists()
    assert http_server.requests == [("/w.pth", "bytes=150000-")]
    assert http_server.sent == (250_000 if honour_range else 400_000)  # a server without Range: start over


def test_an_interrupted_download_is_kept_and_resumed_by_the_next_call(http_server, tmp_path):
    data = os.urandom(200_000)
    http_server.files["/w.pth"] = data
    http_server.interrupt("/w.pth", after=100_000)
    with pytest.raises(WeightsError, match="run again to resume"):
        weights.fetch(http_server.url("w.pth"), sha256=_digest(data), cache_dir=tmp_path, progress=False)
    assert (tmp_path / "w.pth.part").stat().st_size == 100_000 and not (tmp_path / "w.pth").exists()
    path = weights.fetch(http_server.url("w.pth"), sha256=_digest(data), cache_dir=tmp_path, progress=True)
    assert path.read_bytes() == data
    assert http_server.requests == [("/w.pth", None), ("/w.pth", "bytes=100000-")]


def test_hash_from_url_fragment_or_file_name_tag(http_server, tmp_path):
    data = os.urandom(1000)
    digest = _digest(data)
    http_server.files["/a.pth"] = http_server.files[f"/b-{digest[:8]}.pth"] = http_server.files["/c.pth"] = data
    assert weights.fetch(http_server.url("a.pth") + f"#sha256={digest}", cache_dir=tmp_path, progress=False).exists()
    with pytest.warns(WeightsWarning, match=rf"first 8 hex digits of the sha256 {digest[:8]}"):
        weights.fetch(http_server.url(f"b-{digest[:8]}.pth"), cache_dir=tmp_path, progress=False)
    with pytest.raises(WeightsError, match="no sha256 known"):
        weights.fetch(http_server.url("c.pth"), cache_dir=tmp_path, progress=False)


def test_local_paths_are_used_in_place_and_checked(tmp_path):
    path = tmp_path / "local.pth"
    path.write_bytes(b"abc")
    assert weights.fetch(path, sha256=_digest(b"abc")) == path
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        weights.fetch(path, sha256="1" * 64)
    with pytest.raises(WeightsError, match="does not exist"):
        weights.fetch(tmp_path / "nope.pth")
    cached = weights.fetch(path.as_uri(), sha256=_digest(b"abc"), cache_dir=tmp_path / "cache", progress=False)
    assert cached == tmp_path / "cache" / "local.pth" and cached.read_bytes() == b"abc"  # file:// URLs are copied


def test_imagenet_weights_come_from_the_table_through_the_cache(http_server, tmp_path, monkeypatch):
    state = {k: expanded(v.shape, 0.5) for k, v in tv_vgg16(_vgg_shapes()).items()}
    path = tmp_path / "src.pth"
    torch.save(state, path)
    data = path.read_bytes()
    http_server.files["/vgg16-test.pth"] = data
    spec = dataclasses.replace(
        weights.PRETRAINED["vgg16"],
        url=http_server.url("vgg16-test.pth"),
        digest=Digest("sha256", _digest(data), "test"),
    )
    monkeypatch.setitem(weights.PRETRAINED, "vgg16", spec)
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "cache"))
    model = densepred.create_model("deeplab_v1_largefov", pretrained="imagenet")
    assert (model.head.fc7.weight == 0.5).all() and (model.backbone.conv1_1.bias == 0.5).all()
    assert (tmp_path / "cache" / "vgg16-test.pth").read_bytes() == data


def test_imagenet_resnet_is_refused_before_downloading_when_the_stride_convention_differs(http_server, monkeypatch):
    spec = dataclasses.replace(weights.PRETRAINED["resnet101"], url=http_server.url("resnet101-63fe2227.pth"))
    monkeypatch.setitem(weights.PRETRAINED, "resnet101", spec)
    with pytest.raises(WeightsError, match="build it with caffe_style=False"):
        densepred.create_model("deeplab_v2_resnet101", pretrained="imagenet")  # MSRA-style by default
    assert http_server.requests == []


# ---------------------------------------------------------------------------------------------
# The table


# Only the tag in torchvision's file name is published for these: checked as a prefix, with a warning.
PREFIX_ONLY = {"mobilenet_v3_large", "vgg16_bn"}


def test_pretrained_table_has_full_hashes_matching_the_file_name_tags():
    for name, spec in weights.PRETRAINED.items():
        tag = spec.url.rsplit("-", 1)[1].split(".")[0]
        assert spec.digest is not None and spec.digest.algorithm == "sha256", name
        if name in PREFIX_ONLY:
            assert not spec.digest.complete and spec.digest.value == tag and len(tag) == 8, name
        else:
            assert spec.digest.complete and spec.digest.value.startswith(tag), name
        assert spec.layout == "torchvision" and spec.normalization == IMAGENET and spec.kind == "backbone"
    assert weights.PRETRAINED["mobilenet_v3_large"].url == (
        "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth"
    )


def test_pretrained_num_params_are_those_of_our_modules():
    with torch.device("meta"):
        counts = {
            "vgg16": sum(p.numel() for p in vgg16_classifier().parameters()),
            # our ResNet has no ImageNet classifier: add fc (2048 -> 1000)
            "resnet50": sum(p.numel() for p in ResNet(50).parameters()) + 2048 * 1000 + 1000,
            "resnet101": sum(p.numel() for p in ResNet(101).parameters()) + 2048 * 1000 + 1000,
            "mobilenet_v3_large": sum(p.numel() for p in MobileNetV3Large(with_classifier=True).parameters()),
        }
        # VGG16-BN: VGG16 and the scale and shift of a batch norm after each of its 13 convolutions.
        counts["vgg16_bn"] = counts["vgg16"] + 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)
    for name, spec in weights.PRETRAINED.items():
        assert spec.num_params == counts[name], name


def test_imagenet_spec_follows_the_backbone():
    with torch.device("meta"):
        assert weights.imagenet_spec(densepred.create_model("fcn8s")).name == "vgg16.imagenet"
        assert weights.imagenet_spec(densepred.create_model("deeplab_v2_vgg16", msc=True)).model == "vgg16"
        assert weights.imagenet_spec(densepred.create_model("deeplab_v2_resnet101")).model == "resnet101"
        for name in MOBILENET_MODELS:
            spec = weights.imagenet_spec(densepred.create_model(name, num_classes=3))
            assert spec.model == "mobilenet_v3_large", name
        assert weights.imagenet_spec(MobileNetV3Large()).model == "mobilenet_v3_large"


def test_a_digest_rejects_a_malformed_hash():
    with pytest.raises(ValueError, match="lowercase hex"):
        Digest("sha256", "397923AF", "test")
    with pytest.raises(ValueError, match="must have 40 hex digits"):
        Digest("sha1", "397923af", "test")  # a prefix is a sha256-only check
    with pytest.raises(ValueError, match="must have 64 hex digits"):
        Digest("sha256", "397923", "test")


# ---------------------------------------------------------------------------------------------
# MobileNetV3-Large: torchvision's ImageNet file into the FeatureTaps of LR-ASPP and DeepLabV3

MOBILENET_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")


def tv_mobilenet_v3_large(make=None) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict layout (``features.{i}.*``, ``classifier.0/3.*``), new values;
    ``make(key, tensor)`` gives each floating-point tensor (default: random, of a net that stays finite)."""
    torch.manual_seed(3)
    make = make or _random_like
    return {
        k: (make(k, v) if v.is_floating_point() else v.clone())
        for k, v in MobileNetV3Large(with_classifier=True).state_dict().items()
    }


def _random_like(key: str, t: torch.Tensor) -> torch.Tensor:
    kind = key.rsplit(".", 1)[1]
    if kind == "weight" and t.dim() > 1:  # convolutions and linear layers
        kind = "conv"
    return _random_tensor(t.shape, kind)


@pytest.fixture(scope="module")
def tv_mobilenet():
    return tv_mobilenet_v3_large()


@pytest.fixture(scope="module")
def tv_mobilenet_file(tv_mobilenet, tmp_path_factory):
    path = tmp_path_factory.mktemp("mnv3") / "mobilenet_v3_large-tv.pth"
    torch.save(tv_mobilenet, path)
    return path


def test_mobilenet_v3_file_is_not_taken_for_vgg16(tv_mobilenet):
    assert weights.detect_layout(tv_mobilenet) == "torchvision-mobilenetv3"
    assert weights.detect_layout({"features.1.block.0.0.weight"}) == "torchvision-mobilenetv3"
    assert weights.detect_layout({"features.4.block.2.fc1.weight"}) == "torchvision-mobilenetv3"
    assert weights.detect_layout(tv_vgg16(_vgg_shapes())) == "torchvision-vgg16"  # unchanged


@pytest.mark.parametrize("name", MOBILENET_MODELS)
def test_torchvision_mobilenet_v3_fills_the_backbone_and_leaves_the_heads(name, tv_mobilenet, tv_mobilenet_file):
    model = densepred.create_model(name, num_classes=3)
    assert isinstance(model.backbone, FeatureTaps)
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    report = weights.load_pretrained(model, tv_mobilenet_file)
    assert report.layout == "torchvision-mobilenetv3"
    state = model.state_dict()
    backbone_keys = [k for k in state if k.startswith("backbone.")]
    assert len(backbone_keys) > 300  # 0 .. 16: every layer of the trunk is tapped here
    for key in backbone_keys:
        assert torch.equal(state[key], tv_mobilenet["features." + key.removeprefix("backbone.")]), key
    assert set(report.loaded) == set(backbone_keys)  # the file's num_batches_tracked included
    for key, before in heads.items():
        assert torch.equal(state[key], before), key  # the heads keep their initialisation
    assert report.ignored == ("classifier.0.bias", "classifier.0.weight", "classifier.3.bias", "classifier.3.weight")
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    out = out["out"] if isinstance(out, dict) else out
    assert out.shape[:2] == (1, 3) and torch.isfinite(out).all()


def test_torchvision_mobilenet_v3_through_pretrained_path(tv_mobilenet, tv_mobilenet_file):
    model = densepred.create_model("lraspp_mobilenet_v3_large", num_classes=2, pretrained=str(tv_mobilenet_file))
    assert torch.equal(
        model.get_submodule("backbone.5.block.2.fc1").weight, tv_mobilenet["features.5.block.2.fc1.weight"]
    )


def test_feature_taps_take_layers_up_to_the_deepest_tap_and_report_the_rest(tv_mobilenet, tv_mobilenet_file):
    trunk = MobileNetV3Large(dilated=True)
    taps = FeatureTaps(trunk, {"low": 4, "high": 7})  # layers 0 .. 7
    report = weights.load_pretrained(taps, tv_mobilenet_file)
    for key, value in taps.state_dict().items():
        assert torch.equal(value, tv_mobilenet[f"features.{key}"]), key
    deeper = {k for k in tv_mobilenet if k.startswith("features.") and int(k.split(".")[1]) > 7}
    assert set(report.ignored) == deeper | {
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    }
    assert any(k.startswith("features.16.") for k in report.ignored)


def test_bare_mobilenet_v3_loads_with_and_without_its_classifier(tv_mobilenet, tv_mobilenet_file):
    full = MobileNetV3Large(with_classifier=True)
    report = weights.load_pretrained(full, tv_mobilenet_file)
    assert report.ignored == () and set(report.loaded) == set(tv_mobilenet)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in tv_mobilenet.items())
    trunk = MobileNetV3Large()
    report = weights.load_pretrained(trunk, tv_mobilenet_file)
    assert len(report.ignored) == 4 and all(k.startswith("classifier.") for k in report.ignored)
    assert torch.equal(trunk.features[16][0].weight, tv_mobilenet["features.16.0.weight"])


def test_mobilenet_v3_file_missing_or_extra_keys_are_named(tv_mobilenet, tmp_path):
    path = tmp_path / "mnv3.pth"
    state = dict(tv_mobilenet)
    del state["features.3.block.1.0.weight"]
    state["features.17.0.weight"] = torch.zeros(1)  # not a layer of MobileNetV3-Large: not "deeper"
    torch.save(state, path)
    model = densepred.create_model("lraspp_mobilenet_v3_large", num_classes=3)
    before = model.get_submodule("backbone.0.0").weight.clone()
    with pytest.raises(WeightsError) as err:
        weights.load_pretrained(model, path)
    msg = str(err.value)
    assert path.name in msg and "torchvision-mobilenetv3 layout" in msg and "LRASPP" in msg
    assert "missing keys (1): features.3.block.1.0.weight" in msg
    assert "unexpected keys (1): features.17.0.weight" in msg
    assert torch.equal(model.get_submodule("backbone.0.0").weight, before)  # nothing was written

    state = dict(tv_mobilenet)
    state["features.2.block.0.0.weight"] = torch.zeros(8, 16, 1, 1)
    torch.save(state, path)
    shapes = r"features.2.block.0.0.weight \(8, 16, 1, 1\) cannot fill backbone.2.block.0.0.weight \(64, 16, 1, 1\)"
    with pytest.raises(WeightsError, match=shapes):
        weights.load_pretrained(model, path)


def test_other_layouts_and_mobilenet_v3_refuse_each_other(tv_mobilenet_file, tiny_tv_vgg, tmp_path):
    state, vgg_path = tiny_tv_vgg
    torch.save(state, vgg_path)
    lraspp = densepred.create_model("lraspp_mobilenet_v3_large", num_classes=3)
    with pytest.raises(WeightsError, match=r"vgg16.pth holds VGG16 weights .* LRASPP has a FeatureTaps backbone"):
        weights.load_pretrained(lraspp, vgg_path)
    resnet_path = tmp_path / "resnet50.pth"
    torch.save(
        {"conv1.weight": expanded((64, 3, 7, 7)), "layer1.0.conv1.weight": expanded((64, 64, 1, 1))}, resnet_path
    )
    with pytest.raises(WeightsError, match=r"resnet50.pth holds ResNet weights .* DeepLabV3 has a FeatureTaps"):
        weights.load_pretrained(densepred.create_model("deeplabv3_mobilenet_v3_large", num_classes=3), resnet_path)
    name = tv_mobilenet_file.name
    with pytest.raises(WeightsError, match=rf"{name} holds MobileNetV3Large weights .* VGG16 backbone"):
        weights.load_pretrained(VGG16(), tv_mobilenet_file)
    with pytest.raises(WeightsError, match=r"MobileNetV3Large weights .* FCN has a VGG16 backbone"):
        weights.load_pretrained(densepred.create_model("fcn32s"), tv_mobilenet_file)
    with pytest.raises(WeightsError, match=r"MobileNetV3Large weights .* no VGG16/ResNet/MobileNetV3 backbone"):
        weights.load_pretrained(UNet(3, 2, padding="same", base_channels=4, depth=2), tv_mobilenet_file)


def test_torchvision_segmentation_checkpoint_still_loads_as_its_own_keys(tmp_path):
    """torchvision's deeplabv3_mobilenet_v3_large file has the model's own keys (``backbone.{i}``)."""
    torch.manual_seed(4)
    src = densepred.create_model("deeplabv3_mobilenet_v3_large", num_classes=21)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in src.state_dict().items()}
    path = tmp_path / "deeplabv3_mobilenet_v3_large-tv.pth"
    torch.save(state, path)
    assert weights.detect_layout(state) is None
    model = densepred.create_model("deeplabv3_mobilenet_v3_large", num_classes=21, pretrained=str(path))
    got = model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    report = weights.load_pretrained(model, path)
    assert report.layout == "densepred"


def test_imagenet_mobilenet_v3_is_checked_by_its_name_tag_with_a_warning(http_server, tmp_path, monkeypatch):
    state = tv_mobilenet_v3_large(make=lambda k, t: expanded(t.shape, 0.25))  # a few kB on disk
    src = tmp_path / "src.pth"
    torch.save(state, src)
    data = src.read_bytes()
    tag = _digest(data)[:8]
    http_server.files[f"/mobilenet_v3_large-{tag}.pth"] = data
    spec = weights.PRETRAINED["mobilenet_v3_large"]
    assert spec.digest is not None and spec.digest.value == "8738ca79" and not spec.digest.complete
    fake = dataclasses.replace(
        spec, url=http_server.url(f"mobilenet_v3_large-{tag}.pth"), digest=Digest("sha256", tag, "the file name")
    )
    monkeypatch.setitem(weights.PRETRAINED, "mobilenet_v3_large", fake)
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "cache"))
    with pytest.warns(WeightsWarning, match=rf"first 8 hex digits of the sha256 {tag}"):
        model = densepred.create_model("deeplabv3_mobilenet_v3_large", num_classes=3, pretrained="imagenet")
    assert (model.get_submodule("backbone.16.0").weight == 0.25).all() and (
        model.get_submodule("backbone.0.1").running_var == 0.25
    ).all()
    assert (tmp_path / "cache" / f"mobilenet_v3_large-{tag}.pth").read_bytes() == data

    wrong = "0" * 8 if tag != "0" * 8 else "1" * 8
    http_server.files[f"/mobilenet_v3_large-{wrong}.pth"] = data
    bad = dataclasses.replace(
        spec, url=http_server.url(f"mobilenet_v3_large-{wrong}.pth"), digest=Digest("sha256", wrong, "the file name")
    )
    monkeypatch.setitem(weights.PRETRAINED, "mobilenet_v3_large", bad)
    with pytest.warns(WeightsWarning), pytest.raises(WeightsError, match=rf"sha256 mismatch .*expected {wrong}"):
        densepred.create_model("lraspp_mobilenet_v3_large", num_classes=3, pretrained="imagenet")
    assert not (tmp_path / "cache" / f"mobilenet_v3_large-{wrong}.pth").exists()
