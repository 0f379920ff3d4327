"""The trainer: learning works, runs resume exactly, failures stop cleanly, DDP matches one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densepred.checkpoint import load_checkpoint, load_trained
from densepred.config import CONFIG_DIR, ScheduleConfig, load_experiment, resolve_config
from densepred.trainer import NonFiniteLossError, lr_factor, param_groups, train

TINY = [
    "model.name=unet_padded",
    "model.options={base_channels: 4, depth: 2, batch_norm: false, dropout: 0.0}",
    "data.dataset=synthetic",
    "data.options={num_images: 8, size: 32}",
    "data.augment=none",
    "data.normalization=unit",
    "data.batch_size=2",
    "data.workers=0",
    "optim.name=adam",
    "optim.lr=0.01",
    "optim.bias_lr_mult=1",
    "schedule.policy=constant",
    "train.log_every=1",
    "train.amp=none",  # the same numbers on every CPU (amp=auto is tested in test_precision.py)
    "eval.amp=none",
    "train.checkpoint_every=0",
    "eval.max_images=4",
]


def _tiny(*extra: str):
    return load_experiment(None, [*TINY, *extra])


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("iter_*.pt"))[-1]
    return load_checkpoint(last)["model"]


def test_a_tiny_model_overfits_a_few_images(tmp_path):
    exp = _tiny(
        "data.options={num_images: 4, size: 32}",
        "data.val_split=train",
        "model.options={base_channels: 16, depth: 2, batch_norm: false}",
        "optim.lr=0.003",
        "train.iterations=200",
        "eval.max_images=4",
    )
    result = train(exp, tmp_path, progress=False)
    assert result.metrics["pixel_acc"] > 0.97, result.metrics
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "curves.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["iterations"] == 200
    state = load_checkpoint(result.checkpoint)
    assert state["config"]["name"] == exp.name and state["git_commit"]
    assert load_trained(result.checkpoint).num_classes == 6


def test_run_folder_records_progress(tmp_path):
    train(_tiny("train.iterations=4"), tmp_path, progress=False)
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert {"loss", "lr", "img_per_s"} <= set(next(r for r in lines if "loss" in r))
    assert lines[0]["event"] == "start" and lines[0]["machine"]["capability"]  # what the run ran on
    assert any(r.get("split") == "val" and "miou" in r for r in lines)


def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path):
    """Kill -9 a real training process after a checkpoint, resume it, compare with a clean run."""
    args = [
        *TINY,
        "train.iterations=30",
        "train.checkpoint_every=5",
        "train.deterministic=true",
        "model.options={base_channels: 4, depth: 2, batch_norm: true, dropout: 0.3}",
        "data.augment=deeplab",
        "data.crop=32",
        "data.scale=[0.75, 1.25]",
    ]
    train(load_experiment(None, args), tmp_path / "clean", progress=False)

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "densepred",
        "train",
        "--config",
        str(_write_recipe(tmp_path)),
        "--run-dir",
        str(killed),
        "--no-progress",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("iter_0000010.pt")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"

    result = train(load_experiment(None, args), killed, resume=True, progress=False)
    assert result.iterations == 30
    clean, resumed = _final_weights(tmp_path / "clean"), _final_weights(killed)
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


def test_a_channels_last_run_resumes_exactly_and_its_checkpoint_predicts(tmp_path):
    """The CPU recipes train channels-last: the weights are kept in that layout, a run resumed
    from a checkpoint ends with the uninterrupted run's weights, and the checkpoint segments as
    any other (its model is built channels-first)."""
    import shutil

    exp = _tiny(
        "train.iterations=6",
        "train.checkpoint_every=3",
        "train.deterministic=true",
        "model.channels_last=true",
        "model.options={base_channels: 4, depth: 2, batch_norm: true, dropout: 0.0}",
    )
    clean = train(exp, tmp_path / "clean", progress=False)
    weights = _final_weights(tmp_path / "clean")
    convs = [w for w in weights.values() if w.dim() == 4 and w.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)

    shutil.copytree(tmp_path / "clean", tmp_path / "cut")  # as if stopped after iteration 3
    (tmp_path / "cut" / "checkpoints" / "iter_0000006.pt").unlink()
    (tmp_path / "cut" / "metrics.json").unlink()
    resumed = train(exp, tmp_path / "cut", resume=True, progress=False)
    assert resumed.iterations == 6
    again = _final_weights(tmp_path / "cut")
    assert all(torch.equal(weights[key], again[key]) for key in weights)

    loaded = [w for w in load_trained(clean.checkpoint).model.parameters() if w.dim() == 4 and w.shape[-1] > 1]
    assert all(w.is_contiguous() for w in loaded)  # inference runs channels-first, as any checkpoint
    from densepred.prediction import predict

    image = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    (labels,) = predict(clean.checkpoint, [image])
    assert labels.shape == (32, 32) and int(labels.max()) < 6


def _write_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("name: tiny\n")
    return path


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    exp = _tiny("train.iterations=6", "train.checkpoint_every=2", "optim.name=sgd", "optim.momentum=0")
    exp.optim.lr = 1e30  # past what a recipe may say (refused when read): the way to blow up a step
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at iteration \d+.*Last good checkpoint"):
        train(exp, tmp_path, progress=False)
    files = sorted((tmp_path / "checkpoints").glob("iter_*.pt"))
    for f in files:  # whatever was written before the blow-up is intact and finite
        state = load_checkpoint(f)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_non_finite_steps_can_be_skipped(tmp_path):
    exp = _tiny("train.iterations=3", "optim.name=sgd", "optim.momentum=0", "train.skip_nonfinite=true")
    exp.optim.lr = 1e30
    train(exp, tmp_path, progress=False)
    assert any("skipped" in json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines())


def test_lr_schedules():
    poly = ScheduleConfig(policy="poly", power=0.9)
    assert lr_factor(0, 100, poly) == 1.0 and lr_factor(50, 100, poly) == pytest.approx(0.5**0.9)
    step = ScheduleConfig(policy="step", step_size=2000, gamma=0.1)
    assert lr_factor(1999, 6000, step) == 1.0 and lr_factor(2000, 6000, step) == pytest.approx(0.1)
    assert lr_factor(4000, 6000, step) == pytest.approx(0.01)
    warm = ScheduleConfig(policy="constant", warmup_iters=10, warmup_factor=0.1)
    assert lr_factor(0, 100, warm) == pytest.approx(0.1) and lr_factor(10, 100, warm) == 1.0
    cosine = ScheduleConfig(policy="cosine")
    assert lr_factor(100, 100, cosine) == pytest.approx(0.0)


def test_parameter_groups_follow_the_caffe_recipes():
    from densepred import create_model

    model = create_model("deeplab_v1_largefov", num_classes=21)
    exp = load_experiment(resolve_config("deeplab_v1_largefov_voc"))
    groups = param_groups(model, exp.optim)
    by_param = {id(p): g for g in groups for p in g["params"]}
    fc8 = model.head.fc8
    assert by_param[id(fc8.weight)]["lr"] == pytest.approx(1e-2)  # classifier x10
    assert by_param[id(fc8.bias)]["lr"] == pytest.approx(2e-2)  # and biases x2
    conv = model.backbone.conv1_1
    assert by_param[id(conv.weight)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(conv.weight)]["weight_decay"] == pytest.approx(5e-4)
    assert by_param[id(conv.bias)]["weight_decay"] == 0.0
    fcn = create_model("fcn32s")
    fcn_params = {id(p) for g in param_groups(fcn, exp.optim) for p in g["params"]}
    assert id(fcn.upscore.weight) not in fcn_params  # the fixed bilinear deconvolution is not trained


def _smoke_overrides(name: str) -> list[str]:
    """Shrink a shipped recipe to a few iterations on synthetic data, keeping its model and loss."""
    exp = load_experiment(resolve_config(name))
    crop = {"unet": 188}.get(exp.model.name, 65)
    extra = [
        "data.dataset=synthetic",
        "data.root=null",
        "data.val_dataset=null",
        "data.val_root=null",
        "data.train_split=train",
        "data.val_split=val",
        "data.options={num_images: 4, size: 64}",
        f"data.crop={crop}",
        "data.batch_size=2",
        "data.workers=0",
        "model.pretrained=null",
        "train.iterations=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "eval.max_images=1",
        "train.class_weights=null",
    ]
    if exp.data.augment == "none":
        extra.append("data.augment=deeplab")  # synthetic images vary in nothing, but keep crops small
    if exp.model.options.get("depth") == 101 and exp.model.name != "unet_padded":
        extra.append("model.options.depth=50")  # the same recipe on the 50-layer twin: half the cost
    if exp.model.options.get("frozen_bn"):
        # Frozen statistics are for fine-tuning ImageNet weights; from random init they blow up.
        extra.append("model.options.frozen_bn=false")
    return extra


def _recipes() -> list:
    """Every shipped recipe; those of nets over 40M parameters (the VGG16 FCNs, the ResNet-101
    DeepLabs and PSPNet) in the slow tier: seconds per step each, on a CPU."""
    from densepred.footprint import meta_model

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

    def params(name: str) -> int:
        exp = load_experiment(resolve_config(name))
        return sum(p.numel() for p in meta_model(exp, 21, 3).parameters())

    heavy = {n for n in names if params(n) > 40_000_000}
    return [pytest.param(n, marks=[pytest.mark.slow] if n in heavy else []) for n in names]


@pytest.mark.parametrize("name", _recipes())
def test_each_shipped_recipe_builds_and_runs(name, tmp_path):
    exp = load_experiment(resolve_config(name), _smoke_overrides(name))
    result = train(exp, tmp_path, progress=False)
    assert result.iterations == 2 and 0.0 <= result.metrics["pixel_acc"] <= 1.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo) x batch 2 takes the step 1 process x batch 4 takes.

    What the math guarantees is compared: one plain SGD step (no momentum, so the update is
    -lr x gradient), both sides on one thread. The two gradients are the same sums taken in
    another order (per rank, then all-reduced), so they agree to float32 summation error: at
    most N u of each tensor's largest update, N = 4 x 32 x 32 terms, u = 2^-24.
    """
    args = [
        *TINY,
        "train.iterations=1",
        "train.checkpoint_every=1",
        "data.options={num_images: 8, size: 32}",
        "optim.name=sgd",
        "optim.momentum=0",
        "optim.lr=0.5",
    ]
    train(load_experiment(None, [*args, "data.batch_size=4", "optim.lr=1e-30"]), tmp_path / "init", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_experiment(None, [*args, "data.batch_size=4"]), tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)

    recipe = _write_recipe(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "densepred",
        "train",
        "--config",
        str(recipe),
        "--run-dir",
        str(tmp_path / "ddp"),
        "--no-progress",
        *args,
        "data.batch_size=2",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    init = _final_weights(tmp_path / "init")  # lr 1e-30: the initial weights, to float32 precision
    one, two = _final_weights(tmp_path / "single"), _final_weights(tmp_path / "ddp")
    summation_error = 4 * 32 * 32 * 2.0**-24
    for key in one:
        step_one, step_two = one[key] - init[key], two[key] - init[key]
        largest = float(step_one.abs().max())
        if key.endswith(".weight"):
            assert largest > 0, f"{key} did not move: the comparison would be empty"
        assert float((step_one - step_two).abs().max()) <= summation_error * largest + 1e-30, key
    # Validation is split across the ranks and reduced: the DDP metrics are those of all 4 images.
    m2 = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    trained = load_trained(sorted((tmp_path / "ddp" / "checkpoints").glob("iter_*.pt"))[-1])
    from densepred.build import build_dataset
    from densepred.evaluation import evaluate

    val = build_dataset(trained.experiment, "val", train=False)
    alone = evaluate(trained.model, val, trained.experiment.eval, progress=False)
    assert m2["pixel_acc"] == pytest.approx(alone["pixel_acc"], abs=4 / (4 * 32 * 32))  # a few near-tied pixels


def test_training_options_run_together(tmp_path):
    """Accumulation, clipping, bf16 autocast, channels-last and frozen BN in one short run."""
    exp = _tiny(
        "train.iterations=3",
        "train.iter_size=2",
        "train.clip_grad_norm=1.0",
        "train.amp=bf16",
        "model.channels_last=true",
        "model.freeze_bn=true",
        "model.options={base_channels: 4, depth: 2, batch_norm: true}",
        "schedule.policy=cosine",
        "schedule.warmup_iters=2",
    )
    result = train(exp, tmp_path, progress=False)
    assert result.iterations == 3
    trained = load_trained(result.checkpoint)
    from densepred.models.layers import FrozenBatchNorm2d

    assert any(isinstance(m, FrozenBatchNorm2d) for m in trained.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.model.modules())


def test_eval_and_export_commands_write_their_files(tmp_path, capsys):
    from densepred.cli import main

    result = train(_tiny("train.iterations=2"), tmp_path / "run", progress=False)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(result.checkpoint), "--out", str(out), "eval.max_images=3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pixel_acc", "mean_acc", "miou", "fwiou", "iou", "dice"} <= set(metrics)
    assert (out / "confusion.png").stat().st_size > 0 and (out / "per_class_iou.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "background" in table and "mean IoU" in table
    weights = tmp_path / "w.safetensors"
    assert (
        main(["export", "--checkpoint", str(result.checkpoint), "--format", "safetensors", "--out", str(weights)]) == 0
    )
    from safetensors.torch import load_file

    assert set(load_file(str(weights))) == set(load_checkpoint(result.checkpoint)["model"])


def test_eval_refuses_a_checkpoint_of_another_class_count(tmp_path, capsys):
    from densepred.cli import main

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from fakedata import make_camvid  # the data tests' on-disk dataset builders

    camvid = make_camvid(tmp_path / "camvid")
    result = train(_tiny("train.iterations=1"), tmp_path / "run", progress=False)
    args = [
        "eval",
        "--checkpoint",
        str(result.checkpoint),
        "data.dataset=camvid",
        f"data.root={camvid}",
        "data.options={}",
    ]
    code = main(args)
    assert code == 2
    assert "predicts 6 classes but the dataset has 11" in capsys.readouterr().err
