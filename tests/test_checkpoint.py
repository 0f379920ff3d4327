"""Checkpoints: atomic writes, safe loading, rotation, RNG round trip, safetensors export."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from densepred.checkpoint import (
    CheckpointError,
    CheckpointManager,
    export_safetensors,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)


def test_save_and_load_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "iteration": 3, "config": {"a": [1, 2]}}
    path = save_atomic(state, tmp_path / "c.pt")
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 3 and loaded["config"] == {"a": [1, 2]}
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_execute_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="refused to load .*evil.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_atomic({"model": {"w": torch.randn(1000)}}, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_atomic({"v": torch.tensor(1)}, tmp_path / "c.pt")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        save_atomic({"v": torch.tensor(2)}, path)
    assert load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_atomic({}, blocker / "sub" / "c.pt")


def test_manager_keeps_the_last_k_and_skips_damaged_ones(tmp_path, capsys):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for it in (10, 20, 30):
        manager.save({"model": {}}, it, best=it == 20)
    assert [p.name for p in manager.iteration_files()] == ["iter_0000020.pt", "iter_0000030.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == 20
    (tmp_path / "iter_0000030.pt").write_bytes(b"garbage")
    path, state = manager.latest()
    assert path.name == "iter_0000020.pt" and state["iteration"] == 20
    assert "skipping" in capsys.readouterr().out


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    save_atomic({"rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_export_safetensors(tmp_path):
    from safetensors.torch import load_file

    save_atomic({"model": {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3)}}, tmp_path / "c.pt")
    out = export_safetensors(tmp_path / "c.pt", tmp_path / "w.safetensors")
    loaded = load_file(str(out))
    assert set(loaded) == {"a.weight", "a.bias"} and loaded["a.weight"].shape == (3, 2)
