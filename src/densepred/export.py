"""Export a trained model to ONNX or TorchScript, with its preprocessing written into the file.

Both formats take a float32 ``(N, C, H, W)`` batch that is already *normalised* exactly as in
training, and return class scores (logits, before softmax) ``(N, classes, H', W')``; batch,
height and width are dynamic. The file carries a JSON description (:func:`model_metadata`) of
how to get from 0..255 pixels to that input (channel order, mean, std), the class names and
palette, and the output size rule, so that a consumer needs nothing from this package:
ONNX in ``metadata_props`` (key ``densepred``, plus a few flat keys for viewers such as Netron),
TorchScript in the archive's extra file ``densepred.json``. :func:`read_metadata` reads both.

Models are traced (``torch.jit.trace``; ONNX through PyTorch's TorchScript-based exporter).
While tracing, sizes are tensors, so FCN's crops, U-Net's crop-and-copy and DeepLab's
interpolations stay functions of the input size; the tests check parity at sizes other than
the traced one. Input checks that raise in eager mode (channel count, U-Net valid sizes) are
not in the exported graphs: feed sizes that the metadata's ``output.size_rule`` allows.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .atomic import write_atomic
from .models.base import SegmentationModel, input_rule_of

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from .checkpoint import Trained

__all__ = [
    "EXPORT_FORMATS",
    "DEFAULT_OPSET",
    "METADATA_KEY",
    "model_metadata",
    "export_onnx",
    "trace_onnx",
    "write_onnx",
    "resolve_source",
    "export_torchscript",
    "export_checkpoint",
    "default_export_path",
    "read_metadata",
    "onnx_session",
    "scatter_max_unpool",
]

EXPORT_FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
# 17 runs on every current ONNX Runtime and TensorRT; Resize with align_corners (DeepLab's
# interpolation) needs 11, and PyTorch's TorchScript-based exporter stops at 20.
DEFAULT_OPSET = 17
OPSET_RANGE = (11, 20)
METADATA_KEY = "densepred"
METADATA_VERSION = 1
_TS_EXTRA_FILE = "densepred.json"
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def _preprocessing(normalization: str | None, channels: int) -> dict[str, Any]:
    if normalization is None:
        return {"normalization": None, "formula": "unknown: feed what the model was trained on"}
    from .build import normalization_for

    norm = normalization_for(normalization, channels)
    # Mean and std in 0..255 pixel units, one per input channel, in the model's channel order.
    unit = 1.0 if norm.scale_255 else 255.0
    mean = [float(v) * unit for v in norm.mean] * (channels if len(norm.mean) == 1 else 1)
    std = [float(v) * unit for v in norm.std] * (channels if len(norm.std) == 1 else 1)
    order = "BGR" if norm.bgr else ("RGB" if channels == 3 else "gray" if channels == 1 else f"{channels} channels")
    return {
        "normalization": normalization,
        "channel_order": order,
        "mean": mean,
        "std": std,
        "formula": "x[c] = (pixel[c] - mean[c]) / std[c], pixel = 0..255 values in channel_order",
    }


def model_metadata(
    model: nn.Module,
    *,
    model_name: str | None = None,
    normalization: str | None = None,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON description an exported file carries: input, preprocessing, output, classes.

    ``normalization`` is a recipe's ``data.normalization`` name (``imagenet``, ``caffe``,
    ``unit``); ``None`` records that the preprocessing is unknown.
    """
    from ._version import __version__
    from .registry import list_models, model_entry

    if not isinstance(model, SegmentationModel):
        raise ValueError(f"{type(model).__name__} is not a densepred model (no declared in_channels and num_classes)")
    channels, classes = int(model.in_channels), int(model.num_classes)
    meta: dict[str, Any] = {
        "metadata_version": METADATA_VERSION,
        "densepred_version": __version__,
        "model": model_name or type(model).__name__,
        "num_classes": classes,
        "in_channels": channels,
        "class_names": list(class_names) if class_names is not None else [f"class_{i}" for i in range(classes)],
        "palette": [[int(v) for v in c] for c in palette] if palette is not None else None,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "values": "normalised (see preprocessing), not 0..255 pixels",
        },
        "preprocessing": _preprocessing(normalization, channels),
        "output": {
            "name": OUTPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "values": "class scores (logits, before softmax); argmax over C gives the label map",
            **input_rule_of(model).describe(),
        },
    }
    if model_name in list_models():
        entry = model_entry(model_name)
        meta.update(paper=entry.paper, output_stride=entry.output_stride)
    meta.update(extra or {})
    return meta


def _trained_metadata(trained: Trained) -> dict[str, Any]:
    exp = trained.experiment
    return model_metadata(
        trained.model,
        model_name=exp.model.name,
        normalization=trained.normalization,
        class_names=trained.class_names,
        palette=trained.palette,
        extra={"model_options": dict(exp.model.options), "recipe": exp.name, "iteration": trained.iteration},
    )


def resolve_source(
    source: nn.Module | Trained | str | Path, metadata: Mapping[str, Any] | None = None
) -> tuple[nn.Module, dict]:
    """The model to export and its metadata, from a module, a :class:`Trained` or a checkpoint path."""
    from .checkpoint import Trained, load_trained

    if isinstance(source, (str, Path)):
        source = load_trained(source, "cpu")
    if isinstance(source, Trained):
        return source.model, {**_trained_metadata(source), **(metadata or {})}
    if not isinstance(source, nn.Module):
        raise TypeError(f"expected an nn.Module, a Trained or a checkpoint path, got {type(source).__name__}")
    return source, {**model_metadata(source), **(metadata or {})}


def _example_input(model: nn.Module, size: tuple[int, int] | None) -> torch.Tensor:
    """A batch to trace with: non-square (so height and width cannot be swapped unnoticed)."""
    if size is None:
        size = input_rule_of(model).example_size(preferred=(65, 81))  # 8k+1: DeepLab's preferred geometry
    param = next(model.parameters())
    noise = torch.randn(1, int(model.in_channels), *size, generator=torch.Generator().manual_seed(0))
    return noise.to(param.device, param.dtype)  # own generator: exporting leaves the global RNG alone


@contextmanager
def _tracing(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, MSC returns fused scores) and no grad while tracing; flag restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Expected notices: frozen input checks (TracerWarning), the exporters' deprecation and
            # constant-folding notes. Parity at other sizes is what the tests check instead.
            for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("ignore", message="Constant folding")
            yield
    finally:
        model.train(was_training)


def export_onnx(
    source: nn.Module | Trained | str | Path,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    example_size: tuple[int, int] | None = None,
) -> Path:
    """Write ``source`` as an ONNX file with dynamic batch, height and width.

    ``source`` is a model (in memory, e.g. for a benchmark), a :class:`~densepred.checkpoint.Trained`
    or a training checkpoint path; ``metadata`` entries override :func:`model_metadata`'s.
    """
    model, meta = resolve_source(source, metadata)
    return write_onnx(trace_onnx(model, opset=opset, example_size=example_size), path, meta)


def trace_onnx(
    model: nn.Module, *, opset: int = DEFAULT_OPSET, example_size: tuple[int, int] | None = None
) -> onnx.ModelProto:
    """``model`` traced to an ONNX graph with dynamic batch, height and width, without metadata."""
    import onnx

    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ValueError(
            f"ONNX opset {opset} is not supported; use {OPSET_RANGE[0]}..{OPSET_RANGE[1]} (default {DEFAULT_OPSET})"
        )
    example = _example_input(model, example_size)
    buffer = io.BytesIO()
    with _tracing(model):
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, dynamic sizes traced
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAME: {0: "batch", 2: "out_height", 3: "out_width"},
            },
        )
    return onnx.load_model_from_string(buffer.getvalue())


def scatter_max_unpool(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each ``MaxUnpool`` (SegNet's decoder) written as a scatter of its values into
    a flat zero tensor of its output's size: the same result, for runtimes without the operation
    (OpenVINO). ONNX Runtime keeps ``MaxUnpool``: at 360x480 the scatter took 5x as long."""
    import onnx
    from onnx import TensorProto, helper

    lowered = onnx.ModelProto()
    lowered.CopyFrom(proto)
    graph = lowered.graph
    if not any(node.op_type == "MaxUnpool" for node in graph.node):
        return lowered
    flat = "densepred/scatter_max_unpool/flat"
    graph.initializer.append(helper.make_tensor(flat, TensorProto.INT64, [1], [-1]))
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = []
    for node in graph.node:
        if node.op_type != "MaxUnpool":
            nodes.append(node)
            continue
        if len(node.input) < 3 or not node.input[2]:
            raise ValueError(f"MaxUnpool node {node.name!r} has no output_shape input to scatter into")
        values, indices, shape = node.input[:3]
        name = f"{node.name or node.output[0]}/scatter"
        nodes += [
            helper.make_node("ReduceProd", [shape], [f"{name}/count"], keepdims=1),
            helper.make_node("ConstantOfShape", [f"{name}/count"], [f"{name}/zeros"], value=zero),
            helper.make_node("Reshape", [indices, flat], [f"{name}/indices"]),
            helper.make_node("Reshape", [values, flat], [f"{name}/values"]),
            helper.make_node(
                "ScatterElements", [f"{name}/zeros", f"{name}/indices", f"{name}/values"], [f"{name}/out"], axis=0
            ),
            helper.make_node("Reshape", [f"{name}/out", shape], [node.output[0]], name=name),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return lowered


def write_onnx(proto: onnx.ModelProto, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """``proto`` with ``meta`` (:func:`model_metadata`) in its ``metadata_props``, written atomically."""
    flat = {
        METADATA_KEY: meta,
        "model": meta.get("model"),
        "densepred_version": meta.get("densepred_version"),
        "class_names": meta.get("class_names"),
        "palette": meta.get("palette"),
        "mean": meta.get("preprocessing", {}).get("mean"),
        "std": meta.get("preprocessing", {}).get("std"),
        "input_layout": "NCHW float32, normalised as in 'densepred' -> preprocessing",
        "output_size_rule": meta.get("output", {}).get("size_rule"),
    }
    del proto.metadata_props[:]  # a graph rewritten by another tool may carry the source's entries
    for key, value in flat.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.doc_string = f"densepred {meta.get('model')}: NCHW float32 normalised image -> NCHW class logits"
    return write_atomic(Path(path), lambda f: f.write(proto.SerializeToString()), what="ONNX file")


def export_torchscript(
    source: nn.Module | Trained | str | Path,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    example_size: tuple[int, int] | None = None,
) -> Path:
    """Write ``source`` as a traced TorchScript archive (``torch.jit.load`` runs it, no Python code).

    The metadata travels as the archive's extra file ``densepred.json``.
    """
    model, meta = resolve_source(source, metadata)
    path = Path(path)
    example = _example_input(model, example_size)
    with _tracing(model):
        # check_trace would rerun both at the traced size only; parity tests check other sizes.
        traced = torch.jit.trace(model, example, check_trace=False)
        extra = {_TS_EXTRA_FILE: json.dumps(meta)}
        return write_atomic(path, lambda f: torch.jit.save(traced, f, _extra_files=extra), what="TorchScript file")


def default_export_path(checkpoint: str | Path, fmt: str) -> Path:
    """``run/checkpoints/best.pt`` -> ``best.onnx``, ``best.torchscript.pt``, ``best.safetensors``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + EXPORT_FORMATS[fmt])


def format_of(path: str | Path) -> str | None:
    """The export format a file name says (``.onnx``, ``.safetensors``, ``.pt``/``.ts``: TorchScript)."""
    name = Path(path).name.lower()
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".pt", ".ts", ".torchscript")):
        return "torchscript"
    return None


def _export_format(fmt: str | None, out: str | Path | None) -> str:
    """``fmt``, else what ``out``'s suffix says, else safetensors; a disagreement is an error."""
    named = format_of(out) if out is not None else None
    if fmt is not None and named is not None and fmt != named:
        raise ValueError(f"--format {fmt} but --out {out} names a {named} file; make them agree")
    fmt = fmt or named or "safetensors"
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def export_checkpoint(
    checkpoint: str | Path, fmt: str | None = None, out: str | Path | None = None, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Export a training checkpoint as ``fmt`` (``onnx``, ``torchscript`` or ``safetensors``).

    Without ``fmt`` the format follows ``out``'s suffix (safetensors when neither says); a
    format and a suffix that disagree are an error, so a file always holds what its name says.
    The checkpoint is validated as every other command does (its model must build and load).
    """
    from .checkpoint import export_safetensors, load_trained

    if out is not None and Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"the output {out} would overwrite the checkpoint; choose another file name")
    fmt = _export_format(fmt, out)
    out = Path(out) if out is not None else default_export_path(checkpoint, fmt)
    if out.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"the output {out} would overwrite the checkpoint; choose another file name")
    if fmt == "onnx":
        return export_onnx(checkpoint, out, opset=opset)
    if fmt == "torchscript":
        return export_torchscript(checkpoint, out)
    load_trained(checkpoint, "meta")  # refuses what the other commands refuse, without allocating weights
    return export_safetensors(checkpoint, out)


def export_released(
    name: str, fmt: str | None = None, out: str | Path | None = None, *, opset: int = DEFAULT_OPSET, file=None
) -> Path:
    """Export released weights by name (``densepred weights list``) as ``fmt``, with their classes
    and preprocessing in the file; ``out`` defaults to ``NAME.onnx`` / ``.torchscript.pt`` /
    ``.safetensors`` here."""
    from .checkpoint import load_released_trained

    fmt = _export_format(fmt, out)
    out = Path(out) if out is not None else Path(name + EXPORT_FORMATS[fmt])
    trained = load_released_trained(name, "cpu", file=file)
    if fmt == "onnx":
        return export_onnx(trained, out, opset=opset)
    if fmt == "torchscript":
        return export_torchscript(trained, out)
    from safetensors.torch import save

    meta = {"densepred": json.dumps(_trained_metadata(trained))}
    tensors = {k: v.detach().contiguous() for k, v in trained.model.state_dict().items()}
    return write_atomic(out, lambda f: f.write(save(tensors, metadata=meta)), what="safetensors file")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON description of an exported ``.onnx`` or TorchScript file (no model code is run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    with path.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:  # a TorchScript archive: read the extra file directly, without loading the model
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{_TS_EXTRA_FILE}")]
            if not names:
                raise ValueError(f"{path} is a TorchScript archive without densepred metadata ({_TS_EXTRA_FILE})")
            return json.loads(archive.read(names[0]))
    import onnx

    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise ValueError(f"{path} is neither an ONNX file nor a TorchScript archive: {exc}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} is an ONNX file without densepred metadata (no {METADATA_KEY!r} entry)")
    return json.loads(props[METADATA_KEY])


SPINNING = "session.intra_op.allow_spinning"  # ONNX Runtime's session config key


def onnx_session(
    path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    profile_prefix: str | None = None,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session for an exported file (CPU by default): ``run(None, {"image": x})``.
    ``profile_prefix``: ONNX Runtime's profiler on, its JSON written there by ``end_profiling()``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    # No busy-waiting after a run: by default ONNX Runtime's pool spins for the next one, taking
    # the cores from what runs in between (the argmax, a sliding window's stitching, the PNGs).
    options.add_session_config_entry(SPINNING, "0")
    return ort.InferenceSession(str(path), options, providers=list(providers))
