"""The CPU recipes' training step, channels-first against channels-last (``model.channels_last``).

    python -m benchmarks.train_layout [--recipes synthetic_unet,camvid_lraspp_cpu] [--rounds 3]
                                      [--no-avx2]

Per recipe: its model, batch, crop and optimiser, at the precision its ``train.amp`` resolves to
on this CPU, one training step (forward, cross-entropy, backward, update) on random data in each
memory layout; the two take turns, round by round, and each keeps its best round (the median of
``--steps`` steps after a warm-up). The recipes that set ``channels_last: true`` do so because
it won here and under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's and
oneDNN's AVX2 kernels on this CPU, measured again by a child process; ``--no-avx2`` skips it).

Results: ``--out`` (default runs/bench/train_layout.json), with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from densepred.allocator import retain_freed_memory
from densepred.build import build_model
from densepred.config import Experiment, load_experiment
from densepred.models.layers import center_crop
from densepred.precision import autocast, cpu_name, machine_info, resolve_amp
from densepred.trainer import build_optimizer

from .children import AVX2, json_from_child

RECIPES = ("synthetic_unet", "camvid_unet_cpu", "isbi_unet_cpu", "camvid_lraspp_cpu", "camvid_segnet_cpu")
# (classes, channels) of each dataset, so that no recipe needs its files to be timed.
DATASETS = {"synthetic": (6, 3), "camvid": (11, 3), "isbi2012": (2, 1)}


def _crop(exp: Experiment) -> int:
    return exp.data.crop or int(exp.data.options.get("size", 256))


def _stepper(exp: Experiment, channels_last: bool, amp: str):  # noqa: ANN202 - a step function
    """One training step of ``exp``'s model, batch and optimiser in the given layout."""
    classes, channels = DATASETS[exp.data.dataset]
    torch.manual_seed(0)
    model = build_model(exp, classes, channels).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, exp.optim)
    crop, batch = _crop(exp), exp.data.batch_size
    x = torch.randn(batch, channels, crop, crop).contiguous(memory_format=memory_format)
    y = torch.randint(0, classes, (batch, crop, crop))

    def step() -> None:
        with autocast(amp, "cpu"):
            out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        target = center_crop(y[:, None], *out.shape[-2:])[:, 0]  # valid convolutions: the centre's labels
        loss = F.cross_entropy(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(recipe: str, rounds: int, steps: int) -> dict:
    """Seconds per training step of ``recipe`` in each layout (best round of medians)."""
    exp = load_experiment(recipe, [])
    amp = resolve_amp(exp.train.amp, "cpu")
    steppers = {"channels-first": _stepper(exp, False, amp), "channels-last": _stepper(exp, True, amp)}
    best = dict.fromkeys(steppers, float("inf"))
    for step in steppers.values():
        step()  # warm-up: oneDNN's kernels and the allocator
    for _ in range(rounds):
        for name, step in steppers.items():
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], statistics.median(times))
    return {
        "model": exp.model.name,
        "batch": exp.data.batch_size,
        "crop": _crop(exp),
        "amp": amp,
        "recipe_channels_last": exp.model.channels_last,
        "seconds": best,
        "speedup": best["channels-first"] / best["channels-last"],
    }


def run(recipes: list[str], rounds: int, steps: int) -> dict:
    results = {"machine": machine_info().to_dict(), "recipes": {}}
    for recipe in recipes:
        results["recipes"][recipe] = row = measure(recipe, rounds, steps)
        print(f"{recipe}: channels-last x{row['speedup']:.2f} ({row['amp']})", flush=True)
    return results


def _in_child(recipes: list[str], rounds: int, steps: int, env: dict[str, str]) -> dict:
    """:func:`run` by a fresh process under ``env``."""
    args = ["--child", "--recipes", ",".join(recipes), "--rounds", str(rounds), "--steps", str(steps)]
    return json_from_child("benchmarks.train_layout", args, env)


def _rows(results: dict) -> list[str]:
    lines = [
        "| recipe | model | batch x crop | precision | channels-first s | channels-last s | speed-up | recipe sets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe, r in results["recipes"].items():
        first, last = r["seconds"]["channels-first"], r["seconds"]["channels-last"]
        setting = "channels-last" if r["recipe_channels_last"] else "channels-first"
        lines.append(
            f"| {recipe} | {r['model']} | {r['batch']} x {r['crop']} | {r['amp']} | {first:.3f} | {last:.3f} "
            f"| **x{r['speedup']:.2f}** | {setting} |"
        )
    return lines


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"{cpu_name(m)}, torch capability {m['capability']}, {m['threads']} threads, torch {m['torch']}: seconds per "
        "training step, each layout's best round (the median of its steps), the recipe's precision on this CPU.",
        "",
        *_rows(results),
    ]
    if "avx2" in results:
        caps = ", ".join(f"{k}={v}" for k, v in AVX2.items())
        lines += ["", f"The same, with PyTorch's kernels capped at AVX2 ({caps}):", "", *_rows(results["avx2"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_layout", description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout and round (median kept)")
    parser.add_argument("--no-avx2", action="store_true", help="skip the table under AVX2 kernels")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train_layout.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a child of _in_child
    args = parser.parse_args()
    retain_freed_memory()  # as `densepred train` runs
    recipes = args.recipes.split(",")
    results = run(recipes, args.rounds, args.steps)
    if not args.child and not args.no_avx2:
        results["avx2"] = _in_child(recipes, args.rounds, args.steps, AVX2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    if not args.child:
        print(table(results))


if __name__ == "__main__":
    main()
