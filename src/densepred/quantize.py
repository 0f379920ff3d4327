"""Int8 post-training static quantisation, calibrated on training images, for inference and export.

Weights become int8 (symmetric, one scale per output channel), activations uint8 (one scale and
zero point per tensor, from the ranges the network reaches on ``N`` calibration images), as in
Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference" (CVPR 2018), Sec. 2; no retraining. The network is traced to ONNX
(:func:`densepred.export.trace_onnx`) and quantised by ONNX Runtime (``quantize_static``, QDQ
format: QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer kernels, and
that TensorRT or OpenVINO read too). The same graph serves :func:`quantize` (a module whose
forward returns float logits, so sliding-window and multi-scale inference work unchanged) and
:func:`export_int8_onnx` (a file with :func:`densepred.export.model_metadata`'s description).

Why ONNX Runtime (``python -m benchmarks int8``; the figures in runs/bench/int8.json are facts
about the machine named there, here a 2-core AMD EPYC with AVX512-VNNI): it ran every net tried
and its int8 was the fastest on two of three. LR-ASPP at 360x480 took 0.05 s per image against
PyTorch int8's 0.14 s (oneDNN engine) and 0.64 s (x86 engine); FCN-8s at 256x256 0.21 s, where
PyTorch cannot run (its per-channel quantised transposed convolution is disabled). PyTorch's x86
engine was faster on SegNet (0.33 s against 0.46 s at 360x480, both with rounded switches, see
below). PyTorch's routes are also the weaker design here: this torch build has no PT2E flow
(``prepare_pt2e`` and the X86 inductor quantizer moved to torchao, not a dependency); FX graph
mode cannot trace the models' input checks (Python ``if`` on sizes); the TorchScript flow
(``quantize_jit``, deprecated with TorchScript) sets the process-wide
``torch.backends.quantized.engine`` and writes nothing another runtime reads, whereas one ONNX
graph is both what runs and what is exported. OpenVINO, which reads the same QDQ file (its
standard-operator form), was slower on the 2-core AVX2 EPYC (2 threads, random weights):
LR-ASPP at 360x480 0.029 s against ONNX Runtime's 0.027, SegNet 2.85 s against 0.94, longer
than eager fp32's 1.51 s (its switch layers are float convolutions in that form). ONNX Runtime
picks its kernels by CPUID itself (VNNI, AVX512, AVX2): ``ATEN_CPU_CAPABILITY`` and
``ONEDNN_MAX_CPU_ISA`` move PyTorch's fp32 baseline, not it.

What stays float, because an argmax of rounded values ties and the first maximum wins:
- the head, from the network's last nonlinearities to its output (classifier convolutions, their
  upsampling, crops and sums). On a weakly trained CamVid SegNet, logits rounded to 256 levels
  moved about half of the labels; the classifier layers are a small share of the work;
- the layers computing what a max pooling whose indices are used pools (SegNet's switches, Sec.
  3), from the second pooling on: tied values inside a window move the switch, and the decoder
  puts the value elsewhere. On the same SegNet (CamVid val, fp32 14.47 mIoU) rounding all five
  pre-pooling convolutions cost 1 point (argmax agreement 80 %), rounding the first two 0.70
  points (13.77), rounding only the first (full resolution: a moved switch moves a value by one
  pixel) none (14.50). The first is int8: at 256x256 the int8 graph then runs at x2.12 eager
  fp32 instead of x1.95 (``python -m benchmarks int8``), and its pooling reads the uint8 values
  themselves (:func:`_pool_quantized_values`). The later four keep float *outputs* but multiply
  in int8 (:func:`_integer_products`): what moves a switch is an output rounded to 256 levels,
  not int8 products summed in int32. On the AVX2 EPYC this took SegNet's int8 graph at 360x480
  from x1.97 to x2.21 eager fp32, at the same accuracy.

Where ONNX Runtime runs the graph, MobileNetV3's gates (the ``HardSigmoid`` of each hard-swish and
squeeze-excitation) do not leave uint8 either: each is one requantisation
(:func:`_integer_hardsigmoids`), exact up to rounding, instead of a float detour.

Int8 is opt-in (``--int8 N``): it computes something close to, not the same as, float32, so it
fails the argmax-parity rule (:data:`densepred.backends.AGREEMENT`) that the automatic backends
must meet; its cost in mIoU is what the benchmark measures on CamVid val.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .backends import Accelerated
from .config import EvalConfig, Experiment
from .streams import stream_share

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from .checkpoint import Trained

__all__ = [
    "CALIBRATIONS",
    "DEFAULT_CALIBRATION",
    "DEFAULT_CALIBRATION_IMAGES",
    "Quantized",
    "quantize",
    "export_int8_onnx",
    "quantized_onnx",
    "calibration_images",
    "training_images",
    "int8_options",
    "int8_model",
]

DEFAULT_CALIBRATION_IMAGES = 32
# How activation ranges come from the calibration images (ONNX Runtime's calibrators): minmax the
# extremes seen; percentile clips at the 99.999th; entropy minimises the KL divergence (TensorRT's).
CALIBRATIONS = ("minmax", "percentile", "entropy")
# Percentile lost fewer mIoU points than minmax on every trained model measured (CamVid val,
# LR-ASPP: 0.49 against 0.94 and 0.35 against 0.49; SegNet gained 1.61 against 1.18). ONNX
# Runtime's histograms fail on a tensor of near-constant values ("Too many bins for data range",
# e.g. a random-weight LR-ASPP's saturated gates): such a calibration falls back to minmax, which
# always works, and says so (``details["calibration_fallback"]``).
DEFAULT_CALIBRATION = "percentile"
_HISTOGRAMS = ("percentile", "entropy")
RUNTIME = "onnxruntime"
# Weights take 7 bits where x86 lacks VNNI (_reduce_range); the description then warns of the speed.
_SEVEN_BIT = " (7-bit range: no VNNI)"
NO_VNNI = "; this CPU has no VNNI: int8 may run no faster than float32 here (python -m benchmarks.int8 measures it)"
# Ops past which a logit is no longer a linear function of the features before it; the float
# head ends there. Shape is here because a size carries no rounding error.
_NONLINEAR = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Gelu", "Mish", "Softplus", "Tanh",
    "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "MaxPool", "Shape",
}  # fmt: skip
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class Quantized(Accelerated):
    """``model`` whose forward runs the int8 graph on ONNX Runtime (float32 logits out); the
    declarations (input rule, classes, output stride) stay the model's own."""

    def __init__(self, model: nn.Module, session: Any, details: Mapping[str, Any], graph: bytes = b"") -> None:
        from .export import INPUT_NAME

        def run(x: Tensor) -> Tensor:
            out = session.run(None, {INPUT_NAME: x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(out).to(x.device)

        super().__init__(model, run, f"{RUNTIME} int8")
        self.details = dict(details)
        # The serialised int8 graph, for a session per stream: a copy as large as the int8 weights,
        # which ONNX Runtime cannot hand from one session to another.
        self._graph = graph
        # An inference graph: in eval mode from the start, so that a caller restoring the mode it
        # found (evaluate) leaves the float model's batch norms in eval mode too.
        self.eval()

    def streams(self, count: int, example: Tensor) -> list[Quantized]:
        """``count`` copies of this int8 graph, each a session on an equal share of the threads."""
        if not self._graph:
            raise ValueError("this int8 model keeps no graph to run several frames at once: use eval.streams=1")
        threads = stream_share(count)
        return [Quantized(self.model, _session(self._graph, threads), self.details, self._graph) for _ in range(count)]

    def describe(self) -> str:
        d = self.details
        integer = len(d["int8_products_float_outputs"])
        gates = len(d["uint8_hardsigmoids"])
        fallback = f" ({d['calibration_fallback']})" if d.get("calibration_fallback") else ""
        return (
            f"int8 on {d['runtime']} {d['runtime_version']} ({d['format']}, per-channel int8 weights, "
            f"uint8 activations, {d['calibration']} ranges from {d['calibration_images']} images{fallback}; "
            f"{len(d['float_nodes'])} nodes kept float"
            + (f", {integer} of them convolutions with int8 products and float outputs" if integer else "")
            + (f"; {gates} hard-sigmoid gates requantised in uint8" if gates else "")
            + ")"
            # Without VNNI every 32 int8 products take two integer multiply-adds: a Zen 2 core,
            # with one integer multiply pipe against two FMAs, ran a dense layer at 0.92x float32.
            + (NO_VNNI if d["weights"].endswith(_SEVEN_BIT) else "")
        )


def calibration_images(dataset: Sequence[dict[str, Tensor]], count: int) -> list[Tensor]:
    """``count`` normalised images ``(1, C, H, W)`` spread evenly over ``dataset`` (a split is
    often stored sequence by sequence: its first images would all be one scene)."""
    if count < 1:
        raise ValueError(f"the calibration needs at least 1 image, got {count}")
    total = len(dataset)
    if total == 0:
        raise ValueError("the calibration dataset holds no images")
    picks = sorted({i * total // min(count, total) for i in range(min(count, total))})
    return [dataset[i]["image"][None] for i in picks]


def training_images(
    trained: Trained, count: int, *, experiment: Experiment | None = None, root: str | Path | None = None
) -> list[Tensor]:
    """``count`` images of the training split of ``experiment``'s dataset (default: the
    checkpoint's recipe), normalised as in training, to calibrate on; ``root`` moves the dataset.

    Raises:
        ValueError: the data cannot be read (the message names ``--calibration-data``), or the
        model's preprocessing has no recipe name to normalise with.
    """
    from .build import build_dataset

    if count < 1:
        raise ValueError(f"--int8 needs at least 1 calibration image, got {count}")
    if not isinstance(trained.normalization, str):
        raise ValueError(
            "--int8: the model's preprocessing has no data.normalization name to calibrate with; "
            "call densepred.quantize.quantize(model, images) with normalised images"
        )
    exp = dataclasses.replace(experiment or trained.experiment)
    exp.data = dataclasses.replace(exp.data, root=str(root) if root is not None else exp.data.root)
    split = exp.data.train_split
    try:
        dataset = build_dataset(exp, split, train=False)
        return calibration_images(dataset, count)
    except (OSError, ValueError) as exc:  # DataError is a ValueError
        raise ValueError(
            f"--int8 calibrates on {count} images of the {exp.data.dataset} {split!r} split, which cannot be "
            f"read ({exc}); name the dataset folder with --calibration-data ROOT"
        ) from None


def int8_options(options: EvalConfig) -> EvalConfig:
    """``options`` for an int8 run: the int8 graph is the backend and float32 its logits' precision."""
    if options.amp in ("bf16", "fp16"):
        raise ValueError(f"--int8 runs int8 with float32 logits, not {options.amp}: drop --amp {options.amp}")
    if options.backend not in ("auto", "eager"):
        raise ValueError(f"--int8 runs on {RUNTIME} in place of --backend {options.backend}: drop one of the two")
    return dataclasses.replace(options, amp="none", backend="eager")


def int8_model(
    trained: Trained,
    count: int,
    options: EvalConfig,
    *,
    experiment: Experiment | None = None,
    root: str | Path | None = None,
    calibrate: str | None = None,
) -> tuple[Quantized, EvalConfig]:
    """The CLI's ``--int8 N``: ``trained``'s model calibrated on ``count`` training images (ranges
    by ``calibrate``, one of :data:`CALIBRATIONS`; default :data:`DEFAULT_CALIBRATION`), and the inference options it
    runs with (:func:`int8_options`)."""
    options = int8_options(options)
    images = training_images(trained, count, experiment=experiment, root=root)
    return quantize(trained.model, images, calibrate=calibrate or DEFAULT_CALIBRATION), options


def _reduce_range() -> bool:
    """7-bit weights where x86 lacks VNNI: ONNX Runtime's u8s8 kernels then multiply with
    ``vpmaddubsw``, whose 16-bit sums saturate on full-range weights (its quantisation docs)."""
    import platform

    from .precision import cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return not (cpu_flags() or set()) & {"avx512_vnni", "avx_vnni", "amx_int8"}  # unknown: the safe range


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The node computing each tensor, by tensor name."""
    return {out: node for node in graph.node for out in node.output}


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each tensor, by tensor name."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _upstream(
    graph: onnx.GraphProto, tensors: list[str], until: Callable[[onnx.NodeProto], bool], *, include_last: bool
) -> list[str]:
    """Names of the nodes computing ``tensors``, walking back to the nodes ``until`` accepts
    (named too if ``include_last``)."""
    producer = _producers(graph)
    found: dict[str, None] = {}  # ordered set
    todo = list(tensors)
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in found or (until(node) and not include_last):
            continue
        found[node.name] = None
        if not until(node):
            todo.extend(node.input)
    return list(found)


def _float_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes kept float: the head (from the last nonlinearities to the outputs) and
    the layers computing what a max pooling whose indices are used (SegNet's switches) pools,
    but for the first such pooling."""
    outputs = [o.name for o in graph.output]
    head = _upstream(graph, outputs, lambda n: n.op_type in _NONLINEAR, include_last=False)
    return list(dict.fromkeys(head + _switch_nodes(graph)))


def _switch_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes computing what a max pooling whose indices are used pools (SegNet's
    switches), but for the first such pooling, back to and including the weighted layers."""
    outputs = [o.name for o in graph.output]
    used = {name for node in graph.node for name in node.input} | set(outputs)
    # What each pooling pools, once: PyTorch's own export of a pooling with indices has two
    # MaxPool nodes on the same input (the second, 1x1, rebases the indices; SegNet's has one).
    pools = list(
        dict.fromkeys(
            n.input[0] for n in graph.node if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1] in used
        )
    )
    # Rounded values tie inside a pooling window and the first maximum wins: the switches move.
    # The first pooling's (graph order: the encoder's, at full resolution) may move by a pixel.
    return _upstream(graph, pools[1:], lambda n: n.op_type in _WEIGHTED, include_last=True)


def _pool_quantized_values(graph: onnx.GraphProto) -> int:
    """Let each max pooling that only moves quantised values (``DequantizeLinear`` in,
    ``QuantizeLinear`` with the same scale and zero point out: SegNet's first pooling) pool the
    uint8 tensor itself, in place; returns how many were rewritten.

    The maximum and its index are the same either way (dequantising is increasing and one-to-one
    on uint8), and re-quantising a dequantised value gives it back; ONNX Runtime fuses such pairs
    around a pooling without indices, but not around SegNet's. At 360x480 the float detour
    (dequantise, a layout transpose of float values, quantise, the shape read through a second
    dequantise) cost 0.04 s: the int8 SegNet took 0.87 s with it, 0.83 s without.
    """
    producer = _producers(graph)
    readers = _readers(graph)
    graph_outputs = {o.name for o in graph.output}
    removed: dict[int, onnx.NodeProto] = {}  # by identity: a dequantise may feed two poolings
    rewritten: set[str] = set()  # the poolings' value outputs, uint8 now
    for pool in [n for n in graph.node if n.op_type == "MaxPool"]:
        dq = producer.get(pool.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        outs = readers.get(pool.output[0], [])
        if not outs or pool.output[0] in graph_outputs:
            continue
        if any(
            q.op_type != "QuantizeLinear" or list(q.input[1:3]) != list(dq.input[1:3]) or q.output[0] in graph_outputs
            for q in outs
        ):
            continue
        for q in outs:  # the quantised pooled values are the pooling's own output now
            for reader in readers.get(q.output[0], []):
                reader.input[:] = [pool.output[0] if name == q.output[0] else name for name in reader.input]
            removed[id(q)] = q
        for reader in readers.get(dq.output[0], []):  # the pooling, and shape reads (any dtype will do)
            if reader is pool or reader.op_type == "Shape":
                reader.input[:] = [dq.input[0] if name == dq.output[0] else name for name in reader.input]
        if all(r is pool or r.op_type == "Shape" for r in readers.get(dq.output[0], [])):
            removed[id(dq)] = dq
        rewritten.add(pool.output[0])
    for node in removed.values():
        graph.node.remove(node)
    # Their recorded type was float; shape inference at load time knows better.
    kept = [v for v in graph.value_info if v.name not in rewritten]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(rewritten)


def _is_same_3x3(conv: onnx.NodeProto) -> bool:
    """A 3x3 convolution with stride 1, padding 1, no dilation or groups (VGG's, SegNet's)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    return (
        list(attrs.get("kernel_shape", [3, 3])) == [3, 3]
        and list(attrs.get("strides", [1, 1])) == [1, 1]
        and list(attrs.get("dilations", [1, 1])) == [1, 1]
        and list(attrs.get("pads", [0] * 4)) == [1] * 4
        and attrs.get("group", 1) == 1
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def _im2col_3x3(x: str, zero: str, out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (and their constants) writing ``out``: the uint8 map ``x`` (N, C, H, W) as the
    (N, H, W, 9C) patches of a 3x3 convolution with padding 1, tap by tap (dy, dx), then channel;
    padded with the zero point ``zero`` (a dequantised 0, as the float convolution pads). Any H, W."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), f"{out}/pads"),
        numpy_helper.from_array(np.array([1, 2], np.int64), f"{out}/axes"),
    ]
    nodes = [
        helper.make_node("Transpose", [x], [f"{out}/nhwc"], perm=[0, 2, 3, 1], name=f"{out}/nhwc"),
        helper.make_node("Pad", [f"{out}/nhwc", f"{out}/pads", zero], [f"{out}/padded"], name=f"{out}/pad"),
    ]
    taps, last = [], np.iinfo(np.int64).max
    for dy in range(3):
        for dx in range(3):
            # Rows dy .. dy+H-1 of the padded H+2 rows: an end of dy-2 from the end (all, for dy=2).
            start, end, tap = f"{out}/start{dy}{dx}", f"{out}/end{dy}{dx}", f"{out}/tap{dy}{dx}"
            inits += [
                numpy_helper.from_array(np.array([dy, dx], np.int64), start),
                numpy_helper.from_array(np.array([dy - 2 or last, dx - 2 or last], np.int64), end),
            ]
            nodes.append(helper.make_node("Slice", [f"{out}/padded", start, end, f"{out}/axes"], [tap], name=tap))
            taps.append(tap)
    nodes.append(helper.make_node("Concat", taps, [out], axis=3, name=out))
    return nodes, inits


def _per_channel_int8(weight: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` (out, ...) as symmetric int8 in [-qmax, qmax], one float32 scale per output
    channel (an all-zero channel gets scale 1), as ONNX Runtime's quantiser writes them."""
    import numpy as np

    scale = np.abs(weight).reshape(len(weight), -1).max(1) / qmax
    scale[scale == 0] = 1.0
    shaped = scale.reshape(-1, *[1] * (weight.ndim - 1))
    return np.clip(np.round(weight / shaped), -qmax, qmax).astype(np.int8), scale.astype(np.float32)


def _integer_products(graph: onnx.GraphProto, names: Iterable[str], *, reduce_range: bool) -> list[str]:
    """Let each float 3x3 convolution in ``names`` that reads dequantised uint8 values (SegNet's
    switch layers, kept float by :func:`_float_nodes`) multiply in int8 and sum in int32, with a
    float output: im2col (nine shifted copies of the uint8 map, channels last) and ONNX Runtime's
    ``MatMulIntegerToFloat``. Returns the names of those rewritten.

    What the switches need is an output that is not rounded to 256 levels (tied values in a
    pooling window move them); the products themselves may be int8. Weights are quantised like
    the quantiser's own (symmetric, per output channel, 7-bit where ``reduce_range``). One
    128-channel layer at 180x240 took 50 ms this way against 72 ms in float (the im2col copies
    are a third of it); a layer with few output channels (a classifier) gains nothing.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = _producers(graph)

    def constant(name: str) -> np.ndarray | None:
        """An initializer's values, or a dequantised initializer's (the quantiser's int32 biases)."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input):
            return None
        q, scale, *zero = (numpy_helper.to_array(inits[i]) for i in node.input)
        return (q.astype(np.float64) - (zero[0] if zero else 0)) * scale

    qmax = 63 if reduce_range else 127
    wanted, rewritten, orphans = set(names), [], []
    for conv in [n for n in graph.node if n.op_type == "Conv" and n.name in wanted]:
        dq = producer.get(conv.input[0])
        weight = constant(conv.input[1])
        bias = constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if dq is None or dq.op_type != "DequantizeLinear" or weight is None or not _is_same_3x3(conv):
            continue
        if len(conv.input) > 2 and conv.input[2] and bias is None:
            continue
        scale = inits.get(dq.input[1])
        zero = inits.get(dq.input[2]) if len(dq.input) > 2 else None
        if scale is None or numpy_helper.to_array(scale).size != 1:
            continue  # a per-channel activation scale: not what the quantiser writes
        if zero is not None and zero.data_type != onnx.TensorProto.UINT8:
            continue
        out_ch, in_ch = weight.shape[:2]
        w_q, w_scale = _per_channel_int8(weight, qmax)
        p = conv.name
        new_inits = [
            # Rows in im2col's order: tap (dy, dx), then input channel.
            numpy_helper.from_array(w_q.transpose(2, 3, 1, 0).reshape(9 * in_ch, out_ch), f"{p}/int8_weight"),
            numpy_helper.from_array(w_scale, f"{p}/int8_weight_scale"),
            numpy_helper.from_array(np.zeros(out_ch, np.int8), f"{p}/int8_weight_zero"),
        ]
        if zero is None:
            new_inits.append(numpy_helper.from_array(np.array(0, np.uint8), f"{p}/zero"))
        zero_name = zero.name if zero is not None else f"{p}/zero"
        bias_name = ""
        if bias is not None:
            bias_name = f"{p}/bias"
            new_inits.append(numpy_helper.from_array(bias.astype(np.float32).reshape(out_ch), bias_name))
        nodes, im2col_inits = _im2col_3x3(dq.input[0], zero_name, f"{p}/im2col")
        new_inits += im2col_inits
        inputs = [f"{p}/im2col", f"{p}/int8_weight", dq.input[1], f"{p}/int8_weight_scale", zero_name]
        nodes += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [*inputs, f"{p}/int8_weight_zero", bias_name],
                [f"{p}/out_nhwc"],
                domain="com.microsoft",
                name=f"{p}/matmul",
            ),
            helper.make_node("Transpose", [f"{p}/out_nhwc"], [conv.output[0]], perm=[0, 3, 1, 2], name=f"{p}/nchw"),
        ]
        at = list(graph.node).index(conv)
        graph.node.remove(conv)
        for k, node in enumerate(nodes):
            graph.node.insert(at + k, node)
        graph.initializer.extend(new_inits)
        orphans += [i for i in conv.input[1:] if i]
        rewritten.append(p)
    _drop_unused(graph, orphans)
    return rewritten


def _integer_hardsigmoids(graph: onnx.GraphProto) -> list[str]:
    """Let each float ``HardSigmoid`` between a dequantise and a quantise run as one uint8
    requantisation, ONNX Runtime's ``QLinearAdd`` of a constant; returns the names of those
    rewritten. MobileNetV3 has 27 in LR-ASPP: its hard-swish (``x * HardSigmoid(x)`` once ONNX
    Runtime's pre-processing inlines it) and its squeeze-excitation gates.

    ``HardSigmoid(x) = clip(alpha x + beta, 0, 1)`` is affine until it saturates, and so is
    quantising: requantised to the scale ``1 / (255 alpha)`` after adding ``c``, level ``q`` of
    ``x`` is ``q / 255`` of the gate, uint8's clamps at 0 and 255 are the clips at 0 and 1, and
    ``c`` (half a level for ``beta = 1/2``) puts the gate's 0 on a whole level, the zero point
    ``floor(255 beta)``. The gate is then exact up to rounding, as the quantise it replaces.
    Three passes over the map, two writing float32 (dequantise, the op, quantise), become one
    over bytes: int8 LR-ASPP at 360x480 took 21.7-24.8 ms instead of 26.9-27.6 on the AVX2 EPYC
    (two runs, the graphs in turn, 2 threads)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = _producers(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}

    def scalar(name: str) -> bool:
        return name in inits and numpy_helper.to_array(inits[name]).size == 1

    rewritten, orphans = [], []
    for gate in [n for n in graph.node if n.op_type == "HardSigmoid"]:
        attrs = {a.name: helper.get_attribute_value(a) for a in gate.attribute}
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        dq, quantise = producer.get(gate.input[0]), readers.get(gate.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(quantise) != 1 or not (alpha > 0 and 0 <= beta <= 1):
            continue
        (q,) = quantise
        if q.op_type != "QuantizeLinear" or len(dq.input) < 3 or len(q.input) < 3 or q.output[0] in outputs:
            continue
        if any(r.op_type != "DequantizeLinear" for r in readers.get(q.output[0], [])):
            continue  # the new scale must reach every reader of the gate's levels
        if not all(scalar(name) for name in (*dq.input[1:3], *q.input[1:3])):
            continue  # per-channel parameters: not what QLinearAdd takes
        if inits[dq.input[2]].data_type != onnx.TensorProto.UINT8:
            continue
        scale = 1 / (255 * alpha)
        zero = int(np.floor(255 * beta))
        shift = (255 * beta - zero) * scale  # the fraction of a level the zero point cannot hold
        p = gate.name
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(1 if shift else 0, np.uint8), f"{p}/shift"),
                numpy_helper.from_array(np.array(shift or 1.0, np.float32), f"{p}/shift_scale"),
                numpy_helper.from_array(np.array(0, np.uint8), f"{p}/zero"),
                numpy_helper.from_array(np.array(scale, np.float32), f"{p}/input_scale"),
                numpy_helper.from_array(np.array(zero, np.uint8), f"{p}/input_zero"),
                numpy_helper.from_array(np.array(1 / 255, np.float32), f"{p}/gate_scale"),
            ]
        )
        requantise = helper.make_node(
            "QLinearAdd",
            [*dq.input[:3], f"{p}/shift", f"{p}/shift_scale", f"{p}/zero", f"{p}/input_scale", f"{p}/input_zero"],
            [q.output[0]],
            domain="com.microsoft",
            name=f"{p}/requantised",
        )
        for reader in readers.get(q.output[0], []):  # the gate's levels, read with their new scale
            orphans += list(reader.input[1:3])
            reader.input[1:3] = [f"{p}/gate_scale", f"{p}/zero"]
        graph.node.insert(list(graph.node).index(gate), requantise)
        graph.node.remove(gate)
        graph.node.remove(q)
        orphans += [dq.output[0], *q.input[1:3]]
        rewritten.append(p)
    _drop_unused(graph, orphans)
    return rewritten


def _drop_unused(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Remove the tensors ``names`` where nothing reads them any more: their initializers, or the
    constant-only nodes computing them (a dequantised bias), and what those read in turn."""
    todo = list(names)
    while todo:
        name = todo.pop()
        if any(name in node.input for node in graph.node) or any(o.name == name for o in graph.output):
            continue
        for init in [t for t in graph.initializer if t.name == name]:
            graph.initializer.remove(init)
        for node in [n for n in graph.node if name in n.output and len(n.output) == 1]:
            graph.node.remove(node)
            todo += [i for i in node.input if i]


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over normalised image batches, read a
    range at a time (:data:`CALIBRATION_CHUNK`)."""

    def __init__(self, images: Sequence[Tensor]) -> None:
        from .export import INPUT_NAME

        self._input, self._images, self._next, self._end = INPUT_NAME, images, 0, len(images)

    def __len__(self) -> int:
        return len(self._images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._images))

    def get_next(self) -> dict | None:
        if self._next >= self._end:
            return None
        x = self._images[self._next]
        self._next += 1
        return {self._input: (x if x.dim() == 4 else x[None]).float().cpu().numpy()}


# ONNX Runtime's calibrators hold every image's intermediate tensors until they compute ranges
# (32 SegNet frames of 360x480: over 24 GiB). Fed this many at a time, through its strided
# calibration, they merge ranges (minmax) or histograms (percentile, entropy) chunk by chunk.
CALIBRATION_CHUNK = 4


def _chunk(count: int) -> int:
    """The largest chunk of at most CALIBRATION_CHUNK images dividing ``count``, as the strided calibration asks."""
    return max(k for k in range(1, min(CALIBRATION_CHUNK, count) + 1) if count % k == 0)


def quantized_onnx(
    model: nn.Module,
    calibration: Iterable[Tensor],
    *,
    calibrate: str = DEFAULT_CALIBRATION,
    opset: int | None = None,
    onnxruntime_ops: bool = False,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``model`` as an int8 QDQ ONNX graph calibrated on ``calibration`` (normalised images,
    ``(C, H, W)`` or batches), and what was done (for metadata and logs).

    ``onnxruntime_ops``: also use ONNX Runtime's own operators where they are faster
    (:func:`_integer_products`); the graph then runs on ONNX Runtime only. Without, it holds
    standard ONNX operators that other runtimes read too."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .export import DEFAULT_OPSET, trace_onnx

    methods = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
    if calibrate not in methods:
        raise ValueError(f"unknown calibration {calibrate!r}; choose one of {', '.join(CALIBRATIONS)}")
    images = list(calibration)
    if not images:
        raise ValueError("the calibration needs at least 1 image, got none")
    reduce_range = _reduce_range()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx.save(trace_onnx(model, opset=opset or DEFAULT_OPSET), folder / "float.onnx")
        # Shape inference and ONNX Runtime's basic fusions first, as its quantiser asks.
        quant_pre_process(folder / "float.onnx", folder / "prepared.onnx", skip_symbolic_shape=True)
        prepared = onnx.load(folder / "prepared.onnx")
        for i, node in enumerate(prepared.graph.node):
            node.name = node.name or f"{node.op_type}_{i}"  # exclusion goes by node name
        onnx.save(prepared, folder / "prepared.onnx")
        kept = _float_nodes(prepared.graph)

        def quantise(method: str) -> None:
            # Its histogram calibrators print their progress: the CLI's output stays ours.
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    folder / "prepared.onnx",
                    folder / "int8.onnx",
                    _Reader(images),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=kept,
                    calibrate_method=getattr(CalibrationMethod, methods[method]),
                    extra_options={"CalibStridedMinMax": _chunk(len(images))},
                )

        method, fallback = calibrate, None
        try:
            quantise(method)
        except ValueError as exc:  # numpy's histogram of a near-constant tensor
            if method not in _HISTOGRAMS or "bins" not in str(exc):
                raise
            method, fallback = "minmax", f"{calibrate}'s histograms failed ({exc}): minmax ranges instead"
            quantise(method)
        proto = onnx.load(folder / "int8.onnx")
    _pool_quantized_values(proto.graph)
    integer: list[str] = []
    gates: list[str] = []
    if onnxruntime_ops:
        integer = _integer_products(proto.graph, _switch_nodes(prepared.graph), reduce_range=reduce_range)
        gates = _integer_hardsigmoids(proto.graph)
    if (integer or gates) and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    details = {
        "runtime": RUNTIME,
        "runtime_version": onnxruntime.__version__,
        "format": "QDQ",
        "weights": "int8, symmetric, per output channel" + (_SEVEN_BIT if reduce_range else ""),
        "activations": "uint8, asymmetric, per tensor",
        "calibration": method,
        "calibration_fallback": fallback,
        "calibration_images": len(images),
        "calibration_sizes": sorted({tuple(x.shape[-2:]) for x in images}),
        "float_nodes": kept,
        "int8_products_float_outputs": integer,
        "uint8_hardsigmoids": gates,
    }
    return proto, details


def quantize(
    model: nn.Module,
    calibration: Iterable[Tensor],
    *,
    calibrate: str = DEFAULT_CALIBRATION,
    threads: int | None = None,
) -> Quantized:
    """``model`` quantised to int8 (static: activation ranges from ``calibration``), as a module
    the inference functions take like the model itself; its forward returns float32 logits.

    ``calibration``: normalised images as training feeds them, ``(C, H, W)`` or ``(N, C, H, W)``
    (:func:`calibration_images`, :func:`training_images`); ``calibrate``: one of
    :data:`CALIBRATIONS`; ``threads``: ONNX Runtime's intra-op threads (default torch's).
    """
    proto, details = quantized_onnx(model, calibration, calibrate=calibrate, onnxruntime_ops=True)
    graph = proto.SerializeToString()
    return Quantized(model.eval(), _session(graph, threads or torch.get_num_threads()), details, graph)


def _session(graph: bytes, threads: int) -> Any:  # noqa: ANN401 - an onnxruntime.InferenceSession
    from .export import onnx_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.onnx"
        path.write_bytes(graph)
        return onnx_session(path, threads=threads)


def export_int8_onnx(
    source: nn.Module | Trained | str | Path,
    path: str | Path,
    calibration: Iterable[Tensor],
    *,
    metadata: Mapping[str, Any] | None = None,
    calibrate: str = DEFAULT_CALIBRATION,
    opset: int | None = None,
) -> Path:
    """Write ``source`` (a model, a :class:`~densepred.checkpoint.Trained` or a checkpoint path)
    as an int8 ONNX file with :func:`~densepred.export.export_onnx`'s metadata, plus a
    ``quantization`` entry; it takes and returns what the float file does (float32 in and out).

    The file holds standard ONNX operators only, for any runtime: SegNet's switch layers are float
    convolutions in it, not the int8-product form :func:`quantize` runs on ONNX Runtime."""
    from .export import resolve_source, write_onnx

    model, meta = resolve_source(source, metadata)
    proto, details = quantized_onnx(model, calibration, calibrate=calibrate, opset=opset)
    return write_onnx(proto, path, {**meta, "quantization": details})
