"""The fp32 limit on record: the machine's measured peaks, each model's FLOPs, and how close
every model's forward pass comes to the peak.

    python -m benchmarks roofline [--only fcn8s,unet] [--out runs/bench/roofline.json]

- Peaks, best of N: a 4096x4096 fp32 GEMM, and a 256-channel 3x3 convolution at 128x128
  (the shape that dominates these nets), in GFLOP/s.
- FLOPs of a model at a size: counted from its layers on the meta device (no compute), two per
  multiply-add, for every convolution, transposed convolution and linear layer; pooling,
  activations, crops and interpolation are left out, so "% of peak" is the share of the
  machine's convolution speed the whole forward pass reaches.
- Per model, batch 1, ``torch.inference_mode``, at 256 (U-Net valid: 268) and at the paper's
  size: eager fp32; the default path, which is what ``predict`` / ``eval`` / ``serve`` run
  (``backends.accelerate`` with ``backend=auto, amp=auto``: the probe's choice, named in the
  table); and channels-last at 256. Seconds (median after a warm-up), GFLOP/s, % of peak.
- The training step at 256, batch 1 (forward, cross-entropy, backward, the trainer's own SGD
  with momentum, fused), eager: FLOPs counted as 3x the forward's (the backward
  computes a gradient for each layer's input and one for its weights, each as costly as the
  forward), the usual convention.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from densepred.backends import accelerate, probe_input
from densepred.config import OptimConfig
from densepred.precision import machine_info
from densepred.registry import list_models
from densepred.trainer import build_optimizer

from .speed import _build, _channels, _input_size, _paper_size, timed

_COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def layer_flops(model: nn.Module, x_shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add) of ``model``'s convolutions and linear layers for one input of
    ``x_shape``, from a forward pass on the meta device."""
    meta = copy.deepcopy(model).to("meta")
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):  # each output element: Cin/groups * kh * kw MACs
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * k
        elif isinstance(module, nn.ConvTranspose2d):  # each input element scatters Cout/groups * kh * kw
            k = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * inputs[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in meta.modules() if isinstance(m, _COUNTED)]
    try:
        with torch.inference_mode():
            meta.eval()(torch.empty(x_shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of a 4096^2 fp32 GEMM and of a 256-channel 3x3 convolution at 128x128, best of N."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 256, 128, 128)
    with torch.inference_mode():
        gemm = 2 * 4096**3 / _best(lambda: torch.mm(a, b), repeats)
        conv3 = 2 * 256 * 256 * 9 * 128 * 128 / _best(lambda: conv(x), repeats)
    return {"gemm_gflops": gemm / 1e9, "conv3x3_gflops": conv3 / 1e9}


def _row(side: int, flops: int, seconds: float) -> dict:
    return {"size": side, "gflop": flops / 1e9, "seconds": seconds, "gflops": flops / seconds / 1e9}


def _train_step_seconds(model: nn.Module, x: torch.Tensor) -> float:
    """Median seconds of one training step as the trainer takes it (its optimiser, fused)."""
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-9))

    def step() -> None:
        out = model(x)
        out = out["fused"] if isinstance(out, dict) else out  # auxiliary heads: the main output
        loss = F.cross_entropy(out, torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    try:
        return timed(step, min_runs=2, max_seconds=12.0)
    finally:
        model.eval()


def measure_model(name: str) -> dict:
    model = _build(name)
    channels = _channels(name)
    # What predict / eval / serve run: the backend probe's choice at its own probe size, kept for every
    # size; probed afresh (an empty cache), so that the figure is today's probe, not an earlier run's.
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, DENSEPRED_CACHE=cache):
        default, choice = accelerate(model, "auto", probe_input(model, channels), amp="auto")
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    rows = {}
    sizes = {"256": _input_size(name, 256), "paper": _input_size(name, _paper_size(name))}
    for label, side in sizes.items():
        x = torch.randn(1, channels, side, side)
        flops = layer_flops(model, tuple(x.shape))
        variants = {"eager": (model, x), f"default ({choice.backend})": (default, x)}
        if label == "256":
            variants["channels-last"] = (cl, x.to(memory_format=torch.channels_last))
        for variant, (m, inp) in variants.items():
            with torch.inference_mode():
                seconds = timed(lambda m=m, inp=inp: m(inp), min_runs=3, max_seconds=8.0)
            rows[f"{variant} {side}"] = _row(side, flops, seconds)
        if label == "256":
            try:
                rows[f"train step {side}"] = _row(side, 3 * flops, _train_step_seconds(model, x))
            except ValueError:  # batch norm after a global pooling (ASPP's image branch, PSPNet's bin 1)
                # sees one value per channel at batch 1 and cannot train: batch 2
                seconds = _train_step_seconds(model, x.expand(2, -1, -1, -1))
                rows[f"train step {side} (batch 2)"] = _row(side, 6 * flops, seconds)
    return rows


def table(results: dict) -> str:
    m, p = results["machine"], results["peaks"]
    lines = [
        f"Machine: {m['cpu']}, {m['capability']}, native bf16 {m['native_bf16']}, {m['threads']} threads, "
        f"torch {m['torch']}. Measured fp32 peaks: GEMM 4096^2 {p['gemm_gflops']:.0f} GFLOP/s, 3x3 conv "
        f"256ch@128^2 {p['conv3x3_gflops']:.0f} GFLOP/s (the reference for % of peak). Batch 1.",
        "",
        "| model | path, size | GFLOPs | seconds | GFLOP/s | % of conv peak |",
        "|---|---|---|---|---|---|",
    ]
    peak = p["conv3x3_gflops"]
    for name, rows in results["models"].items():
        for path, r in rows.items():
            lines.append(
                f"| {name} | {path} | {r['gflop']:.1f} | {r['seconds']:.3f} | {r['gflops']:.0f} | "
                f"{100 * r['gflops'] / peak:.0f}% |"
            )
    # (% of peak, model, path, faster than eager at that size) for every default-path row
    defaults = [
        (100 * r["gflops"] / peak, name, path, r["seconds"] < rows[f"eager {r['size']}"]["seconds"])
        for name, rows in results["models"].items()
        for path, r in rows.items()
        if path.startswith("default")
    ]
    if defaults:
        low = min(defaults)
        below = [
            f"{name} {path.split()[-1]} ({share:.0f}%)"
            for share, name, path, _ in sorted(defaults)
            if round(share) < 85
        ]
        faster = sum(quicker for *_, quicker in defaults)
        lines += [
            "",
            f"Default path: >= 85% of the conv peak on {len(defaults) - len(below)} of {len(defaults)} model-size "
            f"pairs, faster than eager on {faster}; lowest {low[0]:.0f}% ({low[1]}, {low[2]}); target 85%."
            + (f" Below 85%: {', '.join(below)}." if below else ""),
        ]
    return "\n".join(lines)


def run_roofline(path: Path, only: list[str] | None = None) -> dict:
    """Measure what is not in ``path`` yet (results of another machine are measured again)."""
    info = machine_info().to_dict()
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("machine") != info:
        results = {"machine": info, "peaks": measure_peaks(), "models": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in only or list_models():
        if name not in results["models"]:
            print(f"{name} ...", flush=True)
            results["models"][name] = measure_model(name)
            path.write_text(json.dumps(results, indent=2))
    # The peaks again after the models, the best of both kept: a peak measured while something
    # else ran would make every model look closer to it than it is.
    again = measure_peaks()
    results["peaks"] = {k: max(v, again[k]) for k, v in results["peaks"].items()}
    path.write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/roofline.json"))
    args = parser.parse_args()
    print(table(run_roofline(args.out, args.only.split(",") if args.only else None)))


if __name__ == "__main__":
    main()
