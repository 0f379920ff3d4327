"""Int8 static quantisation (densepred.quantize): float logits of the model's shape, argmax close
to fp32's, an exported file with the float export's metadata, and the CLI's --int8 options."""

import json

import numpy as np
import pytest
import torch

from densepred import create_model
from densepred import quantize as quantize_module
from densepred.checkpoint import load_checkpoint, save_atomic
from densepred.cli import main
from densepred.config import EvalConfig
from densepred.export import export_onnx, onnx_session, read_metadata
from densepred.inference import predict_logits
from densepred.models.base import SegmentationModel
from densepred.quantize import (
    DEFAULT_CALIBRATION,
    Quantized,
    calibration_images,
    export_int8_onnx,
    int8_options,
    quantize,
    quantized_onnx,
    training_images,
)
from slim import slim
from tiny import tiny_checkpoint

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

CLASSES = 5


def _noise(count: int, size: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, *size, generator=g) for _ in range(count)]


@pytest.fixture(scope="module")
def slim_deeplab():
    """DeepLab v1 LargeFOV with 1/16 of VGG16's widths: the full net's graph, fast."""
    torch.manual_seed(0)
    return slim(create_model("deeplab_v1_largefov", num_classes=CLASSES)).eval()


@pytest.fixture(scope="module")
def quantized(slim_deeplab):
    return quantize(slim_deeplab, _noise(4, (64, 64)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run"))


def test_the_quantised_module_gives_float_logits_of_the_models_shape(slim_deeplab, quantized):
    x = _noise(1, (72, 56), seed=1)[0]  # not the calibration size: the int8 graph's sizes are dynamic
    with torch.inference_mode():
        out, ref = quantized(x), slim_deeplab(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (1, CLASSES, 72, 56)
    assert (quantized.num_classes, quantized.in_channels) == (CLASSES, 3)
    assert not quantized.training  # evaluate() restores the mode it found, the float model's too
    # Sliding-window inference takes it as it takes the model.
    tiled = predict_logits(quantized, x, EvalConfig(mode="slide", tile=48, amp="none"))
    assert tiled.shape == (1, CLASSES, 72, 56)
    assert "int8 on onnxruntime" in quantized.describe()


def test_without_vnni_the_description_says_int8_may_be_no_faster(slim_deeplab, quantized):
    details = dict(quantized.details, weights="int8, symmetric, per output channel (7-bit range: no VNNI)")
    assert "no VNNI: int8 may run no faster than float32" in Quantized(slim_deeplab, None, details).describe()
    details["weights"] = "int8, symmetric, per output channel"
    assert "VNNI" not in Quantized(slim_deeplab, None, details).describe()


def test_int8_runs_several_frames_at_once_a_session_each_on_its_share_of_the_threads(quantized, monkeypatch):
    """Each stream is the same int8 graph in a session of its own (one session's runs would share
    its pool), on half the threads, labelling as the quantised module does."""
    from concurrent.futures import ThreadPoolExecutor

    from densepred.backends import AGREEMENT, stream_models
    from densepred.precision import torch_threads

    made, session = [], quantize_module._session

    def counted(graph: bytes, threads: int):  # noqa: ANN202
        made.append(threads)
        return session(graph, threads)

    monkeypatch.setattr(quantize_module, "_session", counted)
    x = _noise(4, (64, 80), seed=3)
    with torch_threads(2):
        streams = stream_models(quantized, x[0], 2, limit=4)
        with torch.inference_mode():
            expected = [quantized(v).argmax(1) for v in x]
    assert len(streams) == 2 and all(isinstance(s, Quantized) and s.backend == quantized.backend for s in streams)
    assert made == [1, 1] and streams[0].details == quantized.details

    def label(k: int) -> torch.Tensor:
        with torch_threads(1), torch.inference_mode():
            return streams[k % 2](x[k]).argmax(1)

    with ThreadPoolExecutor(2) as pool:
        for ours, theirs in zip(pool.map(label, range(len(x))), expected, strict=True):
            assert (ours == theirs).float().mean().item() >= AGREEMENT
    with pytest.raises(ValueError, match="eval.streams=1"):
        Quantized(quantized.model, None, quantized.details).streams(2, x[0])


def test_int8_argmax_agrees_with_fp32_on_most_pixels(slim_deeplab, quantized):
    x = _noise(2, (80, 96), seed=2)
    with torch.inference_mode():
        agree = [(quantized(v).argmax(1) == slim_deeplab(v).argmax(1)).float().mean().item() for v in x]
    assert min(agree) > 0.98, agree


def test_the_int8_file_carries_the_float_exports_metadata_and_runs(slim_deeplab, tmp_path):
    meta = {"class_names": [f"c{i}" for i in range(CLASSES)]}
    path = export_int8_onnx(slim_deeplab, tmp_path / "m.int8.onnx", _noise(2, (48, 48)), metadata=meta)
    float_path = export_onnx(slim_deeplab, tmp_path / "m.onnx", metadata=meta)
    read, read_float = read_metadata(path), read_metadata(float_path)
    assert read["quantization"]["calibration_images"] == 2
    assert {k: v for k, v in read.items() if k != "quantization"} == read_float
    graph = onnx.load(path).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    # The classifier head stays float: logits rounded to 256 levels would tie in the argmax.
    producer = {out: node for node in graph.node for out in node.output}
    assert producer[graph.output[0].name].op_type not in ("QuantizeLinear", "DequantizeLinear")
    assert any("Conv" in name for name in read["quantization"]["float_nodes"])
    x = _noise(1, (40, 56), seed=3)[0]
    out = onnx_session(path).run(None, {"image": x.numpy()})[0]
    assert out.shape == (1, CLASSES, 40, 56) and out.dtype == "float32"


def test_the_head_and_what_switches_pool_stay_float_but_the_first_pooling():
    """conv1 -> relu1 -> pool1 -> conv2 -> relu2 -> pool2 -> conv3 -> relu3 -> unpool2 -> unpool1
    -> score, each unpooling with its pooling's indices: the head and what pool2 pools stay float;
    pool1 (full resolution, a moved switch moves a value by one pixel) pools int8 values."""
    from onnx import TensorProto, helper

    from densepred.quantize import _float_nodes

    def pool(k: int, x: str) -> list:  # as PyTorch exports one: a 1x1 twin on the same input gives offsets
        return [
            helper.make_node(
                "MaxPool", [x], [f"p{k}", f"idx{k}"], name=f"pool{k}", kernel_shape=[2, 2], strides=[2, 2]
            ),
            helper.make_node("MaxPool", [x], [f"q{k}", f"off{k}"], name=f"twin{k}", kernel_shape=[1, 1]),
            helper.make_node("Sub", [f"idx{k}", f"off{k}"], [f"flat{k}"], name=f"sub{k}"),
        ]

    def unpool(k: int, x: str) -> object:
        return helper.make_node(
            "MaxUnpool", [x, f"flat{k}"], [f"u{k}"], name=f"unpool{k}", kernel_shape=[2, 2], strides=[2, 2]
        )

    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        *pool(1, "r1"),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        *pool(2, "r2"),
        helper.make_node("Conv", ["p2", "w3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        unpool(2, "r3"),
        unpool(1, "u2"),
        helper.make_node("Conv", ["u1", "w4"], ["logits"], name="score"),
    ]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("image", "logits")]
    graph = helper.make_graph(nodes, "g", [info[0]], [info[1]])
    assert set(_float_nodes(graph)) == {"score", "unpool1", "unpool2", "sub1", "sub2", "relu2", "conv2"}


def test_segnets_first_pooling_pools_the_uint8_values_and_computes_the_same(monkeypatch):
    """The first pooling's values are int8 (the switch it may move moves a value by a pixel): it
    pools the uint8 tensor itself, not a dequantised copy; later poolings pool float values."""
    import numpy as np

    import densepred.quantize as quantize_module

    torch.manual_seed(0)
    model = create_model("segnet", num_classes=CLASSES).eval()  # batch norms: no slim copy
    images = _noise(2, (48, 64))
    rewritten, _ = quantize_module.quantized_onnx(model, images)
    monkeypatch.setattr(quantize_module, "_pool_quantized_values", lambda graph: 0)
    plain, _ = quantize_module.quantized_onnx(model, images)

    def pooled_inputs(proto) -> list[str]:
        producer = {out: node.op_type for node in proto.graph.node for out in node.output}
        return [producer[n.input[0]] for n in proto.graph.node if n.op_type == "MaxPool"]

    assert pooled_inputs(plain) == ["DequantizeLinear", "Relu", "Relu", "Relu", "Relu"]
    assert pooled_inputs(rewritten) == ["QuantizeLinear", "Relu", "Relu", "Relu", "Relu"]
    x = _noise(1, (40, 56), seed=3)[0].numpy()  # odd pooled sides on the way down
    outputs = []
    for proto in (plain, rewritten):
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"image": x})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_segnets_switch_layers_multiply_in_int8_with_float_outputs():
    """The layers that compute what poolings 2-5 pool (their switches) keep an output that is not
    rounded to 256 levels, but multiply int8 by int8: MatMulIntegerToFloat over an im2col; only
    the head (the classifier) stays a float convolution."""
    import numpy as np

    torch.manual_seed(0)
    model = create_model("segnet", num_classes=CLASSES).eval()
    proto, details = quantized_onnx(model, _noise(2, (48, 64)), onnxruntime_ops=True)
    assert len(details["int8_products_float_outputs"]) == 4
    nodes = list(proto.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    assert [n.op_type for n in nodes].count("MatMulIntegerToFloat") == 4
    float_convs = [n for n in nodes if n.op_type == "Conv" and n.input[1] not in producer]  # float weights
    assert len(float_convs) == 1 and float_convs[0].output[0] == proto.graph.output[0].name  # the classifier
    # Poolings 2-5 pool ReLUs of the integer products, laid back to channels first.
    pooled = [producer[n.input[0]] for n in nodes if n.op_type == "MaxPool"][1:]
    for relu in pooled:
        transpose = producer[relu.input[0]]
        assert (relu.op_type, transpose.op_type) == ("Relu", "Transpose")
        assert producer[transpose.input[0]].op_type == "MatMulIntegerToFloat"
    portable, details = quantized_onnx(model, _noise(2, (48, 64)))  # what export_int8_onnx writes
    assert details["int8_products_float_outputs"] == []
    assert {n.domain for n in portable.graph.node} <= {"", "ai.onnx"}  # standard operators: any runtime
    x = _noise(1, (40, 56), seed=3)[0].numpy()  # odd sides on the way down: the im2col takes any size
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": x})[0]
    assert out.shape == (1, CLASSES, 40, 56) and np.isfinite(out).all()
    # What each rewritten layer computes is checked exactly below; the accuracy on CamVid by the benchmark.


def test_integer_products_are_the_convolution_with_the_int8_weights():
    """The rewrite computes conv(dequantised input, dequantised int8 weights) + bias exactly (up to
    float summation order), at any size and batch; a convolution it does not cover stays."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from densepred.quantize import _integer_products

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[2] = 0  # a channel of zeros: its scale must not divide by zero
    b = rng.standard_normal(6).astype(np.float32)
    scale, zero = np.float32(0.05), np.uint8(7)
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"], name="dq"),
        helper.make_node("Conv", ["xf", "w", "b"], ["y"], name="conv", pads=[1] * 4, kernel_shape=[3, 3]),
        helper.make_node("Conv", ["xf", "w"], ["y2"], name="strided", pads=[1] * 4, strides=[2, 2]),
    ]
    inits = [
        numpy_helper.from_array(v, n) for n, v in {"s": np.array(scale), "z": np.array(zero), "w": w, "b": b}.items()
    ]
    io = [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 4, None, None])]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "y2")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", io, out, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    assert _integer_products(model.graph, ["conv", "strided"], reduce_range=True) == ["conv"]
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert [n.name for n in model.graph.node if n.op_type == "Conv"] == ["strided"]
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.integers(0, 256, (2, 4, 5, 7), dtype=np.uint8)
    y = session.run(["y"], {"x": x})[0]
    w_scale = np.abs(w).reshape(6, -1).max(1) / 63  # 7-bit: reduce_range
    w_scale[w_scale == 0] = 1
    w_int8 = np.clip(np.round(w / w_scale[:, None, None, None]), -63, 63) * w_scale[:, None, None, None]
    xf = (x.astype(np.float32) - zero) * scale
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(xf), torch.from_numpy(w_int8.astype(np.float32)), torch.from_numpy(b), padding=1
    )
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-4)
    assert not y[:, 2].any() or np.allclose(y[:, 2], b[2])  # the zero channel gives its bias


def test_a_quantised_hardsigmoid_is_one_requantisation_within_rounding_of_the_float_gate():
    """DequantizeLinear -> HardSigmoid -> QuantizeLinear becomes one uint8 QLinearAdd: on every
    one of the 256 input levels its dequantised gate is within half a step (1/510) of the float
    HardSigmoid, exactly 0 at and below -3 and 1 at and above 3; a per-channel dequantise stays."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from densepred.quantize import _integer_hardsigmoids

    scale, zero = np.float32(0.05), np.uint8(120)  # levels span [-6, 6.75]: both saturations
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"], name="dq"),
        helper.make_node("HardSigmoid", ["xf"], ["g"], name="gate", alpha=1 / 6, beta=0.5),
        helper.make_node("QuantizeLinear", ["g", "gs", "gz"], ["gq"], name="q"),
        helper.make_node("DequantizeLinear", ["gq", "gs", "gz"], ["y"], name="dq_gate"),
        helper.make_node("DequantizeLinear", ["x", "cs", "cz"], ["xc"], name="dq_channels", axis=1),
        helper.make_node("HardSigmoid", ["xc"], ["gc"], name="per_channel", alpha=1 / 6, beta=0.5),
        helper.make_node("QuantizeLinear", ["gc", "gs", "gz"], ["yc"], name="qc"),
    ]
    values = {
        "s": np.array(scale), "z": np.array(zero), "gs": np.array(1 / 255, np.float32),
        "gz": np.array(0, np.uint8), "cs": np.full(2, scale, np.float32), "cz": np.full(2, zero, np.uint8),
    }  # fmt: skip
    inits = [numpy_helper.from_array(v, n) for n, v in values.items()]
    io = [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 16, 8])]
    out = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("yc", TensorProto.UINT8, None),
    ]
    graph = helper.make_graph(nodes, "g", io, out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert _integer_hardsigmoids(model.graph) == ["gate"]
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("HardSigmoid") == 1 and ops.count("QLinearAdd") == 1  # the per-channel one stays
    assert "dq" not in {n.name for n in model.graph.node}  # nothing reads the float input any more
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(256, dtype=np.uint8).reshape(1, 2, 16, 8)
    gate = session.run(["y"], {"x": x})[0]
    xf = (x.astype(np.float32) - zero) * scale
    np.testing.assert_allclose(gate, np.clip(xf / 6 + 0.5, 0, 1), atol=1 / 510 + 1e-6)
    assert (gate[xf <= -3] == 0).all() and (gate[xf >= 3] == 1).all()


def test_lraspps_gates_run_in_uint8_only_where_onnx_runtime_runs_the_graph():
    """MobileNetV3's hard-swishes and squeeze-excitation gates become requantisations in the graph
    quantize() runs (ONNX Runtime's operators), not in the portable file export_int8_onnx writes;
    the logits stay those of the plain int8 graph within its rounding."""
    import numpy as np

    torch.manual_seed(0)
    model = create_model("lraspp_mobilenet_v3_large", num_classes=CLASSES).eval()
    proto, details = quantized_onnx(model, _noise(2, (64, 96)), onnxruntime_ops=True)
    portable, plain_details = quantized_onnx(model, _noise(2, (64, 96)))
    assert len(details["uint8_hardsigmoids"]) > 0 and plain_details["uint8_hardsigmoids"] == []
    count = {p: [n.op_type for n in g.graph.node].count("HardSigmoid") for p, g in (("ort", proto), ("std", portable))}
    assert count["ort"] + len(details["uint8_hardsigmoids"]) == count["std"]
    x = _noise(1, (64, 96), seed=3)[0].numpy()
    cpu = ["CPUExecutionProvider"]
    sessions = [onnxruntime.InferenceSession(p.SerializeToString(), providers=cpu) for p in (proto, portable)]
    logits = [session.run(None, {"image": x})[0] for session in sessions]
    assert logits[0].shape == (1, CLASSES, 64, 96)
    said = Quantized(model, sessions[0], details).describe()
    assert f"{len(details['uint8_hardsigmoids'])} hard-sigmoid gates requantised in uint8" in said
    spread = np.abs(logits[1]).max()
    assert np.abs(logits[0] - logits[1]).max() <= 0.05 * spread  # what CamVid's mIoU says is the benchmark's


def test_calibration_reads_every_image_a_chunk_at_a_time_and_keeps_every_chunks_ranges(slim_deeplab, monkeypatch):
    images = _noise(6, (64, 64))
    images[0] = images[0] * 10  # the widest ranges come from the first chunk
    read = []
    get_next = quantize_module._Reader.get_next
    monkeypatch.setattr(quantize_module._Reader, "get_next", lambda self: read.append(1) or get_next(self))

    def scales(chunk: int) -> dict[str, np.ndarray]:
        monkeypatch.setattr(quantize_module, "CALIBRATION_CHUNK", chunk)
        read.clear()
        proto, _ = quantized_onnx(slim_deeplab, images, calibrate="minmax")
        return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("_scale")}

    whole, chunked = scales(6), scales(2)
    assert sum(read) == 6 + 3  # each image once, and one empty read closing each of the 3 chunks
    # Minmax ranges merge exactly: chunks change nothing (ONNX Runtime's own bounded mode kept the last chunk's alone).
    assert whole.keys() == chunked.keys() and len(whole) > 5
    assert all(np.array_equal(whole[k], chunked[k]) for k in whole)
    # The strided calibration needs a chunk that divides the count.
    monkeypatch.setattr(quantize_module, "CALIBRATION_CHUNK", 4)
    assert [quantize_module._chunk(n) for n in (1, 2, 6, 31, 32)] == [1, 2, 3, 1, 4]


def test_calibration_images_spread_over_the_split():
    dataset = [{"image": torch.full((3, 4, 4), float(i))} for i in range(10)]
    picked = [int(x[0, 0, 0, 0]) for x in calibration_images(dataset, 3)]
    assert picked == [0, 3, 6]
    assert len(calibration_images(dataset, 50)) == 10  # more than there are: all of them
    with pytest.raises(ValueError, match="at least 1"):
        calibration_images(dataset, 0)


def test_int8_options_refuse_what_int8_cannot_be():
    assert int8_options(EvalConfig()) == EvalConfig(amp="none", backend="eager")
    with pytest.raises(ValueError, match="drop --amp bf16"):
        int8_options(EvalConfig(amp="bf16"))
    with pytest.raises(ValueError, match="--backend torchscript"):
        int8_options(EvalConfig(backend="torchscript"))


def test_cli_eval_and_predict_run_int8_and_say_so(checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "--int8", "2", "--out", str(tmp_path / "eval")]) == 0
    assert "int8 on onnxruntime" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["int8"]["calibration_images"] == 2
    from PIL import Image

    Image.new("RGB", (40, 48), (90, 120, 30)).save(tmp_path / "in.png")
    cmd = ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in.png"), "--out", str(tmp_path / "pred")]
    assert main([*cmd, "--int8", "1", "--no-progress"]) == 0
    assert "int8 on onnxruntime" in capsys.readouterr().out
    assert (tmp_path / "pred" / "in.png").is_file()


def test_cli_export_int8_writes_an_int8_onnx_file(checkpoint, capsys):
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--int8", "2"]) == 0
    written = checkpoint.with_name(checkpoint.stem + ".int8.onnx")
    assert str(written) in capsys.readouterr().out
    assert read_metadata(written)["quantization"]["calibration_images"] == 2
    assert read_metadata(written)["quantization"]["calibration"] == DEFAULT_CALIBRATION == "percentile"
    again = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--int8", "2", "--calibrate", "minmax"]
    assert main(again) == 0
    assert read_metadata(written)["quantization"]["calibration"] == "minmax"


class _Saturated(SegmentationModel):
    """A convolution whose output is 1 within a few float32 steps, as a saturated gate's: too narrow
    a range for a histogram of 2,048 bins."""

    in_channels, num_classes = 3, CLASSES

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Conv2d(3, 4, 1)
        self.classifier = torch.nn.Conv2d(4, CLASSES, 1)
        with torch.no_grad():
            self.gate.weight.fill_(1e-8)
            self.gate.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.gate(x)))


def test_histogram_ranges_fall_back_to_minmax_on_a_near_constant_tensor_and_say_so():
    model, images = _Saturated().eval(), _noise(2, (16, 16))
    with pytest.raises(ValueError, match="bins"):
        np.histogram(np.abs(model.gate(images[0]).detach().numpy()), bins=2048)  # what ONNX Runtime's calibrator does
    int8 = quantize(model, images)  # the default, percentile
    assert int8.details["calibration"] == "minmax"
    assert "percentile's histograms failed" in int8.details["calibration_fallback"]
    assert "minmax ranges from 2 images (percentile's histograms failed" in int8.describe()
    assert int8(images[0]).shape == (1, CLASSES, 16, 16)
    _, details = quantized_onnx(slim(create_model("deeplab_v1_largefov", num_classes=CLASSES)).eval(), images[:1])
    assert details["calibration"] == "percentile" and details["calibration_fallback"] is None


def test_cli_int8_usage_errors_name_the_option(checkpoint, tmp_path, capsys):
    base = ["export", "--checkpoint", str(checkpoint)]
    assert main([*base, "--format", "torchscript", "--int8", "2"]) == 2
    assert "--int8 writes ONNX" in capsys.readouterr().err
    assert main([*base, "--format", "onnx", "--calibration-data", str(tmp_path)]) == 2
    assert "--calibration-data applies with --int8 only" in capsys.readouterr().err
    assert main([*base, "--format", "onnx", "--calibrate", "entropy"]) == 2
    assert "--calibrate applies with --int8 only" in capsys.readouterr().err
    assert main(["export", "--weights", "fcn8s.voc_caffe", "--int8", "2"]) == 2
    assert "--weights fcn8s.voc_caffe has none" in capsys.readouterr().err


def test_missing_calibration_data_is_an_error_naming_the_option(checkpoint, tmp_path, capsys):
    state = load_checkpoint(checkpoint)
    state["config"]["data"].update(dataset="camvid", root=None)  # a recipe whose data is not here
    moved = save_atomic(state, tmp_path / "camvid.pt")
    assert main(["export", "--checkpoint", str(moved), "--int8", "2"]) == 2
    err = capsys.readouterr().err
    assert "--calibration-data ROOT" in err and "camvid 'train' split" in err
    missing = str(tmp_path / "no_such_folder")
    assert main(["export", "--checkpoint", str(moved), "--int8", "2", "--calibration-data", missing]) == 2
    assert "--calibration-data ROOT" in capsys.readouterr().err
    from densepred.checkpoint import load_trained

    with pytest.raises(ValueError, match="--calibration-data"):
        training_images(load_trained(moved), 2)
