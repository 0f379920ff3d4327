"""Every command validates a model and a checkpoint the same way: sizes checked on the meta device
before anything is allocated, damage reported as "corrupt", "unsafe" or "mismatched" with exit 2."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from densepred.checkpoint import load_training_checkpoint, save_atomic
from densepred.cli import main
from densepred.config import ConfigError, load_experiment
from densepred.footprint import ModelTooLarge, check_model_size, peak_bytes
from tiny import TINY, tiny_checkpoint

pytest.importorskip("fastapi", reason="serve needs the serve extra")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("honest"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return path


def _argv(command: str, ckpt: Path, image: Path, out: Path) -> list[str]:
    return {
        "eval": ["eval", "--checkpoint", str(ckpt)],
        "predict": ["predict", "--checkpoint", str(ckpt), str(image), "--out", str(out)],
        "heatmap": ["heatmap", "--checkpoint", str(ckpt), "--class", "0", str(image), "--out", str(out / "h.png")],
        "features": ["features", "--checkpoint", str(ckpt), str(image), "--out", str(out / "f.png")],
        "export": ["export", "--checkpoint", str(ckpt), "--out", str(out / "m.onnx")],
        "serve": ["serve", "--checkpoint", str(ckpt), "--port", "0"],
    }[command]


COMMANDS = ["eval", "predict", "heatmap", "features", "export", "serve"]


def _safetensors(path: Path, header: bytes, declared: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", declared if declared is not None else len(header)) + header + b"\0" * 16)
    return path


def _damaged_safetensors(folder: Path) -> dict[str, Path]:
    huge = json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 16]}}).encode()
    return {
        "bad JSON header": _safetensors(folder / "json.safetensors", b"{bad json"),
        "header length 2**62": _safetensors(folder / "len.safetensors", b"{}", declared=2**62),
        "huge shape": _safetensors(folder / "shape.safetensors", huge),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_a_damaged_safetensors_checkpoint_is_reported_as_corrupt_by_every_command(
    command, image, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("serve started on a corrupt checkpoint"))
    for what, path in _damaged_safetensors(tmp_path).items():
        assert main(_argv(command, path, image, tmp_path / "out")) == 2, what
        err = capsys.readouterr().err
        assert f"{path} is a corrupt safetensors file" in err, (what, err)
        assert "Traceback" not in err


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about the pickle protocols it sees
def test_random_bytes_are_corrupt_not_unsafe(tmp_path):
    import numpy as np

    from densepred.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "random.pt"
    for seed in range(300):  # random bytes made torch.load raise IndexError or KeyError, or looked "unsafe"
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(CheckpointError, match="is corrupt") as info:
            load_checkpoint(path)
        assert "execute code" not in str(info.value), seed


def _edited_checkpoint(source: Path, folder: Path, **options) -> Path:
    state = load_training_checkpoint(source)
    state["config"]["model"]["options"] = {**state["config"]["model"]["options"], **options}
    return save_atomic(state, folder / "edited.pt")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_whose_config_asks_for_an_impossible_model_is_refused_at_once(
    command, checkpoint, image, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("serve started"))
    edited = _edited_checkpoint(checkpoint, tmp_path, depth=30)
    assert main(_argv(command, edited, image, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot exist: its layer sizes overflow" in err and "model.options" in err, err


def test_a_model_too_large_to_build_is_refused_with_its_size_and_the_option(tmp_path, capsys):
    overrides = [*TINY, "model.options={base_channels: 16, depth: 99, batch_norm: true}"]
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--no-progress", *overrides]) == 2
    assert "cannot exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()
    # Within int64 but far beyond the machine: counted on meta, refused with the figure.
    exp = load_experiment(None, [*TINY, "model.options={base_channels: 64, depth: 12}"])
    with pytest.raises(
        ModelTooLarge, match=r"has 2,0[\d,]+ parameters \([\d,.]+ GiB in float32\), above model.max_parameters"
    ):
        check_model_size(exp, 2, 3)
    raised = load_experiment(
        None, [*TINY, "model.options={base_channels: 64, depth: 12}", "model.max_parameters=3000000000000"]
    )
    assert check_model_size(raised, 2, 3) is not None  # the option raises the limit


def test_resume_after_changing_the_model_is_mismatched_and_keeps_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--no-progress", *TINY, "train.checkpoint_every=1"]) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    wider = "model.options={base_channels: 8, depth: 2, batch_norm: false, dropout: 0.0}"
    assert main(["demo", "--run-dir", str(run), "--no-progress", "--resume", *TINY, "train.iterations=2", wider]) == 2
    err = capsys.readouterr().err
    assert "mismatched checkpoint" in err and "wrong shapes" in err and "config.yaml" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("lr", ["1e308", "inf", "nan", "2000"])
def test_an_overflowing_learning_rate_is_refused_before_the_run_folder_is_written(lr, tmp_path, capsys):
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--no-progress", *TINY, f"optim.lr={lr}"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_live_bytes_counts_each_storage_once_and_frees_it():
    def work():
        a = torch.empty(1000, device="meta")  # 4,000 bytes
        b = a.view(10, 100)  # a view: no new storage
        del a
        c = torch.empty(500, device="meta")  # 2,000 more while b holds the first storage
        return b, c

    assert peak_bytes(work) == 6000
    with pytest.raises(ConfigError):
        load_experiment(None, ["model.max_parameters=0"])


def test_every_file_of_a_run_folder_has_one_mode(tmp_path):
    import stat

    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--no-progress", *TINY, "train.checkpoint_every=1"]) == 0
    modes = {p.relative_to(run).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert "checkpoints/best.pt" in modes and "config.yaml" in modes and "log.jsonl" in modes
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_training_step_beyond_the_machines_memory_is_refused_before_the_model_is_built(tmp_path, capsys):
    big = [*TINY, "model.options={base_channels: 64, depth: 4, batch_norm: true}", "data.batch_size=4096"]
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "--no-progress", *big]) == 2
    err = capsys.readouterr().err
    assert "one training step of unet_padded on 4096 x 64x64 needs about" in err and "data.batch_size" in err


def test_training_bytes_grow_with_the_batch():
    from densepred.footprint import meta_model, training_bytes

    model = meta_model(load_experiment(None, TINY), 2, 3)
    one, four = training_bytes(model, 1, 3, 64, 64), training_bytes(model, 4, 3, 64, 64)
    weights = 4 * 4 * sum(p.numel() for p in model.parameters())
    assert one > weights and four - weights == pytest.approx(4 * (one - weights), rel=0.05)
