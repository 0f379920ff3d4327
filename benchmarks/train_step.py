"""The eager CPU training step with and without its two memory-side changes, side by side.

    python -m benchmarks.train_step [--model fcn32s,fcn8s] [--size 256] [--rounds 2]

For each model, child processes alternate over four set-ups: with neither change, with only
the heap that keeps freed memory (:func:`densepred.allocator.retain_freed_memory`, as
``densepred train`` runs), with only fc6 as im2col GEMMs (:class:`Im2colConv2d`), and with
both. Each child runs SGD steps (batch 1, momentum, fused update, as the recipes) on a random
image, and reports the median of ``--steps`` after a warm-up, with the page faults of the last
step. The best of ``--rounds`` rounds is kept; the CPU is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from densepred.allocator import retain_freed_memory
from densepred.models.layers import Im2colConv2d
from densepred.precision import machine_info
from densepred.registry import create_model

SETUPS = {"neither": (False, False), "retain": (True, False), "fc6 gemm": (False, True), "both": (True, True)}


def child(model_name: str, size: int, steps: int, retain: bool, gemm: bool) -> dict:
    if retain:
        retain_freed_memory()
    if not gemm:
        Im2colConv2d.max_columns_bytes = -1  # every call a plain convolution
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=21).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, fused=True)
    image = torch.randn(1, model.in_channels, size, size)
    target = torch.randint(0, 21, (1, size, size))

    def step() -> None:
        loss = F.cross_entropy(model(image), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    times = []
    for _ in range(steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"seconds": statistics.median(times), "faults": faults}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fcn32s,fcn8s")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # retain gemm, as 0/1
    args = parser.parse_args()
    if args.child:
        retain, gemm = (flag == "1" for flag in args.child)
        print(json.dumps(child(args.model, args.size, args.steps, retain, gemm)))
        return
    info = machine_info()
    print(f"{info.cpu}, {info.capability}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"training step, batch 1, {args.size}x{args.size}: median of {args.steps}, best of {args.rounds} rounds")
    for name in args.model.split(","):
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for setup, (retain, gemm) in SETUPS.items():
                cmd = [sys.executable, "-m", "benchmarks.train_step", "--model", name, "--size", str(args.size)]
                cmd += ["--steps", str(args.steps), "--child", str(int(retain)), str(int(gemm))]
                row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
                if setup not in best or row["seconds"] < best[setup]["seconds"]:
                    best[setup] = row
        base = best["neither"]["seconds"]
        for setup, row in best.items():
            print(
                f"{name:14s} {setup:9s} {row['seconds']:7.3f} s  x{base / row['seconds']:.2f}"
                f"  page faults in a step {row['faults']:>7d}",
                flush=True,
            )


if __name__ == "__main__":
    main()
