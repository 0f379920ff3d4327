"""Speed and memory of the successor families (DeepLab v3/v3+, PSPNet, SegNet, LR-ASPP,
torchvision's FCN-ResNet / DeepLabV3), printed as the markdown table of docs/benchmarks.md.

    python -m benchmarks.successors [--only pspnet,segnet] [--out runs/bench/successors.json]

Per model, eager fp32, batch 1 unless said, ``torch.inference_mode``:
- inference at 512x512 (whole image);
- a Cityscapes frame, 1024x2048, by sliding 512 windows overlapping by 1/3 (batch of 4 windows):
  the way these models are evaluated on road scenes;
- a training step (forward, loss with the auxiliary heads' weights, backward, SGD) at the
  recipe's crop, batch 2.
Each cell: seconds and the peak resident memory during it (VmHWM, reset before) of a process
that measures that model only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from densepred.inference import sliding_window
from densepred.models.base import loss_weights_of
from densepred.precision import cpu_name, machine_info
from densepred.registry import create_model, model_entry

from .speed import peak_memory_mib, reset_peak_memory, timed

SUCCESSORS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "deeplabv3",
    "deeplabv3plus",
    "pspnet",
    "segnet",
)
TRAIN_BATCH = 2


def _measure(fn, *, warm_up: bool = True) -> dict:
    reset_peak_memory()
    if warm_up:
        seconds = timed(fn, min_runs=1, max_seconds=30.0)
    else:  # a long call whose kernels are already set up: one timing is enough
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": peak_memory_mib()}


def _train_step(model: torch.nn.Module, crop: int) -> dict:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    x = torch.randn(TRAIN_BATCH, 3, crop, crop)
    target = torch.zeros(TRAIN_BATCH, crop, crop, dtype=torch.long)
    weights = loss_weights_of(model)

    def step() -> None:
        out = model(x)
        outputs = out if isinstance(out, dict) else {"out": out}
        loss = sum(weights.get(k, 1.0) * F.cross_entropy(v, target) for k, v in outputs.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result = _measure(step)
    model.eval()
    return result


def measure(name: str) -> dict:
    model = create_model(name, num_classes=19 if name == "pspnet" else 21).eval()
    crop = model_entry(name).default_size
    with torch.inference_mode():
        x512 = torch.randn(1, 3, 512, 512)
        frame = torch.randn(1, 3, 1024, 2048)
        whole = _measure(lambda: model(x512))
        # The 512 passes set up the kernels; a frame is 18 windows of 512 (batches of 4), timed once.
        slide = _measure(lambda: sliding_window(model, frame, 512, batch_size=4), warm_up=False)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "infer 512": whole,
        "slide 1024x2048": slide,
        "train crop": crop,
        "train step": _train_step(model, crop),
    }


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {cpu_name(m)}, {m['capability']}, native bf16 {m['native_bf16']}, {m['threads']} threads, "
        f"torch {m['torch']}. Eager fp32. Cell: seconds / peak resident MiB of the process.",
        "",
        "| model | params | 512x512, b1 | 1024x2048 by 512 slide | train step, crop, b2 |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        keys = ("infer 512", "slide 1024x2048", "train step")
        cells = [f"{r[k]['seconds']:.2f} s / {r[k]['peak_rss_mib']:.0f}" for k in keys]
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {cells[0]} | {cells[1]} | {r['train crop']}: {cells[2]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.successors", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/successors.json"))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SUCCESSORS)
    info = machine_info().to_dict()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if results.get("machine") != info:
        results = {"machine": info, "models": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One fresh process per model: its peak resident memory is its own, not what earlier ones left.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        for name in names:
            if name not in results["models"]:
                print(f"{name} ...", flush=True)
                results["models"][name] = pool.submit(measure, name).result()
                args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
