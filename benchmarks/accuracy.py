"""Accuracy on real data under a CPU budget: ISBI 2012 (train25 -> val5) and CamVid (train -> val).

    python -m benchmarks accuracy --data-root ../shared/data [--minutes 6] [--only isbi_unet,...]

Each run trains a shipped recipe with overrides for ``--minutes`` of training time: a short
probe times one training step of the real model at the recipe's crop and batch, and the
iteration count (hence the poly schedule) is set to fit the budget. Runs go to
``<out>/<run>/``, resume where they stopped (``densepred train --resume``; a finished run is
skipped) and write ``result.json`` as soon as they are scored, so the whole benchmark can be
stopped and restarted. ISBI is scored with the challenge's pixel error, adapted Rand error and
membrane IoU; CamVid with mIoU, pixel accuracy and per-class IoU, without and with the CRF.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from densepred.build import build_model
from densepred.config import apply_overrides, experiment_from_dict, load_experiment, resolve_config

from .speed import machine

CAMVID_PAPERS = {  # CamVid 11-class *test* mIoU, ImageNet-pretrained, 360x480
    "SegNet (Badrinarayanan et al. 2017, Table 3)": 46.4,
    "DeepLab-LFOV (as reported by Yu & Koltun 2016, Table 2)": 61.6,
    "Dilation8 (Yu & Koltun 2016, Table 2)": 65.3,
}
ISBI_PAPER = {"U-Net (Ronneberger et al. 2015, Table 1, test set)": {"pixel_error": 0.0611, "rand_error": 0.0382}}


@dataclass(frozen=True)
class Run:
    name: str
    dataset: str  # isbi2012 | camvid (also the data folder under --data-root)
    recipe: str
    model_note: str
    overrides: list[str] = field(default_factory=list)

    @property
    def minutes(self) -> float:
        """Default training budget: ISBI's 25 tiles learn fast; CamVid needs more."""
        return 4.0 if self.dataset == "isbi2012" else 6.0


# One recipe per dataset; the models differ by overrides so the budget and data are shared.
_ISBI = ["data.crop=256", "data.batch_size=2", "data.workers=1"]
_FROM_SCRATCH_VGG = ["model.pretrained=null", "optim.name=adamw", "optim.lr=0.0005", "optim.bias_lr_mult=1.0"]
_CAMVID = ["data.batch_size=4", "data.workers=1", "eval.max_images=20"]
RUNS = [
    Run(
        "isbi_unet",
        "isbi2012",
        "isbi_unet_cpu",
        "U-Net, valid convolutions, overlap-tile, weight maps (paper); 16 base channels (ours)",
        [
            "model.name=unet",
            "model.options={base_channels: 16}",
            "optim.lr=0.001",
            "data.crop=252",
            "data.batch_size=2",
            "data.workers=1",
            "eval.mode=overlap_tile",
        ],
    ),
    Run("isbi_unet_padded", "isbi2012", "isbi_unet_cpu", "U-Net, padded variant, 16 base channels, BN", _ISBI),
    Run(
        "isbi_fcn8s",
        "isbi2012",
        "isbi_unet_cpu",
        "FCN-8s (VGG16, full width), from scratch",
        ["model.name=fcn8s", "model.options={}", "train.loss=ce", *_ISBI, *_FROM_SCRATCH_VGG],
    ),
    Run(
        "isbi_deeplab_v1",
        "isbi2012",
        "isbi_unet_cpu",
        "DeepLab v1 LargeFOV (atrous VGG16), from scratch",
        ["model.name=deeplab_v1_largefov", "model.options={}", "train.loss=ce", *_ISBI, *_FROM_SCRATCH_VGG],
    ),
    Run(
        "camvid_fcn8s",
        "camvid",
        "camvid_unet_cpu",
        "FCN-8s (VGG16), from scratch",
        ["model.name=fcn8s", "model.options={}", *_CAMVID, *_FROM_SCRATCH_VGG],
    ),
    Run(
        "camvid_deeplab_v1",
        "camvid",
        "camvid_unet_cpu",
        "DeepLab v1 LargeFOV, from scratch",
        ["model.name=deeplab_v1_largefov", "model.options={}", *_CAMVID, *_FROM_SCRATCH_VGG],
    ),
    Run(
        "camvid_deeplab_v2",
        "camvid",
        "camvid_unet_cpu",
        "DeepLab v2 (dilated ResNet-101, ASPP-L), from scratch, BN in training mode",
        ["model.name=deeplab_v2_resnet101", "model.options={frozen_bn: false}", *_CAMVID, *_FROM_SCRATCH_VGG],
    ),
    Run(
        "camvid_unet_padded",
        "camvid",
        "camvid_unet_cpu",
        "U-Net, padded variant, 16 base channels, BN",
        ["data.workers=1"],
    ),
]


def _experiment(run: Run, data_root: Path, extra: list[str]):
    exp = load_experiment(resolve_config(run.recipe))
    exp = experiment_from_dict(apply_overrides(exp.to_dict(), [*run.overrides, *extra]))
    exp.data.root = str(data_root / run.dataset)
    return exp


def _seconds_per_step(exp) -> float:
    """One timed training step (after a warm-up) of the real model on random data of the recipe's shape."""
    channels = 1 if exp.data.dataset == "isbi2012" else 3
    classes = 2 if exp.data.dataset == "isbi2012" else 11
    model = build_model(exp, classes, channels).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    x = torch.randn(exp.data.batch_size, channels, exp.data.crop, exp.data.crop)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(x)
        loss = out.float().logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[-1]


def _plan(run: Run, data_root: Path, run_dir: Path, minutes: float) -> list[str]:
    """Overrides that fit ``minutes``; computed once and stored so that a resumed run keeps them."""
    path = run_dir / "plan.json"
    if path.exists():
        return json.loads(path.read_text())["overrides"]
    if (run_dir / "metrics.json").exists():  # trained before plans existed: its config.yaml is the record
        return []
    exp = _experiment(run, data_root, [])
    step = _seconds_per_step(exp)
    # Loading, evaluation and logging take time too: plan for 80% of the budget in steps.
    iterations = max(20, int(0.8 * 60 * minutes / step))
    overrides = [
        f"train.iterations={iterations}",
        f"train.eval_every={max(1, math.ceil(iterations / 4))}",
        f"train.checkpoint_every={max(1, math.ceil(iterations / 8))}",
        f"train.max_minutes={minutes}",
        f"schedule.warmup_iters={min(50, iterations // 10)}",
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds_per_step": step, "minutes": minutes, "overrides": overrides}, indent=2))
    return overrides


def _train(run: Run, data_root: Path, run_dir: Path, overrides: list[str]) -> None:
    if (run_dir / "metrics.json").exists():  # written when training finished or ran out of budget
        return
    exp = _experiment(run, data_root, overrides)
    config = run_dir / "recipe.yaml"
    config.write_text(exp.to_yaml())
    resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
    cmd = [sys.executable, "-m", "densepred", "train", "--config", str(config), "--run-dir", str(run_dir)]
    subprocess.run([*cmd, "--no-progress", *resume], check=True)


def _final_checkpoint(run_dir: Path) -> Path:
    files = sorted((run_dir / "checkpoints").glob("iter_*.pt"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no checkpoint; the training did not get to its first one")
    return files[-1]


def _score_isbi(run: Run, checkpoint: Path, data_root: Path) -> dict:
    from densepred.build import normalization_for
    from densepred.checkpoint import load_trained
    from densepred.data.factory import create_dataset
    from densepred.inference import predict_logits
    from densepred.metrics import ConfusionMatrix, adapted_rand_error, segments_from_membrane_mask

    trained = load_trained(checkpoint)
    options = trained.experiment.eval
    val = create_dataset("isbi2012", data_root / "isbi2012", "val5")
    norm = normalization_for(trained.normalization, trained.in_channels)
    cm, rand = ConfusionMatrix(2, ignore_index=val.ignore_index), []
    with torch.inference_mode():
        for i in range(len(val)):
            sample = val.load(i)
            pred = predict_logits(trained.model, norm(sample.image)[None], options).argmax(1)[0].numpy()
            cm.update(torch.from_numpy(pred)[None], torch.from_numpy(sample.mask.astype(np.int64))[None])
            rand.append(adapted_rand_error(segments_from_membrane_mask(pred), segments_from_membrane_mask(sample.mask)))
    m = cm.compute()
    return {"pixel_error": 1 - m["pixel_acc"], "rand_error": float(np.mean(rand)), "membrane_iou": m["iou"][0], **m}


def _score_camvid(run: Run, checkpoint: Path, data_root: Path, run_dir: Path) -> dict:
    from .crf_camvid import camvid_crf_scores

    return camvid_crf_scores(checkpoint, data_root / "camvid", run_dir / "crf", tune=4)


def _curve(run_dir: Path) -> list[dict]:
    log = run_dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    curve, last_time = [], None
    for r in records:
        if "loss" in r:
            last_time = r.get("time", last_time)
        elif r.get("split") == "val":
            # Logs from before evaluations carried a time: take the last training record's.
            time_s = r.get("time", last_time)
            if time_s is not None:
                curve.append({**r, "time": time_s})
    return curve


def run_all(data_root: Path, out: Path, minutes: float | None = None, only: list[str] | None = None) -> dict:
    results = {}
    for run in RUNS:
        if only and run.name not in only:
            continue
        run_dir = out / run.name
        result_path = run_dir / "result.json"
        if result_path.exists():
            results[run.name] = json.loads(result_path.read_text())
            print(f"{run.name}: done earlier ({result_path})")
            continue
        if not (data_root / run.dataset).is_dir():
            print(f"{run.name}: skipped, no {data_root / run.dataset}")
            continue
        budget = minutes or run.minutes
        print(f"== {run.name}: {run.model_note}, {budget} min budget", flush=True)
        overrides = _plan(run, data_root, run_dir, budget)
        _train(run, data_root, run_dir, overrides)
        checkpoint = _final_checkpoint(run_dir)
        if run.dataset == "isbi2012":
            scores = _score_isbi(run, checkpoint, data_root)
        else:
            scores = _score_camvid(run, checkpoint, data_root, run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        result = {
            "run": run.name,
            "dataset": run.dataset,
            "model": run.model_note,
            "recipe": run.recipe,
            "overrides": [*run.overrides, *overrides],
            "iterations": metrics.get("iterations"),
            "train_seconds": metrics.get("train_seconds"),
            "checkpoint": str(checkpoint),
            "scores": scores,
            "curve": _curve(run_dir),
            "machine": machine(),
        }
        result_path.write_text(json.dumps(result, indent=2, default=float))
        results[run.name] = result
    return results
