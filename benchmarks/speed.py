"""Inference and training speed and peak memory of every registered model, variants side by side.

    python -m benchmarks speed [--only fcn8s,unet]

Per model:
- inference, eager fp32, at the paper's resolution (FCN 500, DeepLab 513, U-Net 572) and at
  256, batch 1 and 8: images/s, latency per batch, peak resident memory of the call;
- variants at 256 x 256, batch 1, each as a ratio to eager fp32 measured in the same run:
  channels-last, bf16 autocast, torch.compile, ONNX Runtime (CPU) when it is installed;
- a full training step (forward, loss, backward, SGD) at the recipe's crop, batch 2.
Each measurement is written to the JSON file as soon as it is taken; reruns skip what exists.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from densepred.precision import machine_info
from densepred.registry import create_model, list_models, model_entry

# The papers' test resolutions (FCN Sec. 4.3 / PASCAL 500x500, DeepLab 513x513, U-Net 572 tile).
PAPER_SIZE = {"fcn": 500, "deeplab": 513, "unet": 572}
# Training crops of the shipped recipes (FCN trains on whole ~500x500 images, batch 1).
TRAIN_CROP = {"fcn": 500, "deeplab": 321, "unet": 572}
TRAIN_BATCH = 2  # the recipes use 1-20; 2 keeps the biggest models within minutes on a CPU


def _family(name: str) -> str | None:
    return next((f for f in PAPER_SIZE if name.startswith(f) and not name.startswith(("deeplabv3", "fcn_"))), None)


def _paper_size(name: str) -> int:
    """The paper's input side (the registry's for the successors: 513, 473, 360, 520)."""
    family = _family(name)
    return PAPER_SIZE[family] if family else model_entry(name).default_size


def _train_crop(name: str) -> int:
    family = _family(name)
    return TRAIN_CROP[family] if family else model_entry(name).default_size


def _channels(name: str) -> int:
    """The papers' inputs: gray EM slices for U-Net, RGB for FCN and DeepLab."""
    return 1 if name.startswith("unet") else 3


def _build(name: str) -> torch.nn.Module:
    classes = 2 if name.startswith("unet") else 21  # ISBI membranes / PASCAL VOC
    return create_model(name, num_classes=classes, in_channels=_channels(name)).eval()


def _input_size(name: str, size: int) -> int:
    if name == "unet":  # the valid U-Net needs a side on its grid (572 is one)
        from densepred.models.unet import unet_valid_size

        return unet_valid_size(size)[0]
    return size


def reset_peak_memory() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def timed(fn: Callable[[], object], *, min_runs: int = 2, max_seconds: float = 20.0) -> float:
    """Median seconds per call after one warm-up call; stops early once ``max_seconds`` are spent.

    A call longer than ``max_seconds / 4`` (a batch of 8 through VGG16 at 513 px on a CPU) is
    timed once after the warm-up: set-up costs are small beside it, and the table stays feasible.
    """
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > max_seconds / 4:
        min_runs = 1
    times: list[float] = []
    while len(times) < min_runs or (sum(times) < max_seconds / 4 and len(times) < 10):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if sum(times) > max_seconds:
            break
    return statistics.median(times)


def _inference(model: torch.nn.Module, x: torch.Tensor) -> dict:
    with torch.inference_mode():
        reset_peak_memory()
        seconds = timed(lambda: model(x))
        peak = peak_memory_mib()
    return {"latency_s": seconds, "images_per_s": x.shape[0] / seconds, "peak_rss_mib": peak}


def _variants(name: str, model: torch.nn.Module, size: int) -> dict:
    x = torch.randn(1, _channels(name), size, size)
    out: dict[str, dict] = {}
    # A converted copy, made outside inference mode so the model's own parameters stay trainable.
    cl_model, cl_x = copy.deepcopy(model).to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        out["eager fp32"] = {"latency_s": timed(lambda: model(x))}
        out["channels-last"] = {"latency_s": timed(lambda: cl_model(cl_x))}

    def bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    out["bf16 autocast"] = {"latency_s": timed(bf16)}
    try:
        compiled = torch.compile(model)
        with torch.inference_mode():
            start = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - start
            out["torch.compile"] = {"latency_s": timed(lambda: compiled(x)), "compile_s": compile_s}
    except Exception as exc:  # noqa: BLE001 - a failed variant is a result, not a crash
        out["torch.compile"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    out["onnxruntime"] = _onnxruntime(model, x)
    base = out["eager fp32"]["latency_s"]
    for result in out.values():
        if "latency_s" in result:
            result["speedup"] = base / result["latency_s"]
    return out


def _onnxruntime(model: torch.nn.Module, x: torch.Tensor) -> dict:
    try:
        import onnxruntime  # noqa: F401 - installed or not

        from densepred.export import export_onnx, onnx_session
    except ImportError as exc:
        return {"error": f"not available ({exc.name})"}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            export_onnx(model, path, metadata={})
        except Exception as exc:  # noqa: BLE001
            return {"error": f"export failed: {type(exc).__name__}: {str(exc)[:200]}"}
        session = onnx_session(path, threads=torch.get_num_threads())  # as the onnxruntime backend runs it
        feed = {session.get_inputs()[0].name: x.numpy()}
        return {"latency_s": timed(lambda: session.run(None, feed))}


def _train_step(name: str, model: torch.nn.Module) -> dict:
    crop = _input_size(name, _train_crop(name))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    x = torch.randn(TRAIN_BATCH, _channels(name), crop, crop)

    def step():
        out = model(x)
        out = out["fused"] if isinstance(out, dict) else out  # auxiliary heads: the main output
        target = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long)
        loss = F.cross_entropy(out, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    reset_peak_memory()
    seconds = timed(step, min_runs=1, max_seconds=30.0)
    model.eval()
    return {
        "crop": crop,
        "batch": TRAIN_BATCH,
        "images_per_s": TRAIN_BATCH / seconds,
        "peak_rss_mib": peak_memory_mib(),
    }


def machine() -> dict:
    """What the figures were taken on (CPU model, vector ISA, native bf16, threads, torch, GPU)."""
    return machine_info().to_dict()


def load_results(path: Path, *, force: bool) -> dict:
    """The results measured so far, to add to, on this machine only: a file from another machine
    (or one that did not record it) is measured again, so a table never mixes machines."""
    results = json.loads(path.read_text()) if path.exists() and not force else {}
    if results and results.get("machine") != machine():
        print(f"{path}: measured on another machine ({results.get('machine')}); measuring again", flush=True)
        results = {}
    results["machine"] = machine()
    return results


def run_speed(path: Path, *, only: list[str] | None = None, force: bool = False) -> dict:
    results = load_results(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        path.write_text(json.dumps(results, indent=2))

    for name in list_models():
        if only and name not in only:
            continue
        entry = results.setdefault("models", {}).setdefault(name, {"paper": model_entry(name).paper})
        model = _build(name)
        for size in (_paper_size(name), 256):
            side = _input_size(name, size)
            for batch in (1, 8):
                key = f"infer {side}x{side} b{batch}"
                if key not in entry:
                    print(f"{name}: {key}", flush=True)
                    entry[key] = _inference(model, torch.randn(batch, _channels(name), side, side))
                    save()
        if "variants 256 b1" not in entry:
            print(f"{name}: variants", flush=True)
            entry["variants 256 b1"] = _variants(name, model, _input_size(name, 256))
            save()
        if "train step" not in entry:
            print(f"{name}: train step", flush=True)
            entry["train step"] = _train_step(name, model)
            save()
    return results
