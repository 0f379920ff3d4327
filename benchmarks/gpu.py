"""CUDA checks and a short speed table, for a machine with an NVIDIA GPU (``benchmarks/gpu.sh``).

    python -m benchmarks.gpu                          # on the GPU: checks, then the table
    python -m benchmarks.gpu --device cpu --smoke     # the same code on a CPU, small and quick

Checks (exit 1 when one fails): each model's labels on the device equal the CPU's on >= 99.99 %
of the pixels with TF32 off (PyTorch lets cuDNN convolutions use TF32 by default; how many
labels that changes is reported), and every backend that runs on the device passes the
backends' own parity check. Reported, not checked: how many labels the reduced precision that
``amp=auto`` picks there (fp16 on CUDA) changes.
Speed: median latency of one image at ``--size`` per model, backend and precision, and the
peak device memory of the call.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.speed import machine, timed
from densepred.backends import AGREEMENT, BACKENDS, CPU_ONLY, MissingRuntimeError, accelerate
from densepred.precision import autocast, resolve_amp
from densepred.registry import create_model

MODELS = "fcn8s,deeplab_v1_largefov,deeplabv3_resnet50,pspnet,unet_padded,lraspp_mobilenet_v3_large"
SMOKE_MODELS = "lraspp_mobilenet_v3_large,unet_padded"


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _labels(model: torch.nn.Module, x: torch.Tensor, amp: str = "none") -> torch.Tensor:
    with torch.inference_mode(), autocast(amp, x.device):
        out = model(x)
    return (out["fused"] if isinstance(out, dict) else out).argmax(1).cpu()


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` that returns once the device has finished: CUDA calls return before the kernels do."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def check_and_time(name: str, device: torch.device, size: int, check_size: int) -> dict:
    """One model's checks (``failures`` lists those that failed) and its speed rows."""
    cpu_model = create_model(name, num_classes=21, in_channels=3).eval()
    model = copy.deepcopy(cpu_model).to(device)
    side = model.input_rule().nearest(check_size)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    result: dict = {"model": name, "failures": [], "rows": []}
    reference = _labels(cpu_model, x)
    with _tf32(False):
        result["fp32_vs_cpu"] = _agreement(_labels(model, x.to(device)), reference)
    if device.type == "cuda":
        result["tf32_vs_cpu"] = _agreement(_labels(model, x.to(device)), reference)  # PyTorch's defaults
    if result["fp32_vs_cpu"] < AGREEMENT:
        result["failures"].append(f"fp32 labels on {device} agree with the CPU's on {result['fp32_vs_cpu']:.4%}")
    amp = resolve_amp("auto", device)
    result["amp"] = amp
    result["amp_vs_fp32"] = _agreement(_labels(model, x.to(device), amp), _labels(model, x.to(device)))

    runs: dict[str, Callable] = {"eager": model}
    for backend in BACKENDS[1:]:
        if backend in CPU_ONLY and device.type != "cpu":
            continue
        try:
            runs[backend] = accelerate(model, backend, x.to(device), amp="none")[0]
        except MissingRuntimeError as exc:
            result.setdefault("skipped", {})[backend] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a backend that fails here is the finding
            result["failures"].append(f"{backend}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")

    side = model.input_rule().nearest(size)
    big = torch.randn(1, 3, side, side, device=device)
    variants = [(backend, "fp32", "none") for backend in runs]
    if amp != "none":  # autocast is eager's: the traced and exported runtimes are float32
        variants += [(backend, amp, amp) for backend in ("eager", "channels_last") if backend in runs]
    for backend, label, precision in variants:
        run = runs[backend]

        def call(run=run, precision=precision):
            with torch.inference_mode(), autocast(precision, device):
                return run(big)

        seconds = timed(_synced(call, device), min_runs=3, max_seconds=6.0)
        row = {"backend": backend, "precision": label, "size": side, "ms": seconds * 1e3}
        row["peak_mib"] = _peak_mib(_synced(call, device), device)
        result["rows"].append(row)
    return result


def _print(result: dict) -> None:
    tf32 = f" (TF32 {result['tf32_vs_cpu']:.4%})" if "tf32_vs_cpu" in result else ""
    print(
        f"\n{result['model']}: labels vs CPU fp32 {result['fp32_vs_cpu']:.4%}{tf32}; "
        f"{result['amp']} vs fp32 {result['amp_vs_fp32']:.4%}"
    )
    eager = next(r["ms"] for r in result["rows"] if r["backend"] == "eager" and r["precision"] == "fp32")
    for r in result["rows"]:
        peak = f"{r['peak_mib']:8.0f} MiB" if r["peak_mib"] is not None else ""
        print(
            f"  {r['backend']:14s} {r['precision']:5s} {r['size']}px {r['ms']:9.2f} ms "
            f"{eager / r['ms']:5.2f}x eager fp32 {peak}"
        )
    for backend, why in result.get("skipped", {}).items():
        print(f"  {backend:14s} skipped: {why}")
    for failure in result["failures"]:
        print(f"  FAILED: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    parser.add_argument("--models", default=None, help=f"comma-separated (default: {MODELS})")
    parser.add_argument("--size", type=int, default=None, help="speed-table input side (default 512; smoke 64)")
    parser.add_argument("--smoke", action="store_true", help="two models at 64 px: checks the script, not the GPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    names = (args.models or (SMOKE_MODELS if args.smoke else MODELS)).split(",")
    size = args.size or (64 if args.smoke else 512)
    info = machine()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
        info["cuda"], info["cudnn"] = torch.version.cuda, torch.backends.cudnn.version()
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    results = []
    for name in names:
        results.append(check_and_time(name, device, size, check_size=64 if args.smoke else 128))
        _print(results[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    failed = [f"{r['model']}: {f}" for r in results for f in r["failures"]]
    print(f"\n{len(failed)} check(s) failed" + "".join(f"\n  {f}" for f in failed) if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
