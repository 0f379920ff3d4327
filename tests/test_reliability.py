"""Faults during training: kill -9, a full disk or unwritable folder, dying loader workers,
files that vanish mid-epoch, NaN/inf in the loss or the gradients. Each test injects the fault
for real (a SIGKILL, an OSError from the write, a deleted file, a NaN gradient) and checks what
the user is left with: whole checkpoints, an error that says what happened and where, and a run
that resumes to the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import math
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

import densepred.data.files as files
import densepred.trainer as train_module
from densepred.atomic import WriteError
from densepred.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from densepred.config import load_experiment
from densepred.data.errors import DataError
from densepred.precision import torch_threads
from densepred.sampling import SeededSamples
from densepred.trainer import DataLoaderWorkerError, NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))
from fakedata import make_camvid  # noqa: E402  (the data tests' on-disk dataset builders)


def _import_kill_resume():
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "benchmarks" / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kr = _import_kill_resume()

# The kill/resume script's recipe (augmentation, dropout, deterministic mode), shorter.
TINY = [*kr.RECIPE, "data.options={num_images: 8, size: 32}", "train.iterations=6", "train.checkpoint_every=2"]
TINY += [
    "train.keep_last=10",
    "eval.max_images=2",
    "model.options={base_channels: 4, depth: 2, batch_norm: false, dropout: 0.3}",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the subprocesses use one too (bit-identical comparisons), and on a busy
    machine OpenMP threads that wait on each other make these tiny runs 10x slower."""
    with torch_threads(1):
        yield


def _tiny(*extra: str):
    return load_experiment(None, [*TINY, *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _iter_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# kill -9


def test_kill_minus_9_during_a_write_and_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """The fast version of benchmarks/kill_resume.py: three SIGKILLs of a real `densepred train`."""
    clean = train(load_experiment(None, kr.RECIPE), tmp_path / "clean", progress=False)
    log = [json.loads(line) for line in (tmp_path / "clean" / "log.jsonl").read_text().splitlines()]
    loop_seconds = max(r["time"] for r in log if "loss" in r)
    rng = random.Random(3)
    for k, mode in enumerate(["write", "random", "random"]):
        run = tmp_path / f"trial_{k}"
        kill = kr.kill_once(run, rng, mode, loop_seconds, resume=False, slow=0.25)
        assert kill.corrupt_after == [], kill  # every checkpoint in the folder loads right after the kill
        if mode == "write":
            assert kill.happened and kill.during_write, kill  # killed with a torn temporary file on disk
        result = train(load_experiment(None, kr.RECIPE), run, resume=True, progress=False)
        assert result.iterations == kr.ITERATIONS
        assert kr.check_folder(run)[1] == [] and kr.temporaries(run) == []  # the torn file was removed
        assert kr.same_state(kr.final_state(run), load_checkpoint(clean.checkpoint)), f"trial {k} ({mode})"


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"model": {}}, 4)
    for name in (".iter_0000008.pt.k2j1_x.tmp", ".best.pt.abc.tmp", "notes.tmp", ".iter_0000008.pt"):
        (tmp_path / name).write_bytes(b"torn")
    removed = manager.remove_stale_temporaries()
    assert sorted(p.name for p in removed) == [".best.pt.abc.tmp", ".iter_0000008.pt.k2j1_x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".iter_0000008.pt", "iter_0000004.pt", "notes.tmp"]


# ---------------------------------------------------------------------------------------------
# Full disk, unwritable folder


def _fail_second_write(monkeypatch, error: OSError, *, half_written: bool) -> None:
    """The second checkpoint write fails with ``error``: after writing half the file, or at creation."""
    calls = []
    if half_written:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) != 2:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise error

        monkeypatch.setattr(torch, "save", save)
    else:
        import densepred.atomic as atomic_module

        real_mkstemp = atomic_module.tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            if kwargs.get("prefix", "").startswith(".iter_"):  # checkpoints, not the run's config
                calls.append(1)
                if len(calls) == 2:
                    raise error
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(atomic_module.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (
            "disk full midway",
            r"writing checkpoint \S+iter_0000004.pt failed \(No space left on device\); any previous checkpoint",
        ),
        ("unwritable folder", r"cannot write checkpoint \S+iter_0000004.pt: Permission denied"),
    ],
)
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_and_the_run_resumes(
    tmp_path, monkeypatch, fault, message
):
    if fault == "disk full midway":
        error, half = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), True
    else:  # what a read-only folder raises; simulated because tests may run as root, where chmod stops nothing
        error, half = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "checkpoints"), False
    exp, run = _tiny(), tmp_path / "run"
    _fail_second_write(monkeypatch, error, half_written=half)
    with pytest.raises(CheckpointError, match=message):
        train(exp, run, progress=False)
    assert _iter_files(run) == ["iter_0000002.pt"]  # no torn temporary file, the previous checkpoint whole
    assert load_checkpoint(run / "checkpoints" / "iter_0000002.pt")["iteration"] == 2

    monkeypatch.undo()  # space freed / permissions fixed
    result = train(exp, run, resume=True, progress=False)
    assert result.iterations == 6
    train(exp, tmp_path / "clean", progress=False)
    _assert_same_weights(
        run / "checkpoints" / "iter_0000006.pt", tmp_path / "clean" / "checkpoints" / "iter_0000006.pt"
    )


def test_a_full_disk_while_logging_names_the_log_and_the_run_resumes(tmp_path, monkeypatch):
    """log.jsonl is appended, not replaced: a failed append names the file and loses no checkpoint."""
    exp, run = _tiny(), tmp_path / "run"
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if self.name == "log.jsonl" and "a" in mode and (run / "checkpoints" / "iter_0000004.pt").exists():
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(WriteError, match=r"appending to the training log \S+log.jsonl failed \(No space left"):
        train(exp, run, progress=False)
    assert _iter_files(run)[-1] == "iter_0000004.pt"
    monkeypatch.undo()
    assert train(exp, run, resume=True, progress=False).iterations == 6
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records and all("iter" in r for r in records)  # every line whole


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_checkpoint_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = CheckpointManager.save

    def save_then_lock(self, state, iteration, **kwargs):
        path = real_save(self, state, iteration, **kwargs)
        self.folder.chmod(0o555)  # read-only from the first checkpoint on
        return path

    monkeypatch.setattr(CheckpointManager, "save", save_then_lock)
    try:
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint \S+iter_0000004.pt: Permission denied"):
            train(_tiny(), run, progress=False)
    finally:
        (run / "checkpoints").chmod(0o755)
    assert _iter_files(run) == ["iter_0000002.pt"]


# ---------------------------------------------------------------------------------------------
# Data: a file vanishes mid-epoch, a loader worker dies


def test_a_file_that_vanishes_mid_epoch_is_named_and_the_run_resumes(tmp_path, monkeypatch):
    root = make_camvid(tmp_path / "camvid", n=4)
    exp = _tiny("data.dataset=camvid", f"data.root={root}", "data.options={}", "data.crop=24")
    run = tmp_path / "run"

    real_read_image = files.read_image
    calls, vanished = [], {}

    def read_image(path, *a, **kw):
        calls.append(path)
        if len(calls) == 7:  # iteration 4 (batches of 2): the file is deleted just before it is read
            vanished[path] = Path(path).read_bytes()
            Path(path).unlink()
        return real_read_image(path, *a, **kw)

    monkeypatch.setattr(files, "read_image", read_image)
    with pytest.raises(DataError) as err:
        train(exp, run, progress=False)
    ((path, data),) = vanished.items()
    assert str(err.value).startswith(f"{path}: file not found (training stopped at iteration 4; last good checkpoint:")
    assert "iter_0000002.pt; once the data is fixed, rerun with --resume to continue)" in str(err.value)

    Path(path).write_bytes(data)  # restored
    assert train(exp, run, resume=True, progress=False).iterations == 6
    train(exp, tmp_path / "clean", progress=False)
    _assert_same_weights(
        run / "checkpoints" / "iter_0000006.pt", tmp_path / "clean" / "checkpoints" / "iter_0000006.pt"
    )


def test_a_killed_loader_worker_is_explained_and_the_run_resumes(tmp_path, monkeypatch):
    exp, run = _tiny("data.workers=1", "train.iterations=8"), tmp_path / "run"
    armed = tmp_path / "armed"
    armed.touch()
    real_getitem = SeededSamples.__getitem__
    fetched = []  # each worker process has its own copy (fork)

    def getitem(self, item):
        if torch.utils.data.get_worker_info() is not None:
            fetched.append(item)
            if len(fetched) == 9 and armed.exists():  # the 5th batch: after the checkpoint at iteration 2
                armed.unlink()
                os.kill(os.getpid(), signal.SIGKILL)
        return real_getitem(self, item)

    monkeypatch.setattr(SeededSamples, "__getitem__", getitem)
    with pytest.raises(DataLoaderWorkerError) as err:
        train(exp, run, progress=False)
    message = str(err.value)
    assert "data loader worker died during iteration" in message
    assert "DataLoader worker (pid" in message or "exit code -9" in message  # SIGCHLD handler, or a broken pipe
    assert "last good checkpoint: " in message and "Rerun with --resume" in message and "data.workers" in message
    assert not armed.exists()

    assert train(exp, run, resume=True, progress=False).iterations == 8
    train(_tiny("data.workers=0", "train.iterations=8"), tmp_path / "clean", progress=False)  # workers change nothing
    _assert_same_weights(
        run / "checkpoints" / "iter_0000008.pt", tmp_path / "clean" / "checkpoints" / "iter_0000008.pt"
    )


# ---------------------------------------------------------------------------------------------
# NaN / inf


def _poison(monkeypatch, where: str, at: int, value: float) -> None:
    """Make the loss (through the model's output) or only the gradients non-finite at training step ``at``."""
    real_build = train_module.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        steps = []
        if where == "gradient":  # the loss stays finite: only a gradient check can see this

            def hook(grad):
                steps.append(1)
                return torch.full_like(grad, value) if len(steps) == at else grad

            next(model.parameters()).register_hook(hook)
        else:

            def forward_hook(module, inputs, output):
                if module.training:
                    steps.append(1)
                    if len(steps) == at:
                        return output + value
                return output

            model.register_forward_hook(forward_hook)
        return model

    monkeypatch.setattr(train_module, "build_model", build)


POISONS = [("loss", math.nan), ("gradient", math.inf), ("gradient", math.nan)]


@pytest.mark.parametrize(("where", "value"), POISONS)
def test_non_finite_values_stop_with_the_step_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, where, value):
    _poison(monkeypatch, where, at=4, value=value)
    with pytest.raises(NonFiniteLossError) as err:
        train(_tiny("data.augment=none", "data.crop=null"), tmp_path, progress=False)
    message = str(err.value)
    assert message.startswith(f"non-finite {where} (") and " at iteration 4; stopped." in message
    assert message.split("Last good checkpoint: ")[1].startswith(str(tmp_path / "checkpoints" / "iter_0000002.pt"))
    assert _iter_files(tmp_path) == ["iter_0000002.pt"]  # the poisoned step 4 was never checkpointed
    state = _weights(tmp_path / "checkpoints" / "iter_0000002.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize(("where", "value"), POISONS)
def test_non_finite_steps_are_skipped_when_allowed(tmp_path, monkeypatch, where, value):
    _poison(monkeypatch, where, at=2, value=value)
    exp = _tiny(
        "data.augment=none",
        "data.crop=null",
        "train.iterations=3",
        "train.checkpoint_every=1",
        "train.skip_nonfinite=true",
    )
    train(exp, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if "skipped" in r] == [2]
    assert next(r for r in log if "skipped" in r)["skipped"].startswith(f"non-finite {where} (")
    ckpt = tmp_path / "checkpoints"
    _assert_same_weights(ckpt / "iter_0000001.pt", ckpt / "iter_0000002.pt")  # the skipped step changed nothing
    three = _weights(ckpt / "iter_0000003.pt")
    assert all(torch.isfinite(v).all() for v in three.values())
    assert any(not torch.equal(three[k], v) for k, v in _weights(ckpt / "iter_0000002.pt").items())  # step 3 ran


def test_resume_where_no_checkpoint_loads_stops_and_changes_nothing(tmp_path):
    """Before: a warning per file, then training from zero, the damaged files pruned, the log replaced."""
    run = tmp_path / "run"
    exp = _tiny("train.iterations=4", "train.checkpoint_every=2", "train.keep_last=5")
    train(exp, run, progress=False)
    files = sorted((run / "checkpoints").glob("iter_*.pt"))
    for f in files:
        f.write_bytes(b"not a checkpoint")
    log = (run / "log.jsonl").read_text()
    with pytest.raises(
        CheckpointError, match=r"(?s)cannot resume: no checkpoint in \S+ loads \(iter_0000004.pt: .*iter_0000002.pt"
    ):
        train(exp, run, resume=True, progress=False)
    assert sorted((run / "checkpoints").glob("iter_*.pt")) == files  # nothing deleted
    assert all(f.read_bytes() == b"not a checkpoint" for f in files)
    assert (run / "log.jsonl").read_text() == log


def test_after_a_resume_the_log_holds_each_iteration_once(tmp_path, monkeypatch):
    import densepred.trainer as trainer

    run = tmp_path / "run"
    exp = _tiny("train.iterations=10", "train.checkpoint_every=5", "train.log_every=1")
    real = trainer.lr_factor

    def crash_at_8(it, total, s):
        if it == 8:
            raise KeyboardInterrupt  # iterations 6-8 were logged after the checkpoint of iteration 5
        return real(it, total, s)

    monkeypatch.setattr(trainer, "lr_factor", crash_at_8)
    with pytest.raises(KeyboardInterrupt):
        train(exp, run, progress=False)
    with (run / "log.jsonl").open("a") as f:
        f.write('{"iter": 8, "loss": 0.')  # the torn line a kill -9 leaves
    monkeypatch.setattr(trainer, "lr_factor", real)
    train(exp, run, resume=True, progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, 11))
