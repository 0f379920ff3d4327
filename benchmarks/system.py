"""Whole-system figures: loader vs training throughput per recipe, trainer overhead, CRF speed.

    python -m benchmarks system --data-root ../shared/data

- Loader: each shipped recipe's training pipeline (its augmentation, crop, normalisation,
  batch and workers) over real images: CamVid stands in for VOC/Cityscapes-style RGB recipes,
  ISBI 2012 for the gray ones, the synthetic set for the synthetic recipe. Compared with the
  recipe model's training images/s from the speed benchmark (same crop family, batch 2).
- Trainer overhead: densepred's loop against a bare PyTorch loop (benchmarks/trainer_overhead.py).
- CRF: ours against pydensecrf on the same input (benchmarks/crf_speed.py), and label agreement
  with the exact CRF per input family (benchmarks/crf_agreement.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from densepred.build import build_dataset
from densepred.config import apply_overrides, experiment_from_dict, load_experiment, resolve_config
from densepred.data import make_loader

from .speed import load_results

RECIPES_DIR = Path(__file__).resolve().parents[1] / "src" / "densepred" / "configs"


def _stand_in(exp, data_root: Path):
    """The recipe with its dataset swapped for real data that is here (same pipeline otherwise)."""
    raw = exp.to_dict()
    if exp.data.dataset == "synthetic":
        return exp, "synthetic"
    if exp.data.dataset == "isbi2012" or exp.model.name.startswith("unet") and exp.data.normalization == "unit":
        overrides = [f"data.root={data_root / 'isbi2012'}", "data.dataset=isbi2012", "data.train_split=train25"]
        return experiment_from_dict(apply_overrides(raw, overrides)), "isbi2012"
    overrides = [
        f"data.root={data_root / 'camvid'}",
        "data.dataset=camvid",
        "data.train_split=train",
        "data.options={}",
    ]
    return experiment_from_dict(apply_overrides(raw, overrides)), "camvid"


def loader_rate(exp, batches: int = 25, max_seconds: float = 30.0) -> float:
    dataset = build_dataset(exp, exp.data.train_split, train=True, seed=0)
    loader = make_loader(
        dataset, exp.data.batch_size, shuffle=True, num_workers=exp.data.workers, drop_last=True, seed=0
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    images, start = 0, time.perf_counter()
    while images < batches * exp.data.batch_size and time.perf_counter() - start < max_seconds:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


CRF_ROUNDS = 7
# An AVX-512 CPU made to approximate an AVX2 one: PyTorch's kernels, FBGEMM's (the CRF's
# embedding_bag) and oneDNN's.
AVX2_VARIABLES = {"ATEN_CPU_CAPABILITY": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _crf_in_child(env: dict[str, str]) -> dict:
    """benchmarks/crf_speed.py's figures from a fresh process under ``env`` (the ISA variables act at import)."""
    cmd = [sys.executable, "-m", "benchmarks.crf_speed", "--json", "--rounds", str(CRF_ROUNDS)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_system(path: Path, data_root: Path, *, force: bool = False) -> dict:
    results = load_results(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        path.write_text(json.dumps(results, indent=2))

    loaders = results.setdefault("loader", {})
    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        if recipe.stem in loaders:
            continue
        exp, data = _stand_in(load_experiment(recipe), data_root)
        if data != "synthetic" and not Path(exp.data.root).is_dir():
            print(f"loader {recipe.stem}: skipped, no {exp.data.root}")
            continue
        rate = loader_rate(exp)
        loaders[recipe.stem] = {
            "images_per_s": rate,
            "data": data,
            "model": exp.model.name,
            "batch": exp.data.batch_size,
            "workers": exp.data.workers,
            "crop": exp.data.crop,
            "augment": exp.data.augment,
            "load_average": os.getloadavg()[0],
        }
        print(f"loader {recipe.stem}: {rate:.1f} images/s on {data}", flush=True)
        save()
    if "trainer_overhead" not in results:
        from .trainer_overhead import bare_loop, trainer_loop

        iterations = 120
        overrides = [
            f"train.iterations={iterations + 10}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "eval.max_images=1",
            "train.max_minutes=null",
        ]
        exp = load_experiment(resolve_config("synthetic_unet"), overrides)
        bare, ours = [], []
        for _ in range(3):  # alternate so a noisy machine affects both alike; best of three each
            bare.append(bare_loop(exp, iterations))
            ours.append(trainer_loop(exp, iterations))
        b, o = max(bare), max(ours)
        results["trainer_overhead"] = {
            "recipe": "synthetic_unet",
            "bare_images_per_s": b,
            "densepred_images_per_s": o,
            "overhead_percent": 100 * (b - o) / b,
            "runs": {"bare": bare, "densepred": ours},
        }
        print(f"trainer overhead: {results['trainer_overhead']['overhead_percent']:+.1f}%", flush=True)
        save()
    if "crf" not in results:
        from .crf_speed import measure

        results["crf"] = measure(CRF_ROUNDS)
        save()
    if "crf_avx2" not in results:  # the same in a fresh process whose kernels stop at AVX2
        results["crf_avx2"] = _crf_in_child(AVX2_VARIABLES)
        save()
    if "crf_agreement" not in results:
        from densepred.precision import torch_threads

        from .crf_agreement import agreement_table

        with torch_threads(1):
            results["crf_agreement"] = {"markdown": agreement_table()}
        save()
    return results
