"""Where a network's int8 forward pass goes, by kind of operator, beside the same network's fp32
graph on the same runtime: ONNX Runtime's own profiler, kernel time per node summed over timed runs.

    python -m benchmarks.int8_profile --checkpoint runs/camvid_lraspp_cpu/checkpoints/best.pt --data-root ../shared/data

What it answers: how far int8 can go past fp32 here. Its convolutions against the same
convolutions in fp32 give the per-layer gain the CPU's integer units allow (without VNNI, one
256-bit integer multiply issued per cycle on a Zen 2 against two FMAs); the other operators
(uint8 element-wise and pooling, quantise/dequantise, the float head, layout changes) are what
int8 adds or keeps. ``python -m benchmarks int8`` prints it beside its speed table.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from densepred.precision import machine_info

__all__ = ["KINDS", "kind_of", "by_kind", "profile_graph", "run_profile", "profile_checkpoint", "profile_lines"]

WARMUP_RUNS = 5
TIMED_RUNS = 20
KINDS = ("convolutions", "uint8 element-wise and pooling", "quantise/dequantise", "float operators", "layout")
_CONVOLUTIONS = {"Conv", "QLinearConv", "ConvInteger", "ConvTranspose", "MatMulInteger", "FusedConv", "NhwcFusedConv"}
_LAYOUT = {"Transpose", "ReorderInput", "ReorderOutput", "Reshape", "Shape", "Gather", "Unsqueeze", "Concat", "Slice"}


def kind_of(op: str) -> str:
    """Which of :data:`KINDS` an ONNX Runtime operator (after its graph optimisations) is."""
    if op in _CONVOLUTIONS:
        return "convolutions"
    if op.startswith("QLinear") or op.startswith("QGemm"):
        return "uint8 element-wise and pooling"
    if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        return "quantise/dequantise"
    if op in _LAYOUT:
        return "layout"
    return "float operators"


def profile_graph(graph: bytes, x: np.ndarray, threads: int) -> dict[str, float]:
    """Milliseconds per forward pass by operator type (kernel time), over :data:`TIMED_RUNS` runs
    after :data:`WARMUP_RUNS` untimed ones, on a session of ``threads`` intra-op threads."""
    from densepred.export import INPUT_NAME, onnx_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.onnx"
        path.write_bytes(graph)
        # The session the backends and int8 open, with the profiler on.
        session = onnx_session(path, threads=threads, profile_prefix=str(Path(tmp) / "profile"))
        for _ in range(WARMUP_RUNS + TIMED_RUNS):
            session.run(None, {INPUT_NAME: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[-TIMED_RUNS]  # the warm-up runs are profiled too: only the timed ones count
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / TIMED_RUNS  # microseconds -> ms per run
    return dict(per_op.most_common())


def by_kind(per_op: dict[str, float]) -> dict[str, float]:
    kinds = dict.fromkeys(KINDS, 0.0)
    for op, ms in per_op.items():
        kinds[kind_of(op)] += ms
    return kinds


def run_profile(model: nn.Module, calibration: list[Tensor], name: str) -> dict:
    """The int8 graph :func:`densepred.quantize.quantize` runs and the fp32 graph of ``model``,
    profiled at the calibration images' size."""
    from densepred.export import trace_onnx
    from densepred.quantize import quantized_onnx

    proto, _ = quantized_onnx(model, calibration, onnxruntime_ops=True)
    x = calibration[0][None].numpy() if calibration[0].dim() == 3 else calibration[0][:1].numpy()
    threads = torch.get_num_threads()
    int8 = profile_graph(proto.SerializeToString(), x, threads)
    fp32 = profile_graph(trace_onnx(model).SerializeToString(), x, threads)
    return {
        "machine": machine_info().to_dict(),
        "model": name,
        "size": list(x.shape[-2:]),
        "threads": threads,
        "int8_ms_by_op": int8,
        "fp32_ms_by_op": fp32,
    }


def profile_checkpoint(checkpoint: Path, data_root: Path | None, images: int) -> dict:
    """:func:`run_profile` of a checkpoint's network at its eval size, calibrated on ``images``
    training images of its dataset (under ``data_root``, else the recipe's own root)."""
    from densepred.checkpoint import load_trained
    from densepred.quantize import training_images

    trained = load_trained(checkpoint, "cpu")
    root = data_root / trained.experiment.data.dataset if data_root else None
    calibration = training_images(trained, images, root=root)
    name = trained.experiment.model.name
    return {"checkpoint": str(checkpoint), **run_profile(trained.model.eval(), calibration, name)}


def profile_lines(p: dict, eager_fp32_s: float | None = None) -> list[str]:
    """The profile as a paragraph; with the eager fp32 forward, what the 2x target leaves."""
    int8, fp32 = by_kind(p["int8_ms_by_op"]), by_kind(p["fp32_ms_by_op"])
    total8, total32 = sum(int8.values()), sum(fp32.values())
    conv8, conv32 = int8["convolutions"], fp32["convolutions"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in int8.items() if v >= 0.05)
    resize = p["int8_ms_by_op"].get("Resize", 0.0)
    text = (
        f"Where {p['model']}'s int8 forward ({p['size'][0]}x{p['size'][1]}, {p['threads']} threads) goes, "
        f"by ONNX Runtime's profiler (kernel time, ms per forward): {parts}; {total8:.1f} in all. "
        f"The same convolutions in fp32 on ONNX Runtime: {conv32:.1f} ms (int8 x{conv32 / conv8:.2f}), "
        f"its whole fp32 graph {total32:.1f} ms."
    )
    if eager_fp32_s:
        target = eager_fp32_s * 1e3 / 2
        floor = conv8 + resize
        text += (
            f" Eager fp32 takes {eager_fp32_s * 1e3:.1f} ms, so 2x asks {target:.1f} ms: the int8 convolutions "
            f"and the float output upsampling (Resize, {resize:.1f} ms) alone take {floor:.1f} ms "
            + ("(**over** it)." if floor > target else "(within it).")
        )
    return [text, ""]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/camvid_lraspp_cpu/checkpoints/best.pt"))
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding the recipe's dataset")
    parser.add_argument("--images", type=int, default=4, help="calibration images (the speed does not need more)")
    args = parser.parse_args()
    p = profile_checkpoint(args.checkpoint, args.data_root, args.images)
    print(machine_info().line())
    print("\n".join(profile_lines(p)))


if __name__ == "__main__":
    main()
