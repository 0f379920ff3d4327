"""The released-weights catalogue and the papers' own Caffe nets.

The reference ``.caffemodel`` files are hundreds of MB and the machine is offline, so each test
writes a file in the reference net's own layer names (from its prototxt, with
``tests/caffe_wire.py``, an encoder independent of the reader) from a model with random
weights, and checks that loading it gives that model back, layer for layer and output for
output. Downloads come from a loopback server.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import densepred
from caffe_wire import blob, field_bytes, layer, net, v1_layer, varint
from densepred import catalogue, weights
from densepred.catalogue import VOC_CATEGORIES, Digest, UnknownWeightsError, Weights, weights_entry
from densepred.cli import main as cli
from densepred.prediction import Predictor
from densepred.weights import WeightsError, WeightsWarning, load_pretrained, load_released
from slim import slim

# fcn.berkeleyvision.org voc-fcn*/train.prototxt: the layers that carry blobs after fc7.
FCN_HEADS = {
    "fcn32s": ("score_fr", "upscore"),
    "fcn16s": ("score_fr", "upscore2", "score_pool4", "upscore16"),
    "fcn8s": ("score_fr", "upscore2", "score_pool4", "upscore_pool4", "score_pool3", "upscore8"),
}
VGG16_CONVS = [f"conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]


def tensor_blob(t: torch.Tensor) -> bytes:
    """A BlobProto with ``shape`` and packed float data, written with numpy (files of 80 MB)."""
    dims = b"".join(varint(d) for d in t.shape)
    data = np.ascontiguousarray(t.detach().numpy(), dtype="<f4").tobytes()
    return field_bytes(7, field_bytes(1, dims)) + field_bytes(5, data)


def module_blobs(module: torch.nn.Module) -> list[bytes]:
    out = [tensor_blob(module.weight)]
    return out + ([tensor_blob(module.bias)] if getattr(module, "bias", None) is not None else [])


def fcn_caffemodel(model, heads, *, v1: bool = False, extra: bytes = b"") -> bytes:
    """The reference FCN's caffemodel of ``model``: data and ReLU layers without blobs, as Caffe
    writes them, the 13 convolutions, fc6/fc7 and the score and deconvolution layers."""
    fields = [layer("data", "Python"), layer("relu1_1", "ReLU")]
    for name in VGG16_CONVS:
        fields.append(layer(name, "Convolution", module_blobs(getattr(model.backbone, name))))
    for name in ("fc6", "fc7", *heads):
        module = getattr(model, name)
        kind = "Deconvolution" if name.startswith("upscore") else "Convolution"
        if v1:  # the legacy V1 format: CONVOLUTION = 4, DECONVOLUTION = 39
            fields.append(v1_layer(name, 39 if kind == "Deconvolution" else 4, module_blobs(module)))
        else:
            fields.append(layer(name, kind, module_blobs(module)))
    fields += [layer("score", "Crop"), layer("loss", "SoftmaxWithLoss")]
    return net("voc-fcn", *fields) + extra


@functools.cache
def _slim_net(name: str) -> torch.nn.Module:
    return slim(densepred.create_model(name))  # builds the 134M net once per name


def slim_fcn(name: str, seed: int) -> torch.nn.Module:
    """A slim copy of the reference FCN (same layers and names, 1/16 of the channels), random weights."""
    return randomised(copy.deepcopy(_slim_net(name)), seed)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def assert_same(a: torch.nn.Module, b: torch.nn.Module, size: tuple[int, int]) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(1, a.in_channels, *size)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Nothing here reads or writes the user's weight cache (nor reaches the network)."""
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "user-cache"))


# ---------------------------------------------------------------------------------------------
# The catalogue as data


def test_every_entry_is_complete_and_its_parameter_count_is_our_models():
    entries = catalogue.list_weights()
    assert len(entries) >= 18
    for w in entries:
        assert w.metrics and w.metrics_on and w.license and w.source and w.input_size, w.name
        if w.kind == "backbone":
            assert w.model in weights.PRETRAINED and w.classes == (), w.name
            continue  # their counts are checked against our modules in test_weights
        assert w.classes == VOC_CATEGORIES, w.name
        with torch.device("meta"):
            model = densepred.create_model(w.model, num_classes=len(w.classes), **w.model_kwargs)
        assert sum(p.numel() for p in model.parameters()) == w.num_params, w.name
        if w.layout == "caffe":  # Caffe's nets take BGR 0-255 pixels less the mean
            assert w.normalization.bgr and w.normalization.scale_255, w.name
        else:
            assert w.digest is not None and w.digest.complete and w.digest.value[:8] in w.url, w.name
    # What each source says it scores (fcn.berkeleyvision.org README, torchvision, DeepLab v2 Table 4).
    assert weights_entry("fcn8s.voc_caffe").metrics["mean IU"] == 65.5
    assert weights_entry("deeplab_v2_resnet101.voc12_caffe").metrics == {
        "mean IoU": 76.35,
        "mean IoU (with CRF)": 77.69,
    }
    assert weights_entry("fcn8s_atonce.voc_caffe").fixed_blobs == {"scale_pool4": 0.01, "scale_pool3": 0.0001}


def test_unverifiable_entries_say_so_and_a_sha1_is_named():
    assert "first use" in weights_entry("fcn16s.voc_caffe").verification
    assert weights_entry("fcn8s.voc_caffe").verification.startswith("sha1 c449ea74")
    assert "first 8 hex digits" in weights_entry("vgg16_bn.imagenet").verification


def test_an_unknown_name_offers_the_models_entries():
    with pytest.raises(UnknownWeightsError, match=r"Did you mean: .*fcn8s\.voc_caffe"):
        weights_entry("fcn8s")
    with pytest.raises(ValueError, match="already registered"):
        catalogue.register_weights(weights_entry("fcn8s.voc_caffe"))


def test_weights_list_and_show_print_the_catalogue(capsys):
    assert cli(["weights", "list", "fcn*"]) == 0
    out = capsys.readouterr().out
    assert "fcn8s.voc_caffe" in out and "fcn_resnet50.coco_voc" in out and "deeplab" not in out
    assert cli(["weights", "show", "deeplab_v2_resnet101.voc12_caffe"]) == 0
    out = capsys.readouterr().out
    for fact in ("prototxt_and_model.zip (member train_iter_20000.caffemodel)", "76.35", "BGR, 0-255", "fc1_voc12_c0"):
        assert fact in out
    assert cli(["weights", "show", "nope.x"]) == 2
    assert "unknown weights 'nope.x'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Caffe nets, layer for layer


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_reference_fcn_caffemodel_loads_layer_for_layer(name, tmp_path):
    source = slim_fcn(name, seed=1)
    path = tmp_path / f"{name}.caffemodel"
    path.write_bytes(fcn_caffemodel(source, FCN_HEADS[name], v1=name == "fcn16s"))
    target = slim_fcn(name, seed=11)
    report = load_pretrained(target, path)
    assert report.layout == "caffe-vgg16" and len(report.loaded) == len(target.state_dict())
    assert_same(source, target.eval(), (67, 93))


def test_fcn8s_at_once_checks_its_fixed_scale_layers(tmp_path):
    source = slim_fcn("fcn8s_atonce", seed=2)

    def scale(name: str, channels: int, value: float) -> bytes:
        return layer(name, "Scale", [blob([value] * channels, (channels,))])

    fixed = {"scale_pool4": 0.01, "scale_pool3": 0.0001}
    good = tmp_path / "atonce.caffemodel"
    good.write_bytes(fcn_caffemodel(source, FCN_HEADS["fcn8s"], extra=scale("scale_pool4", 32, 0.01)))
    target = slim_fcn("fcn8s_atonce", seed=12)
    load_pretrained(target, good, fixed_blobs=fixed)
    assert_same(source, target.eval(), (64, 64))
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(fcn_caffemodel(source, FCN_HEADS["fcn8s"], extra=scale("scale_pool3", 16, 1.0)))
    with pytest.raises(WeightsError, match=r"scale_pool3 must hold the constant 0.0001"):
        load_pretrained(target, bad, fixed_blobs=fixed)
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): scale_pool3.0"):
        load_pretrained(target, bad)  # without the entry's knowledge it is an unknown layer


def test_a_net_of_another_model_names_missing_and_unexpected_layers(tmp_path):
    path = tmp_path / "fcn32s.caffemodel"
    path.write_bytes(fcn_caffemodel(slim_fcn("fcn32s", 3), FCN_HEADS["fcn32s"]))
    target = slim_fcn("fcn8s", 13)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert "fcn32s.caffemodel (caffe-vgg16 layout) does not fit FCN" in message
    assert "unexpected keys (1): upscore.0" in message and "score_pool4" not in message.split("unexpected")[1]
    # All or nothing: not one tensor of the model was written.
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_damaged_caffemodel_names_the_file_and_the_byte(tmp_path):
    data = fcn_caffemodel(slim_fcn("fcn32s", 4), FCN_HEADS["fcn32s"])
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"cut\.caffemodel.*byte \d+"):
        load_pretrained(slim_fcn("fcn32s", 14), path)


def largefov_caffemodel(model, *, copies: dict[str, str] | None = None) -> bytes:
    """DeepLab-LargeFOV's caffemodel (train.prototxt): conv1_1 .. conv5_3, fc6 (3x3, dilation
    12, 1024), fc7, fc8_voc12; ``copies`` adds layers repeating a layer's blobs (MSC branches)."""
    layers = {name: getattr(model.backbone, name) for name in VGG16_CONVS}
    layers |= {"fc6": model.head.fc6, "fc7": model.head.fc7, "fc8_voc12": model.head.fc8}
    fields = [layer(n, "Convolution", module_blobs(m)) for n, m in layers.items()]
    for repeat, owner in (copies or {}).items():
        fields.append(layer(repeat, "Convolution", module_blobs(layers[owner])))
    return net("DeepLab-LargeFOV", *fields)


def test_deeplab_largefov_maps_fc8_voc12_and_checks_shared_copies(tmp_path):
    source = randomised(densepred.create_model("deeplab_v1_largefov"), seed=5)
    path = tmp_path / "train2_iter_8000.caffemodel"
    path.write_bytes(largefov_caffemodel(source, copies={"fc8_voc12_res075": "fc8_voc12"}))
    target = densepred.create_model("deeplab_v1_largefov")
    load_pretrained(target, path, caffe_layers={"fc8_voc12": "head.fc8"}, shared_copies=("_res075",))
    assert_same(source, target.eval(), (49, 65))
    with pytest.raises(
        WeightsError, match=r"unexpected keys \(4\): fc8_voc12.0, fc8_voc12.1, fc8_voc12_res075.0, fc8_voc12_res075.1"
    ):
        load_pretrained(target, path)  # fc8_voc12 is not one of our names: the entry maps it
    # A "copy" that differs from the layer it should repeat is not the released net.
    wrong = tmp_path / "wrong.caffemodel"
    wrong.write_bytes(largefov_caffemodel(source, copies={"fc7_res075": "fc6"}))
    with pytest.raises(WeightsError, match=r"fc7_res075 should repeat the shared blobs of fc7"):
        load_pretrained(target, wrong, caffe_layers={"fc8_voc12": "head.fc8"}, shared_copies=("_res075",))


# ---------------------------------------------------------------------------------------------
# By name: fetched, verified, loaded


def entry_for(monkeypatch, base: Weights, **changes) -> Weights:
    entry = dataclasses.replace(base, **changes)
    monkeypatch.setitem(catalogue._CATALOGUE, entry.name, entry)
    return entry


def test_released_caffe_net_by_name_verified_by_first_use(http_server, tmp_path, monkeypatch):
    source = randomised(densepred.create_model("deeplab_v1_largefov"), seed=6)
    data = largefov_caffemodel(source)
    http_server.files["/train2_iter_8000.caffemodel"] = data
    entry = entry_for(
        monkeypatch,
        weights_entry("deeplab_v1_largefov.voc12_caffe"),
        tag="test",
        url=http_server.url("train2_iter_8000.caffemodel"),
    )
    cache = tmp_path / "cache"
    with pytest.warns(WeightsWarning, match=r"no hash is published .* recorded in"):
        model = load_released(entry.name, cache_dir=cache)
    assert_same(source, model, (33, 33))
    record = cache / "train2_iter_8000.caffemodel.sha256"
    assert record.read_text().strip() == hashlib.sha256(data).hexdigest()
    # Later uses are checked against the record: a changed file in the cache is replaced by a
    # download, and a server that now serves other bytes is refused.
    (cache / "train2_iter_8000.caffemodel").write_bytes(data[:-4] + b"\0\0\0\0")
    http_server.files["/train2_iter_8000.caffemodel"] = data[:-4] + b"\1\1\1\1"
    with (
        pytest.warns(WeightsWarning, match="deleted it, downloading it again"),
        pytest.raises(WeightsError, match="sha256 mismatch"),
    ):
        load_released(entry.name, cache_dir=cache)


def test_released_zip_member_with_a_published_sha1(http_server, tmp_path, monkeypatch):
    source = randomised(densepred.create_model("deeplab_v1_largefov"), seed=7)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("prototxt_and_model/test.prototxt", "name: 'x'")
        archive.writestr("train_iter_20000.caffemodel", largefov_caffemodel(source))
    http_server.files["/prototxt_and_model.zip"] = buf.getvalue()
    sha1 = hashlib.sha1(buf.getvalue()).hexdigest()
    entry = entry_for(
        monkeypatch,
        weights_entry("deeplab_v1_largefov.voc12_caffe"),
        tag="zipped",
        url=http_server.url("prototxt_and_model.zip"),
        digest=Digest("sha1", sha1, "test"),
        archive_member="train_iter_20000.caffemodel",
    )
    with pytest.warns(WeightsWarning, match=f"checked against the sha1 {sha1}"):
        model = load_released(entry.name, cache_dir=tmp_path)
    assert_same(source, model, (40, 40))
    assert (tmp_path / "prototxt_and_model" / "train_iter_20000.caffemodel").is_file()
    missing = entry_for(monkeypatch, entry, tag="nomember", archive_member="nope.caffemodel")
    with pytest.warns(WeightsWarning), pytest.raises(WeightsError, match="has no member 'nope.caffemodel'"):
        load_released(missing.name, cache_dir=tmp_path / "other")


def test_a_trunk_entry_is_not_a_segmentation_model():
    with pytest.raises(WeightsError, match="pretrained='imagenet'"):
        load_released("resnet50.imagenet")


def torchvision_lraspp_file(tmp_path, seed: int) -> tuple[torch.nn.Module, bytes]:
    """A file in torchvision's lraspp_mobilenet_v3_large layout (its keys are our module names)."""
    model = randomised(densepred.create_model("lraspp_mobilenet_v3_large"), seed)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return model, buf.getvalue()


def test_predict_with_released_weights_by_name(http_server, tmp_path, monkeypatch, capsys):
    source, data = torchvision_lraspp_file(tmp_path, seed=8)
    digest = hashlib.sha256(data).hexdigest()
    file = f"lraspp_mobilenet_v3_large-{digest[:8]}.pth"
    http_server.files[f"/{file}"] = data
    entry = entry_for(
        monkeypatch,
        weights_entry("lraspp_mobilenet_v3_large.coco_voc"),
        tag="test",
        url=http_server.url(file),
        digest=Digest("sha256", digest, "test"),
    )
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "cache"))
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert (
        cli(
            [
                "predict",
                "--weights",
                entry.name,
                str(tmp_path / "photo.png"),
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    mask = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    # The entry's preprocessing (ImageNet RGB mean/std) and the model's own argmax.
    predictor = Predictor.from_weights(entry.name)
    x = weights_entry(entry.name).normalization(image)[None]
    with torch.inference_mode():
        expected = source(x).argmax(1)[0].numpy()
    assert mask.shape == (70, 90) and (mask == expected).mean() == 1.0
    assert predictor.trained.class_names == list(VOC_CATEGORIES)
    # A wrong digest refuses the download and keeps nothing.
    bad = entry_for(monkeypatch, entry, tag="bad", digest=Digest("sha256", "0" * 64, "test"))
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        Predictor.from_weights(bad.name)
    assert not any((tmp_path / "cache2").glob("*.pth"))


def test_a_local_copy_without_a_published_hash_warns_that_it_is_unverified(tmp_path, monkeypatch):
    source = randomised(densepred.create_model("deeplab_v1_largefov"), seed=9)
    path = tmp_path / "mine.caffemodel"
    path.write_bytes(largefov_caffemodel(source))
    with pytest.warns(WeightsWarning, match="used unverified"):
        model = load_released("deeplab_v1_largefov.voc12_caffe", file=path)
    assert_same(source, model, (33, 41))


@pytest.mark.slow
def test_deeplab_v2_resnet101_msc_caffemodel_by_name(tmp_path):
    """The v2 release: MSRA ResNet-101 (BatchNorm + Scale pairs), ASPP-L as fc1_voc12_c0..c3,
    and the 0.75x / 0.5x branches repeating the shared layers (deeplab-pytorch skips them too)."""
    from test_weights import msra_names

    source = densepred.create_model("deeplab_v2_resnet101", msc=True)
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for name, t in source.state_dict().items():
            if t.is_floating_point():  # weights, and positive running variances
                t.copy_(
                    torch.rand(t.shape, generator=g) + 0.5
                    if "running_var" in name
                    else torch.randn(t.shape, generator=g) * 0.05
                )
    state = source.model.state_dict()
    factor = 0.999  # Caffe's moving-average factor: stored statistics are multiplied by it
    fields = []
    for conv, (c_conv, c_bn, c_scale) in msra_names(101).items():
        if f"backbone.{conv}.weight" not in state:
            continue
        bn = conv.replace("conv", "bn") if not conv.endswith("downsample.0") else conv[:-1] + "1"
        bn_blobs = [state[f"backbone.{bn}.running_mean"] * factor, state[f"backbone.{bn}.running_var"] * factor]
        fields.append(layer(c_conv, "Convolution", [tensor_blob(state[f"backbone.{conv}.weight"])]))
        fields.append(layer(c_bn, "BatchNorm", [tensor_blob(t) for t in (*bn_blobs, torch.tensor([factor]))]))
        scale = [tensor_blob(state[f"backbone.{bn}.{p}"]) for p in ("weight", "bias")]
        fields.append(layer(c_scale, "Scale", scale))
        if c_conv == "conv1":
            fields.append(layer("conv1_res075", "Convolution", [tensor_blob(state["backbone.conv1.weight"])]))
    for i in range(4):
        blobs = [tensor_blob(state[f"head.branches.{i}.{p}"]) for p in ("weight", "bias")]
        fields.append(layer(f"fc1_voc12_c{i}", "Convolution", blobs))
        fields.append(layer(f"fc1_voc12_c{i}_res05", "Convolution", blobs))
    fields.append(layer("fc1_voc12", "Eltwise"))  # the fusion: no blobs
    path = tmp_path / "train_iter_20000.caffemodel"
    path.write_bytes(net("deeplab_v2", *fields))
    with pytest.warns(WeightsWarning, match="used unverified"):
        model = load_released("deeplab_v2_resnet101.voc12_caffe", file=path)
    sa, sb = source.state_dict(), model.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=0, msg=k)  # statistics pass through / factor
    x = torch.randn(1, 3, 65, 65)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), source.eval()(x), rtol=1e-4, atol=1e-4)


def test_serve_with_released_weights_by_name(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from densepred.serve import create_app

    source, data = torchvision_lraspp_file(tmp_path, seed=12)
    path = tmp_path / "lraspp.pth"
    path.write_bytes(data)
    entry = entry_for(
        monkeypatch,
        weights_entry("lraspp_mobilenet_v3_large.coco_voc"),
        tag="served",
        digest=Digest("sha256", hashlib.sha256(data).hexdigest(), "test"),
    )
    app = create_app(Predictor.from_weights(entry.name, file=path), memory_budget=2**30, warmup=False)
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    with TestClient(app) as client:
        info = client.get("/api/classes").json()
        assert info["model"] == "lraspp_mobilenet_v3_large" and info["recipe"] == entry.name
        assert [c["name"] for c in info["classes"]] == list(VOC_CATEGORIES)
        r = client.post("/api/segment", files={"image": ("x.png", png.getvalue(), "image/png")})
        assert r.status_code == 200
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    x = weights_entry(entry.name).normalization(image)[None]
    with torch.inference_mode():
        assert (mask == source(x).argmax(1)[0].numpy()).all()


def test_create_model_with_released_weights_by_tag(http_server, tmp_path, monkeypatch):
    source, data = torchvision_lraspp_file(tmp_path, seed=13)
    http_server.files["/lraspp-test.pth"] = data
    entry_for(
        monkeypatch,
        weights_entry("lraspp_mobilenet_v3_large.coco_voc"),
        tag="bytag",
        url=http_server.url("lraspp-test.pth"),
        digest=Digest("sha256", hashlib.sha256(data).hexdigest(), "test"),
    )
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "cache"))
    model = densepred.create_model("lraspp_mobilenet_v3_large", weights="bytag")
    assert_same(source, model, (50, 70))
    with pytest.raises(ValueError, match="drop num_classes"):
        densepred.create_model("lraspp_mobilenet_v3_large", weights="bytag", num_classes=3)
    with pytest.raises(UnknownWeightsError, match="lraspp_mobilenet_v3_large.coco_voc"):
        densepred.create_model("lraspp_mobilenet_v3_large", weights="coco")


def test_convert_a_caffemodel_to_safetensors_with_its_metadata(tmp_path, capsys):
    from safetensors import safe_open

    source = randomised(densepred.create_model("deeplab_v1_largefov"), seed=14)
    caffe = tmp_path / "train2_iter_8000.caffemodel"
    caffe.write_bytes(largefov_caffemodel(source))
    out = tmp_path / "largefov.safetensors"
    with pytest.warns(WeightsWarning, match="used unverified"):
        assert (
            cli(["weights", "convert", str(caffe), "--weights", "deeplab_v1_largefov.voc12_caffe", "--out", str(out)])
            == 0
        )
    assert "wrote" in capsys.readouterr().out
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert (
        meta["model"] == "deeplab_v1_largefov"
        and meta["converted_from_sha256"] == hashlib.sha256(caffe.read_bytes()).hexdigest()
    )
    assert '"bgr": true' in meta["normalization"] and "aeroplane" in meta["classes"]
    target = densepred.create_model("deeplab_v1_largefov")
    load_pretrained(target, out)  # our own layout now: no Caffe names, no mapping
    assert_same(source, target.eval(), (41, 41))


def fcn_reference(net: dict[str, list[torch.Tensor]], x: torch.Tensor, stride: int) -> torch.Tensor:
    """voc-fcn{32,16,8}s/net.py as functional ops over the file's blobs, written from the
    prototxt: conv1_1 pad 100, 2x2 ceil-mode pools, fc6 7x7 pad 0, deconvolutions without bias,
    Crop layers at offsets 19 (32s), 5 / 27 (16s), 5 / 9 / 31 (8s)."""

    def conv(name, h, pad=0):
        w, b = net[name]
        return torch.nn.functional.conv2d(h, w, b, padding=pad)

    def up(name, h, k):
        return torch.nn.functional.conv_transpose2d(h, net[name][0], stride=k // 2)

    def crop(h, like, offset):
        return h[:, :, offset : offset + like.shape[2], offset : offset + like.shape[3]]

    h, pools = x, {}
    for i, name in enumerate(VGG16_CONVS):
        h = torch.relu(conv(name, h, pad=100 if i == 0 else 1))
        if name in ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"):
            h = torch.nn.functional.max_pool2d(h, 2, 2, ceil_mode=True)
            pools[name[:5]] = h
    score = conv("score_fr", torch.relu(conv("fc7", torch.relu(conv("fc6", h)))))
    if stride == 32:
        return crop(up("upscore", score, 64), x, 19)
    score = up("upscore2", score, 4)
    score = score + crop(conv("score_pool4", pools["conv4"]), score, 5)
    if stride == 16:
        return crop(up("upscore16", score, 32), x, 27)
    score = up("upscore_pool4", score, 4)
    score = score + crop(conv("score_pool3", pools["conv3"]), score, 9)
    return crop(up("upscore8", score, 16), x, 31)


@pytest.mark.parametrize("name, stride", [("fcn32s", 32), ("fcn16s", 16), ("fcn8s", 8)])
def test_a_loaded_fcn_computes_the_reference_nets_forward_over_the_same_blobs(name, stride, tmp_path):
    from densepred.caffemodel import read_caffemodel

    path = tmp_path / f"{name}.caffemodel"
    path.write_bytes(fcn_caffemodel(slim_fcn(name, seed=20), FCN_HEADS[name]))
    model = slim_fcn(name, seed=21)
    load_pretrained(model, path)
    blobs = {
        layer.name: [torch.from_numpy(b.data.copy()) for b in layer.blobs]
        for layer in read_caffemodel(path).layers
        if layer.blobs
    }
    x = torch.randn(1, 3, 75, 61)
    with torch.inference_mode():
        ours, ref = model.eval()(x), fcn_reference(blobs, x, stride)
    assert ours.shape == ref.shape == (1, 21, 75, 61)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_eval_with_released_weights_on_a_dataset(tmp_path, monkeypatch, capsys):
    import json

    classes = ("background", "disk", "square", "triangle", "ring", "dot")  # the synthetic set's
    model = randomised(densepred.create_model("lraspp_mobilenet_v3_large", num_classes=len(classes)), seed=15)
    path = tmp_path / "lraspp6.pth"
    torch.save(model.state_dict(), path)
    entry = entry_for(
        monkeypatch,
        weights_entry("lraspp_mobilenet_v3_large.coco_voc"),
        tag="six",
        classes=classes,
        digest=Digest("sha256", hashlib.sha256(path.read_bytes()).hexdigest(), "test"),
    )
    out = tmp_path / "eval"
    args = ["eval", "--weights", entry.name, "--weights-file", str(path), "--data", "synthetic", "--out", str(out)]
    assert cli([*args, "data.options.num_images=3", "data.options.size=64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"] == entry.name and 0 <= metrics["miou"] <= 1
    assert (out / "confusion.png").is_file() and "backend eager" in capsys.readouterr().out
    assert cli(["eval", "--weights", entry.name]) == 2
    assert "needs --data DATASET" in capsys.readouterr().err


def test_export_and_features_take_released_weights_by_name(tmp_path, capsys):
    from safetensors.torch import load_file

    source = randomised(densepred.create_model("deeplab_v1_largefov"), seed=16)
    caffe = tmp_path / "train2_iter_8000.caffemodel"
    caffe.write_bytes(largefov_caffemodel(source))
    name, out = "deeplab_v1_largefov.voc12_caffe", tmp_path / "largefov.safetensors"
    with pytest.warns(WeightsWarning):
        assert cli(["export", "--weights", name, "--weights-file", str(caffe), "--out", str(out)]) == 0
    state = load_file(out)
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    image = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    grid = tmp_path / "features.png"
    args = ["features", str(tmp_path / "photo.png"), "--weights", name, "--weights-file", str(caffe)]
    with pytest.warns(WeightsWarning):
        assert cli([*args, "--out", str(grid), "--layers", "conv1_2", "fc7"]) == 0
    assert grid.is_file() and Image.open(grid).size[0] > 100


def test_heatmap_takes_released_weights_by_name(tmp_path, capsys):
    source = randomised(densepred.create_model("deeplab_v1_largefov"), seed=17)
    caffe = tmp_path / "train2_iter_8000.caffemodel"
    caffe.write_bytes(largefov_caffemodel(source))
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "heat.png"
    args = ["heatmap", str(tmp_path / "photo.png"), "--class", "cat", "--out", str(out)]
    with pytest.warns(WeightsWarning):  # a hand-made file, not the release: used unverified
        assert cli([*args, "--weights", "deeplab_v1_largefov.voc12_caffe", "--weights-file", str(caffe)]) == 0
    assert out.is_file() and "class 'cat' (id 8)" not in capsys.readouterr().err
    assert cli(args) == 2  # neither a checkpoint, released weights nor a classifier
    assert "give --checkpoint CKPT, --weights NAME" in capsys.readouterr().err


def _release_bytes(entry: Weights, model: torch.nn.Module) -> bytes:
    """A file in the entry's own layout holding ``model``'s weights, as its source publishes it."""
    if entry.layout == "torchvision":  # torchvision's keys are our module names
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.getvalue()
    if entry.model in FCN_HEADS or entry.model == "fcn8s_atonce":
        heads = FCN_HEADS.get(entry.model, FCN_HEADS["fcn8s"])
        extra = b"".join(
            layer(n, "Scale", [tensor_blob(torch.full((c,), v))])
            for (n, v), c in zip(entry.fixed_blobs.items(), (512, 256), strict=False)
        )
        return fcn_caffemodel(model, heads, extra=extra)
    if entry.model == "deeplab_v1_largefov":
        return largefov_caffemodel(model)
    raise AssertionError(f"no writer for {entry.name}")


@pytest.mark.slow
def test_every_segmentation_entry_downloads_verifies_and_loads(http_server, tmp_path, monkeypatch):
    """Each catalogue entry, full size, from a loopback server under its own file name, checked
    by a digest of its own kind (sha256, sha1, or first use), loaded into the model it names."""
    for base in catalogue.list_weights(kind="segmentation"):
        if base.model == "deeplab_v2_resnet101":
            continue  # its zip and MSC layer list: test_deeplab_v2_resnet101_msc_caffemodel_by_name
        with torch.device("cpu"):
            source = densepred.create_model(base.model, num_classes=len(base.classes), **base.model_kwargs).eval()
        data = _release_bytes(base, source)
        file = base.url.rsplit("/", 1)[1]
        http_server.files[f"/{file}"] = data
        digest = None
        if base.digest is not None:
            digest = Digest(base.digest.algorithm, hashlib.new(base.digest.algorithm, data).hexdigest(), "test")
        entry = entry_for(monkeypatch, base, tag="loopback", url=http_server.url(file), digest=digest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WeightsWarning)  # sha1 / first-use notices
            model = load_released(entry.name, cache_dir=tmp_path / base.model, progress=False)
        target, loaded = source.state_dict(), model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in target.items()), entry.name
        http_server.files.pop(f"/{file}")
        del source, model, data, target, loaded
    # A wrong hash is refused, and nothing stays in the cache.
    wrong = entry_for(monkeypatch, weights_entry("fcn8s.voc_caffe"), tag="wrong", url=http_server.url("x.caffemodel"))
    http_server.files["/x.caffemodel"] = b"not the release"
    with pytest.warns(WeightsWarning), pytest.raises(WeightsError, match="sha1 mismatch"):
        load_released(wrong.name, cache_dir=tmp_path / "wrong")
    assert not any((tmp_path / "wrong").iterdir())
