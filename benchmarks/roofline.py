"""The fp32 limit on record: the machine's measured peaks, each model's FLOPs, and how close
every model's forward pass comes to the peak.

    python -m benchmarks roofline [--only fcn8s,unet] [--out runs/bench/roofline.json]

- Peaks, best of N: a 4096x4096 fp32 GEMM, and a 256-channel 3x3 convolution at 128x128
  (the shape that dominates these nets), in GFLOP/s; and a depthwise 3x3 convolution (240
  channels at 64x64, a MobileNetV3 shape), which does 1/240 of the dense one's work per byte
  it reads and so runs at a fraction of its speed, bound by memory.
- FLOPs of a model at a size: counted from its layers on the meta device (no compute), two per
  multiply-add, for every convolution, transposed convolution and linear layer; pooling,
  activations, crops and interpolation are left out, so "% of peak" is the share of the
  machine's convolution speed the whole forward pass reaches. Depthwise convolutions are
  counted apart: "% of roof" holds them to the depthwise peak and the rest to the dense one
  (the time the two peaks allow, over the time taken). For nets without depthwise layers the
  two columns agree; for MobileNetV3 they say how far the forward pass is from what the
  machine's own kernels allow for its layers. "Taps on the image" counts a convolution's
  multiply-adds less those whose input pixel is padding: the kernels skip those (oneDNN at the
  borders, ``RateClippedConv2d`` for ASPP's large rates), and counted as work they put the
  DeepLab v3 family above 100%. ``--recount`` adds that count to results measured before it.
- Per model, batch 1, ``torch.inference_mode``, at 256 (U-Net valid: 268) and at the paper's
  size: eager fp32; the default path, which is what ``predict`` / ``eval`` run on images of that
  size (``backends.accelerate`` with ``backend=auto, amp=auto``, probed at the size: the probe's
  choice, named in the table, with what the probe measured of each candidate kept in the results);
  and channels-last at 256. Seconds, GFLOP/s, % of peak.
- Timing: the variants of a size take turns, round by round, with the reference 3x3 convolution
  (the peak's shape) as one more turn: each is warmed up, then per round the median of its calls,
  and each keeps its best of two rounds. A busy spell on the host then slows one round of every
  variant rather than the whole timing of one, and the convolution timed beside the rows says how
  fast the machine was while they ran: "% of the peak beside" is each row against it (the host
  this was written on swung 40% between runs), "% of conv peak" against the run's best peak.
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
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from densepred.allocator import retain_freed_memory
from densepred.backends import accelerate, probe_input
from densepred.config import OptimConfig
from densepred.precision import cpu_name, machine_info
from densepred.registry import list_models
from densepred.trainer import build_optimizer

from .speed import _build, _channels, _input_size, _paper_size, timed

_COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class Flops(NamedTuple):
    """FLOPs (2 per multiply-add) of a forward pass, depthwise convolutions apart; ``on_image``:
    all of them less the convolution taps that read only padding."""

    dense: int
    depthwise: int
    on_image: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.depthwise

    def __mul__(self, k: int) -> Flops:  # the training step: k times the forward's, of each kind
        return Flops(self.dense * k, self.depthwise * k, self.on_image * k)


def taps_on_image(size: int, out: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """(output position, tap) pairs along one axis whose input pixel is in the image, not the
    padding: ``out * kernel`` for a convolution without padding, fewer where taps fall beyond the
    border, ``out`` alone for a 3x3 atrous filter whose rate is at least the map's side."""
    pairs = 0
    for tap in range(kernel):
        shift = tap * dilation - padding  # the input pixel of output o is o * stride + shift
        first, last = max(0, -(shift // stride)), min(out - 1, (size - 1 - shift) // stride)
        pairs += max(0, last - first + 1)
    return pairs


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def layer_flops(model: nn.Module, x_shape: tuple[int, ...]) -> Flops:
    """FLOPs (2 per multiply-add) of ``model``'s convolutions and linear layers for one input of
    ``x_shape``, from a forward pass on the meta device."""
    meta = copy.deepcopy(model).to("meta")
    dense = depthwise = on_image = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal dense, depthwise, on_image
        if isinstance(module, nn.Conv2d):  # each output element: Cin/groups * kh * kw MACs
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops = 2 * output.numel() * k
            if _is_depthwise(module):
                depthwise += flops
            else:
                dense += flops
            if isinstance(module.padding, str):  # "same"/"valid": not used by the registered models
                on_image += flops
                return
            per_pair = 2 * output.shape[0] * output.shape[1] * (module.in_channels // module.groups)
            rows, cols = (
                taps_on_image(
                    inputs[0].shape[a - 2],
                    output.shape[a - 2],
                    module.kernel_size[a],
                    module.stride[a],
                    module.padding[a],
                    module.dilation[a],
                )
                for a in (0, 1)
            )
            on_image += per_pair * rows * cols
        elif isinstance(module, nn.ConvTranspose2d):  # each input element scatters Cout/groups * kh * kw
            k = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            dense += 2 * inputs[0].numel() * k
            on_image += 2 * inputs[0].numel() * k
        elif isinstance(module, nn.Linear):
            dense += 2 * output.numel() * module.in_features
            on_image += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in meta.modules() if isinstance(m, _COUNTED)]
    try:
        with torch.inference_mode():
            meta.eval()(torch.empty(x_shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return Flops(dense, depthwise, on_image)


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


CONV_FLOP = 2 * 256 * 256 * 9 * 128 * 128  # the reference: a 256-channel 3x3 convolution at 128x128


def reference_conv() -> Callable[[], torch.Tensor]:
    """One call of the reference convolution, the shape that dominates these nets."""
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 256, 128, 128)
    return lambda: conv(x)


ROUNDS = 2
PEAK_BESIDE = "reference conv"  # its turn in the rounds


def time_in_turn(calls: dict[str, Callable[[], object]], rounds: int = ROUNDS, budget: float = 8.0) -> dict[str, float]:
    """Seconds per call of each of ``calls``: after a warm-up call each, the calls take turns
    round by round, a round timing the median of up to 5 calls of each (fewer once they pass
    ``budget / rounds / 2`` seconds), and each keeps its best round.

    One call after another, a burst of other work lands on one variant's whole timing; in turn,
    it slows one round of each.
    """
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fn in calls.items():
            times: list[float] = []
            while not times or (sum(times) < budget / rounds / 2 and len(times) < 5):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], statistics.median(times))
    return best


DEPTHWISE_SHAPE = (240, 64)  # channels, side: a MobileNetV3-Large depthwise layer at a 256-pixel input


def measure_peaks(repeats: int = 10) -> dict[str, float]:
    """GFLOP/s, best of N: a 4096^2 fp32 GEMM, a 256-channel 3x3 convolution at 128x128, and a
    depthwise 3x3 convolution of :data:`DEPTHWISE_SHAPE`."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    conv = reference_conv()
    c, side = DEPTHWISE_SHAPE
    depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).eval()
    xd = torch.randn(1, c, side, side)
    with torch.inference_mode():
        gemm = 2 * 4096**3 / _best(lambda: torch.mm(a, b), repeats)
        conv3 = CONV_FLOP / _best(conv, repeats)
        dw3 = 2 * c * 9 * side * side / _best(lambda: depthwise(xd), 10 * repeats)  # microseconds: more runs
    return {"gemm_gflops": gemm / 1e9, "conv3x3_gflops": conv3 / 1e9, "depthwise3x3_gflops": dw3 / 1e9}


def _row(side: int, flops: Flops, seconds: float) -> dict:
    return {
        "size": side,
        "gflop": flops.total / 1e9,
        "gflop_depthwise": flops.depthwise / 1e9,
        "gflop_on_image": flops.on_image / 1e9,
        "seconds": seconds,
        "gflops": flops.total / seconds / 1e9,
    }


def on_image_share(row: dict, peak: float) -> float:
    """``row``'s % of the conv peak counting only the convolution taps that reach the image: the
    nominal count holds taps over padding as work, which puts ASPP's large rates on small maps
    above 100% (DeepLab v3 MobileNetV3 at 256: 4.9 nominal GFLOPs, 2.0 on the image)."""
    return 100 * row["gflop_on_image"] / row["seconds"] / peak


def recount(results: dict) -> dict:
    """Add ``gflop_on_image`` to rows measured before it was counted: FLOPs follow from the model
    and the row's size alone, so no timing is repeated (a row's multiple of the forward's count,
    1, 3 or 6 for the training steps, is read off its nominal count)."""
    for name, rows in results["models"].items():
        missing = [r for r in rows.values() if "gflop_on_image" not in r]
        if not missing:
            continue
        model, counts = _build(name), {}
        for r in missing:
            if r["size"] not in counts:
                counts[r["size"]] = layer_flops(model, (1, _channels(name), r["size"], r["size"]))
            flops = counts[r["size"]]
            times = round(r["gflop"] * 1e9 / flops.total)
            if abs(r["gflop"] * 1e9 - times * flops.total) > 1e-6 * flops.total:
                raise ValueError(f"{name} at {r['size']}: {r['gflop']} GFLOPs is no multiple of the model's count")
            r["gflop_on_image"] = flops.on_image * times / 1e9
    return results


def roof_share(row: dict, peaks: dict[str, float]) -> float:
    """The time the machine's peaks allow for ``row``'s layers (depthwise ones at the depthwise
    peak, the rest at the dense convolution's), as a share of the time it took."""
    depthwise = row.get("gflop_depthwise", 0.0)  # absent in results written before it was counted
    allowed = (row["gflop"] - depthwise) / peaks["conv3x3_gflops"]
    if depthwise:
        allowed += depthwise / peaks["depthwise3x3_gflops"]
    return allowed / row["seconds"]


def peak_share_at_roof(row: dict, peaks: dict[str, float]) -> float:
    """The share of the conv peak that ``row``'s layers reach at most: run at the roof, the
    depthwise ones at the depthwise peak. Below 85% for a MobileNet, the conv-peak target is
    out of reach of any backend on this machine."""
    return row["gflop"] / peaks["conv3x3_gflops"] / (roof_share(row, peaks) * row["seconds"])


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


def untrivial(model: nn.Module, scale: float = 0.01) -> nn.Module:
    """``model`` with its all-zero weight tensors (FCN's zero-initialised score layers, FCN Sec.
    4.3) drawn from N(0, ``scale``), in place. With zero scores every logit is equal, every
    backend's labels agree with eager's trivially, and the parity rule that picks the default path
    would pass any precision: the row would not be the fp32 path a trained FCN gets."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1 and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
    return model


def measure_model(name: str) -> dict:
    model = untrivial(_build(name))
    channels = _channels(name)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    rows = {}
    sizes = {"256": _input_size(name, 256), "paper": _input_size(name, _paper_size(name))}
    for label, side in sizes.items():
        x = torch.randn(1, channels, side, side)
        flops = layer_flops(model, tuple(x.shape))
        # What predict and eval run on images of this size: the backend probe's choice at the size;
        # probed afresh (an empty cache), so that the figure is today's probe, not an earlier run's.
        with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, DENSEPRED_CACHE=cache):
            default, choice = accelerate(model, "auto", probe_input(model, channels, size=(side, side)), amp="auto")
        variants = {"eager": (model, x), f"default ({choice.backend})": (default, x)}
        if label == "256":
            variants["channels-last"] = (cl, x.to(memory_format=torch.channels_last))
        calls = {variant: (lambda m=m, inp=inp: m(inp)) for variant, (m, inp) in variants.items()}
        with torch.inference_mode():
            seconds = time_in_turn({**calls, PEAK_BESIDE: reference_conv()})
        beside = CONV_FLOP / seconds.pop(PEAK_BESIDE) / 1e9
        for variant, took in seconds.items():
            rows[f"{variant} {side}"] = {**_row(side, flops, took), "peak_beside_gflops": beside}
        # Why the default is what it is: the probe's seconds per candidate, and the ones it refused.
        rows[f"default ({choice.backend}) {side}"]["probe"] = {"seconds": choice.seconds, "rejected": choice.rejected}
        if label == "256":
            try:
                rows[f"train step {side}"] = _row(side, flops * 3, _train_step_seconds(model, x))
            except ValueError:  # batch norm after a global pooling (ASPP's image branch, PSPNet's bin 1)
                # sees one value per channel at batch 1 and cannot train: batch 2
                seconds = _train_step_seconds(model, x.expand(2, -1, -1, -1))
                rows[f"train step {side} (batch 2)"] = _row(side, flops * 6, seconds)
    return rows


def table(results: dict) -> str:
    m, p = results["machine"], results["peaks"]
    has_roof = "depthwise3x3_gflops" in p  # results written before the depthwise peak have one column
    # Rows timed in turn with the reference convolution (results written before have no such column)
    has_beside = any("peak_beside_gflops" in r for rows in results["models"].values() for r in rows.values())
    # FLOPs less the taps that read only padding (results written before lack them: `--recount`)
    has_on_image = any("gflop_on_image" in r for rows in results["models"].values() for r in rows.values())
    c, side = DEPTHWISE_SHAPE
    lines = [
        f"Machine: {cpu_name(m)}, {m['capability']}, native bf16 {m['native_bf16']}, {m['threads']} threads, "
        f"torch {m['torch']}. Measured fp32 peaks: GEMM 4096^2 {p['gemm_gflops']:.0f} GFLOP/s, 3x3 conv "
        f"256ch@128^2 {p['conv3x3_gflops']:.0f} GFLOP/s (the reference for % of peak)"
        + (f", depthwise 3x3 {c}ch@{side}^2 {p['depthwise3x3_gflops']:.0f} GFLOP/s" if has_roof else "")
        + ". Batch 1.",
        "",
        "| model | path, size | GFLOPs | seconds | GFLOP/s | % of conv peak |"
        + (" % of roof |" if has_roof else "")
        + (" % of the peak beside |" if has_beside else "")
        + (" % of conv peak, taps on the image |" if has_on_image else ""),
        "|---|---|---|---|---|---|"
        + ("---|" if has_roof else "")
        + ("---|" if has_beside else "")
        + ("---|" if has_on_image else ""),
    ]
    peak = p["conv3x3_gflops"]
    for name, rows in sorted(results["models"].items()):  # by name, as the registry lists them, however measured
        for path, r in rows.items():
            beside = r.get("peak_beside_gflops")  # the training step has none
            lines.append(
                f"| {name} | {path} | {r['gflop']:.1f} | {r['seconds']:.3f} | {r['gflops']:.0f} | "
                f"{100 * r['gflops'] / peak:.0f}% |"
                + (f" {100 * roof_share(r, p):.0f}% |" if has_roof else "")
                + ((f" {100 * r['gflops'] / beside:.0f}% ({beside:.0f}) |" if beside else " - |") if has_beside else "")
                + ((f" {on_image_share(r, peak):.0f}% |" if "gflop_on_image" in r else " - |") if has_on_image else "")
            )
    default_rows = [
        (name, path, r, rows[f"eager {r['size']}"])
        for name, rows in results["models"].items()
        for path, r in rows.items()
        if path.startswith("default")
    ]
    # (% of peak, % of roof, model, path, faster than eager at that size) for every default-path row
    defaults = [
        (
            100 * r["gflops"] / peak,
            100 * roof_share(r, p) if has_roof and r.get("gflop_depthwise") else None,  # depthwise nets only
            name,
            path,
            r["seconds"] < eager["seconds"],
        )
        for name, path, r, eager in default_rows
    ]
    if defaults:
        low = min(defaults, key=lambda d: d[0])  # by share alone: the roof slot holds None for dense nets
        below = [
            f"{name} {path.split()[-1]} ({share:.0f}%)"
            for share, _, name, path, _ in sorted(defaults, key=lambda d: d[0])
            if round(share) < 85
        ]
        faster = sum(quicker for *_, quicker in defaults)
        lines += [
            "",
            f"Default path: >= 85% of the conv peak on {len(defaults) - len(below)} of {len(defaults)} model-size "
            f"pairs, faster than eager on {faster}; lowest {low[0]:.0f}% ({low[2]}, {low[3]}); target 85%."
            + (f" Below 85%: {', '.join(below)}." if below else ""),
        ]
        if has_beside:
            against_beside = [
                (100 * r["gflops"] / r["peak_beside_gflops"], name, path)
                for name, path, r, _ in default_rows
                if "peak_beside_gflops" in r
            ]
            short = [
                f"{name} {path.split()[-1]} ({share:.0f}%)"
                for share, name, path in sorted(against_beside)
                if round(share) < 85
            ]
            lines[-1] += (
                f" Against the conv peak timed beside each row: >= 85% on {len(against_beside) - len(short)} of "
                f"{len(against_beside)}" + (f"; below: {', '.join(short)}." if short else ".")
            )
        if has_on_image:
            counted = [
                (on_image_share(r, peak), name, path) for name, path, r, _ in default_rows if "gflop_on_image" in r
            ]
            short = [
                f"{name} {path.split()[-1]} ({share:.0f}%)"
                for share, name, path in sorted(counted)
                if round(share) < 85
            ]
            lines[-1] += (
                " Counting only the taps that reach the image (a 3x3 atrous filter whose rate is at least the map's "
                "side is its centre alone, DeepLab v3 Sec. 3.3): "
                f">= 85% on {len(counted) - len(short)} of {len(counted)}"
                + (f"; below: {', '.join(short)}." if short else ".")
            )
        depthwise = [(roof, name, path) for _, roof, name, path, _ in defaults if roof is not None]
        if depthwise:
            at_roof = {
                (name, path): 100 * peak_share_at_roof(results["models"][name][path], p) for _, name, path in depthwise
            }
            lines[-1] += (
                " Against the roof (depthwise layers at the depthwise peak): "
                + ", ".join(
                    f"{name} {path.split()[-1]} {roof:.0f}% (at the roof: {at_roof[name, path]:.0f}% of the conv peak)"
                    for roof, name, path in depthwise
                )
                + "."
            )
    return "\n".join(lines)


def run_roofline(path: Path, only: list[str] | None = None) -> dict:
    """Measure what is not in ``path`` yet (results of another machine are measured again)."""
    retain_freed_memory()  # eager and training run as under `densepred train`, `predict`, `eval`
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
    results["peaks"] = {k: max(v, results["peaks"].get(k, 0.0)) for k, v in again.items()}
    path.write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/roofline.json"))
    parser.add_argument(
        "--recount", action="store_true", help="only add the FLOPs on the image to the rows of --out that lack them"
    )
    args = parser.parse_args()
    if args.recount:
        results = recount(json.loads(args.out.read_text()))
        args.out.write_text(json.dumps(results, indent=2))
        print(table(results))
        return
    print(table(run_roofline(args.out, args.only.split(",") if args.only else None)))


if __name__ == "__main__":
    main()
