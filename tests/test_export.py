"""ONNX and TorchScript exports: parity with eager PyTorch for every registered model, metadata, CLI."""

import json
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

import densepred
from densepred.export import (
    DEFAULT_OPSET,
    SPINNING,
    export_onnx,
    export_torchscript,
    model_metadata,
    onnx_session,
    read_metadata,
    scatter_max_unpool,
    trace_onnx,
)
from densepred.models.layers import FrozenBatchNorm2d
from slim import HEAVY, slim

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

MAX_ABS_DIFF = 1e-4  # fp32 logits
MIN_ARGMAX_AGREEMENT = 0.9999


class Case(NamedTuple):
    name: str  # registered model
    options: dict
    sizes: list[tuple[int, int, int]]  # (batch, height, width) to compare at; none is the traced size
    trace: tuple[int, int] | None = None  # traced size (None: the exporter's default)
    slim: bool = False  # every convolution's channels / 16, same geometry (kernels, strides, dilations, crops)
    slow: bool = False


# Odd, non-square sizes exercise FCN's crops and DeepLab's corner-aligned resizing; batch 2 the
# dynamic batch axis. DeepLab is traced at 33x25 (small: ResNet-101 at stride 8 is costly on CPU).
ODD = [(1, 41, 57), (2, 25, 35)]
FCN_ODD = [(1, 67, 93)]  # FCN pads by 100: any size costs a ~270x290 VGG16 pass
# The 134M-parameter VGG16 nets (fc6 7x7x512x4096, 540 MB) cost 15-50 s each on two busy cores:
# full size under `slow`, and a slim copy with the same graph in the default run.
CASES: dict[str, Case] = {
    "unet": Case("unet", {"base_channels": 4}, [(2, 204, 188), (1, 220, 236)]),
    "unet_padded": Case("unet_padded", {"base_channels": 4}, [*ODD, (1, 16, 17)], trace=(32, 48)),
    "deeplab_v1_largefov": Case("deeplab_v1_largefov", {}, ODD, trace=(33, 25)),
    # MSC wraps the plain DeepLab graph, so this case covers deeplab_v2_vgg16 with and without it.
    "deeplab_v2_vgg16-msc": Case("deeplab_v2_vgg16", {"msc": True}, ODD, trace=(33, 25)),
    "deeplab_v2_resnet101": Case("deeplab_v2_resnet101", {}, ODD, trace=(33, 25)),
}
# The successors: ResNet-50 builds in the default tier, ResNet-101 ones in the slow tier. Sizes
# other than the traced one check the image pooling (v3) and PSPNet's bins at every size.
RESNET_ODD = [(1, 41, 57), (2, 25, 35), (1, 70, 49)]
# deeplabv3_mobilenet_v3_large covers ASPP's image pooling (the same modules in every DeepLab v3),
# pspnet the bins; the ResNet twins run in the slow tier.
for _name, _opts in {
    "pspnet": {"depth": 50},
    "deeplabv3_mobilenet_v3_large": {},
    "lraspp_mobilenet_v3_large": {},
    "segnet": {},
}.items():
    CASES[_name] = Case(_name, _opts, RESNET_ODD, trace=(33, 25))
for _name, _opts in {
    "deeplabv3_resnet50": {},
    "fcn_resnet50": {},
    "deeplabv3": {"depth": 50},
    "deeplabv3plus": {"depth": 50},
    "fcn_resnet101": {},
    "deeplabv3_resnet101": {},
}.items():
    CASES[_name] = Case(_name, _opts, RESNET_ODD, trace=(33, 25), slow=True)
for _name in HEAVY:
    _fcn = _name.startswith("fcn")
    CASES[f"{_name}-slim"] = Case(_name, {}, [*FCN_ODD, (2, 31, 20)] if _fcn else ODD, slim=True)
    CASES[_name] = Case(_name, {}, FCN_ODD if _fcn else ODD, slow=True)
assert {case.name for case in CASES.values()} == set(densepred.list_models())  # every registered model


def _params(case: str) -> list:
    marks = [pytest.mark.slow] if CASES[case].slow else []
    return [pytest.param(case, fmt, marks=marks, id=f"{case}-{fmt}") for fmt in ("onnx", "torchscript")]


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial values where the init is trivial: zero scoring layers, identity batch norm."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.any():  # FCN's zero-initialised scoring layers
                m.weight.normal_(0, 0.01, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.0, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model.eval()


_built: dict[str, tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]] = {}


def _model_and_reference(case: str):
    """The model, inputs and eager logits for ``case``; one case kept at a time (the big nets are 540 MB)."""
    if case not in _built:
        _built.clear()
        c = CASES[case]
        channels = 1 if c.name.startswith("unet") else 3
        torch.manual_seed(0)
        model = densepred.create_model(c.name, num_classes=5, in_channels=channels, **c.options)
        model = _randomize(slim(model) if c.slim else model)
        inputs = [torch.randn(n, channels, h, w) for n, h, w in c.sizes]
        with torch.inference_mode():
            refs = [model(x) for x in inputs]
        assert all(ref.std() > 1e-2 for ref in refs)  # logits large enough for the tolerance to mean something
        _built[case] = (model, inputs, refs)
    return _built[case]


def _check_parity(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    diff = (out - ref).abs().max().item()
    assert diff <= MAX_ABS_DIFF, f"max abs logit difference {diff:.3g}"
    agreement = (out.argmax(1) == ref.argmax(1)).double().mean().item()
    assert agreement >= MIN_ARGMAX_AGREEMENT, f"argmax agrees on {agreement:.6%} of pixels"
    return diff


@pytest.mark.parametrize(("case", "fmt"), [p for case in CASES for p in _params(case)])
def test_export_matches_eager_at_other_sizes(case, fmt, tmp_path):
    model, inputs, refs = _model_and_reference(case)
    if fmt == "onnx":
        session = onnx_session(export_onnx(model, tmp_path / "m.onnx", example_size=CASES[case].trace))
        run = lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    else:
        export_torchscript(model, tmp_path / "m.pt", example_size=CASES[case].trace)
        loaded = torch.jit.load(str(tmp_path / "m.pt"))
        run = lambda x: loaded(x)
    with torch.inference_mode():
        for x, ref in zip(inputs, refs, strict=True):
            _check_parity(run(x), ref)
    assert not model.training  # export restored the mode it found


def test_onnx_sessions_do_not_spin_between_runs(tmp_path):
    """The pool sleeps after a run, leaving the cores to the work between runs (argmax, PNGs)."""
    model = densepred.create_model("unet_padded", num_classes=3, base_channels=2).eval()
    session = onnx_session(export_onnx(model, tmp_path / "m.onnx", example_size=(64, 64)), threads=2)
    assert session.get_session_options().get_session_config_entry(SPINNING) == "0"
    assert session.get_session_options().intra_op_num_threads == 2


def test_valid_unet_metadata_states_the_output_size():
    model = densepred.create_model("unet", base_channels=2).eval()
    out = model_metadata(model)["output"]
    assert out["shrink"] == 572 - 388 and "188 + 16*k" in out["input_sizes"]
    with torch.inference_mode():
        assert model(torch.zeros(1, 1, 188, 204)).shape[-2:] == (188 - out["shrink"], 204 - out["shrink"])
    assert model_metadata(densepred.create_model("unet_padded", base_channels=2))["output"]["shrink"] == 0


def test_metadata_round_trips(tmp_path):
    import onnx

    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=2, depth=2)
    names, palette = ["sky", "road", "car"], [(0, 0, 255), (128, 64, 128), (255, 0, 0)]
    meta = model_metadata(model, model_name="unet_padded", normalization="imagenet", class_names=names, palette=palette)
    onnx_file = export_onnx(model, tmp_path / "m.onnx", metadata=meta, opset=DEFAULT_OPSET)
    ts_file = export_torchscript(model, tmp_path / "m.pt", metadata=meta)
    for path in (onnx_file, ts_file):
        back = read_metadata(path)
        assert back == json.loads(json.dumps(meta))
        assert back["class_names"] == names and back["palette"] == [list(c) for c in palette]
        pre = back["preprocessing"]
        assert pre["channel_order"] == "RGB" and pre["normalization"] == "imagenet"
        np.testing.assert_allclose(pre["mean"], [0.485 * 255, 0.456 * 255, 0.406 * 255], rtol=1e-6)
        np.testing.assert_allclose(pre["std"], [0.229 * 255, 0.224 * 255, 0.225 * 255], rtol=1e-6)
        assert back["input"]["layout"] == "NCHW" and back["model"] == "unet_padded"
        assert back["densepred_version"] == densepred.__version__ and back["output_stride"] == 1
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["class_names"]) == names and json.loads(props["std"]) == meta["preprocessing"]["std"]
    assert props["model"] == "unet_padded" and props["output_size_rule"] == "same as input"
    # The preprocessing in the file is enough to reproduce the eager pipeline from 0..255 pixels.
    from densepred.data import IMAGENET

    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    mean, std = np.array(pre["mean"], np.float32), np.array(pre["std"], np.float32)
    by_metadata = ((pixels.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(by_metadata, IMAGENET(pixels).numpy(), atol=1e-5)


def test_caffe_metadata_says_bgr_in_pixel_units():
    model = densepred.create_model("unet_padded", num_classes=2, in_channels=3, base_channels=2, depth=2)
    pre = model_metadata(model, normalization="caffe")["preprocessing"]
    assert pre["channel_order"] == "BGR" and pre["std"] == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(pre["mean"], [104.00699, 116.66877, 122.67892])


def test_bad_opset_and_foreign_files_are_clear_errors(tmp_path):
    model = densepred.create_model("unet_padded", base_channels=2, depth=2)
    with pytest.raises(ValueError, match="opset 9 is not supported; use 11..20"):
        export_onnx(model, tmp_path / "m.onnx", opset=9)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither an ONNX file nor a TorchScript archive"):
        read_metadata(tmp_path / "junk.onnx")


# --- the `densepred export` command on a checkpoint from a 2-iteration training run -------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("run"), "data.normalization=imagenet", "train.iterations=2")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_cli_export_writes_next_to_the_checkpoint(checkpoint, fmt, capsys):
    from densepred.checkpoint import load_trained
    from densepred.cli import main

    assert main(["export", "--checkpoint", str(checkpoint), "--format", fmt]) == 0
    suffix = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}[fmt]
    out = checkpoint.with_name(checkpoint.stem + suffix)
    assert f"wrote {out}" in capsys.readouterr().out
    if fmt == "safetensors":
        from safetensors.torch import load_file

        assert set(load_file(str(out))) == set(load_trained(checkpoint).model.state_dict())
        return
    trained = load_trained(checkpoint)
    meta = read_metadata(out)
    assert meta["model"] == "unet_padded" and meta["class_names"] == trained.class_names
    assert meta["palette"] == [list(c) for c in trained.palette] and meta["iteration"] == 2
    assert meta["preprocessing"]["normalization"] == "imagenet" and len(meta["preprocessing"]["mean"]) == 3
    x = torch.randn(1, 3, 37, 45)
    with torch.inference_mode():
        ref = trained.model(x)
        if fmt == "onnx":
            got = torch.from_numpy(onnx_session(out).run(None, {"image": x.numpy()})[0])
        else:
            got = torch.jit.load(str(out))(x)
    _check_parity(got, ref)


def test_cli_export_options_and_errors(checkpoint, tmp_path, capsys):
    from densepred.checkpoint import save_atomic
    from densepred.cli import main

    out = tmp_path / "model.onnx"
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--opset", "13"]) == 0
    )
    import onnx

    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")) == 13

    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(checkpoint), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err

    weights_only = save_atomic({"weights": {"w": torch.zeros(2)}}, tmp_path / "weights.pt")
    for fmt in ("onnx", "torchscript", "safetensors"):
        assert main(["export", "--checkpoint", str(weights_only), "--format", fmt]) == 2
        assert "is not a densepred training checkpoint" in capsys.readouterr().err

    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--opset", "13"]) == 2
    assert "--opset applies to --format onnx only" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(checkpoint)]) == 2
    assert "would overwrite the checkpoint" in capsys.readouterr().err


def test_cli_export_writes_what_the_file_name_says(checkpoint, tmp_path, capsys):
    """Before: ``--out m.onnx`` without ``--format`` wrote safetensors bytes into m.onnx (exit 0)."""
    from densepred.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert read_metadata(out)["model"] == "unet_padded"  # an ONNX file with our metadata
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "w.pt")]) == 0
    assert read_metadata(tmp_path / "w.pt")["model"] == "unet_padded"  # TorchScript
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 2
    assert "--format safetensors but --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("config"), "no 'config' entry"),
        (lambda s: s["config"]["model"].update(name="fcn8s", options={}), "weights do not fit fcn8s"),
    ],
)
def test_cli_export_refuses_checkpoints_the_other_commands_refuse(checkpoint, tmp_path, capsys, edit, message):
    from densepred.checkpoint import load_checkpoint, save_atomic
    from densepred.cli import main

    state = load_checkpoint(checkpoint)
    edit(state)
    bad = save_atomic(state, tmp_path / "edited.pt")
    assert main(["export", "--checkpoint", str(bad), "--format", "safetensors"]) == 2
    assert message in capsys.readouterr().err


class _FullDisk:
    """A file object that accepts ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(28, "No space left on device")
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_full_disk_during_export_is_an_error_and_keeps_the_previous_file(
    checkpoint, fmt, tmp_path, capsys, monkeypatch
):
    """A failed write raises (torch.jit.save given a path aborts the process instead) and leaves no torn file."""
    import os

    from densepred.cli import main

    out = tmp_path / f"model.{fmt}"
    out.write_bytes(b"previous export")
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real_fdopen(fd, *a, **k), room=4096))
    assert main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    what = {"onnx": "ONNX file", "torchscript": "TorchScript file", "safetensors": "safetensors file"}[fmt]
    assert f"writing {what} {out} failed (No space left on device); any previous {what} is intact" in err
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temporary file is gone


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_max_unpool_written_as_a_scatter_computes_the_same_logits():
    """OpenVINO has no MaxUnpool: it reads SegNet's graph with each one written as a flat scatter."""
    from collections import Counter

    torch.manual_seed(0)
    model = _randomize(densepred.create_model("segnet", num_classes=5))
    proto = trace_onnx(model)
    lowered = scatter_max_unpool(proto)
    ops = Counter(node.op_type for node in lowered.graph.node)
    assert ops["MaxUnpool"] == 0 and ops["ScatterElements"] == 5
    assert Counter(node.op_type for node in proto.graph.node)["MaxUnpool"] == 5  # the original is left as it was
    x = torch.randn(2, 3, 41, 57)  # odd sides: the ceil-mode poolings' partial windows
    with torch.inference_mode():
        reference = model(x).numpy()
    import onnxruntime as ort

    for graph in (proto, lowered):
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], reference, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_a_graph_without_max_unpool_is_copied_unchanged():
    torch.manual_seed(0)
    proto = trace_onnx(densepred.create_model("lraspp_mobilenet_v3_large", num_classes=3))
    assert scatter_max_unpool(proto) == proto
