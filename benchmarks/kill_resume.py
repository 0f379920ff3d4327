"""Kill -9 a tiny deterministic training run at random moments, resume it, compare with a clean run.

    python benchmarks/kill_resume.py --trials 24 --out kill_resume.json

Each trial starts ``densepred train`` (a tiny U-Net with batch norm and dropout, DeepLab
augmentation on the synthetic data, a checkpoint every few iterations, deterministic mode),
SIGKILLs it, and resumes it with ``--resume``; with ``--kills-per-trial 2`` the resumed run is
killed once more before the last resume. Kills are of two kinds, drawn per kill:

* ``random``: at a uniformly random iteration of what is left to train, a random fraction of an
  iteration after the one before it was logged;
* ``write``: during a checkpoint write. The child's ``torch.save`` is slowed down (it writes a
  random fraction of the file, then sleeps), the parent polls for save_atomic's temporary file
  and kills while it is open, leaving a torn temporary file, as a crash at that moment would.

After every kill every checkpoint in the folder (``iter_*.pt``, ``best.pt``) must load; at the
end the final weights and optimizer state must equal the uninterrupted run's bit for bit, and
no temporary file may be left. Prints the counts and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from densepred.checkpoint import CheckpointError, load_checkpoint

ITERATIONS, EVERY = 100, 5
RECIPE = [
    "model.name=unet_padded",
    "model.options={base_channels: 4, depth: 2, batch_norm: true, dropout: 0.3}",
    "data.dataset=synthetic",
    "data.options={num_images: 16, size: 32}",
    "data.augment=deeplab",
    "data.crop=32",
    "data.scale=[0.75, 1.25]",
    "data.normalization=unit",
    "data.batch_size=2",
    "data.workers=0",
    "optim.name=adam",
    "optim.lr=0.01",
    "optim.bias_lr_mult=1",
    "schedule.policy=constant",
    "train.log_every=1",
    f"train.iterations={ITERATIONS}",
    f"train.checkpoint_every={EVERY}",
    "train.keep_last=2",
    "train.deterministic=true",
    "eval.max_images=4",
]

# Runs in the child: optionally slows every checkpoint write down (for ``write`` kills), marks the
# start of the training loop (for ``random`` kills), then runs the real command line.
CHILD = r"""
import io, os, sys, time
import torch
import densepred.trainer as train_module

slow, cut = float(os.environ.get("KR_SLOW_WRITE", "0")), float(os.environ.get("KR_CUT", "0.5"))
if slow:
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: int(len(data) * cut)])
        f.flush()
        time.sleep(slow)
        f.write(data[int(len(data) * cut) :])

    torch.save = slow_save

real_loader, marker = train_module._make_loader, os.environ["KR_MARKER"]


def marked_loader(*args, **kwargs):
    open(marker, "w").close()
    return real_loader(*args, **kwargs)


train_module._make_loader = marked_loader
from densepred.cli import main

sys.exit(main(sys.argv[1:]))
"""


def start(run: Path, *, resume: bool, slow: float = 0.0, cut: float = 0.5, workers: int = 0) -> subprocess.Popen:
    """``densepred train`` of the tiny recipe into ``run`` in a child process."""
    run.mkdir(parents=True, exist_ok=True)
    recipe = run.parent / "tiny.yaml"
    recipe.write_text("name: kill_resume\n")
    marker = run / ".loop_started"
    marker.unlink(missing_ok=True)
    # One thread: on a busy machine, OpenMP threads that wait on each other slow training 10-50x.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KR_SLOW_WRITE": str(slow), "KR_CUT": str(cut)}
    env["KR_MARKER"] = str(marker)
    cmd = [sys.executable, "-c", CHILD, "train", "--config", str(recipe), "--run-dir", str(run), "--no-progress"]
    cmd += ["--resume"] * resume + RECIPE + [f"data.workers={workers}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def temporaries(run: Path) -> list[Path]:
    folder = run / "checkpoints"
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def check_folder(run: Path) -> tuple[list[str], list[str]]:
    """(checkpoint files, those that do not load): every one of them must load."""
    folder = run / "checkpoints"
    files = sorted([*folder.glob("iter_*.pt"), *folder.glob("best.pt")]) if folder.is_dir() else []
    corrupt = []
    for f in files:
        try:
            load_checkpoint(f)
        except CheckpointError as exc:
            corrupt.append(f"{f.name}: {exc}")
    return [f.name for f in files], corrupt


def final_state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / f"iter_{ITERATIONS:07d}.pt")


def same_state(a: dict, b: dict) -> bool:
    """Model weights and optimizer state bit-identical."""

    def equal(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple):
            return isinstance(y, list | tuple) and len(x) == len(y) and all(map(equal, x, y))
        return x == y

    return equal(a["model"], b["model"]) and equal(a["optimizer"], b["optimizer"])


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, poll: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


@dataclass
class Kill:
    mode: str  # "random" or "write"
    happened: bool = False  # False: the run finished (or never reached the target) before the kill
    during_write: bool = False  # a torn temporary checkpoint file was left behind
    iteration: int = 0  # the iteration (or checkpoint) the kill was aimed at
    delay_s: float = 0.0
    checkpoints_after: list[str] = field(default_factory=list)
    corrupt_after: list[str] = field(default_factory=list)


def _resume_point(run: Path) -> int:
    """The iteration a resumed run starts from: its newest checkpoint's (0 without one)."""
    folder = run / "checkpoints"
    done = [int(p.name[5:12]) for p in folder.glob("iter_*.pt")] if folder.is_dir() else []
    return max(done, default=0)


def _logged(log: Path, offset: int) -> int:
    """The last training iteration written to ``log`` after byte ``offset`` (what this process did)."""
    if not log.exists():
        return 0
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    last = 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "loss" in record:
            last = record["iter"]
    return last


def kill_once(
    run: Path, rng: random.Random, mode: str, loop_seconds: float, *, resume: bool, slow: float, workers: int = 0
) -> Kill:
    """Start the run (resuming when ``resume``), SIGKILL it as ``mode`` says, check the folder.

    ``random``: at a uniformly random iteration of what is left, a random fraction of an iteration
    after the one before it was logged (so the machine's speed does not decide where kills land).
    ``write``: during the write of a random checkpoint that is still to come.
    """
    kill = Kill(mode)
    stale = set(temporaries(run))  # torn files of an earlier kill: the resumed run deletes them
    begin = _resume_point(run) if resume else 0
    writes = range(begin // EVERY + 1, ITERATIONS // EVERY)  # not the last: the run ends right after it
    if mode == "write" and len(writes):
        target = EVERY * rng.choice(writes)
        proc = start(run, resume=resume, slow=slow, cut=rng.random(), workers=workers)
        name = f".iter_{target:07d}.pt."
        reached = _wait_for(
            lambda: any(p.name.startswith(name) or _later(p, target) for p in set(temporaries(run)) - stale), proc, 300
        )
        if reached:
            kill.delay_s = rng.uniform(0, slow * 0.9)
            time.sleep(kill.delay_s)
    else:
        kill.mode = "random"
        target = rng.randint(begin + 1, ITERATIONS)  # killed while doing this iteration (or its checkpoint)
        log = run / "log.jsonl"
        offset = log.stat().st_size if resume and log.exists() else 0
        proc = start(run, resume=resume, workers=workers)
        reached = _wait_for(lambda: _logged(log, offset) >= target - 1, proc, 300, poll=0.005)
        if reached:
            kill.delay_s = rng.uniform(0, loop_seconds / ITERATIONS)
            time.sleep(kill.delay_s)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        kill.happened = True
    code = proc.wait()
    if not kill.happened and code != 0:
        raise RuntimeError(f"training failed (exit {code}): {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    kill.iteration = target
    kill.during_write = kill.happened and bool(set(temporaries(run)) - stale)
    kill.checkpoints_after, kill.corrupt_after = check_folder(run)
    return kill


def _later(tmp: Path, target: int) -> bool:
    digits = tmp.name.removeprefix(".iter_")[:7]
    return digits.isdigit() and int(digits) > target


def finish(run: Path, workers: int = 0) -> tuple[int, str]:
    """Resume ``run`` to the end without interruption; (exit code, stderr tail)."""
    proc = start(run, resume=True, workers=workers)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err.decode()[-2000:]


@dataclass
class Trial:
    index: int
    kills: list[Kill]
    resumed_ok: bool
    identical: bool
    corrupt_at_end: list[str]
    temporaries_left: list[str]
    error: str = ""


def clean_reference(work: Path, workers: int = 0) -> tuple[dict, float]:
    """The uninterrupted run: its final state, and how long its training loop took (s)."""
    run = work / "clean"
    proc = start(run, resume=False, workers=workers)
    if not _wait_for(lambda: (run / ".loop_started").exists(), proc, 300, poll=0.01):
        raise RuntimeError(f"the clean run failed: {proc.stderr.read().decode()[-2000:]}")
    began = time.monotonic()
    last = run / "checkpoints" / f"iter_{ITERATIONS:07d}.pt"
    _wait_for(last.exists, proc, 600, poll=0.01)
    loop_seconds = time.monotonic() - began
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the clean run failed: {err.decode()[-2000:]}")
    return final_state(run), loop_seconds


def run_trials(
    trials: int,
    work: Path,
    *,
    kills_per_trial: int = 1,
    write_fraction: float = 0.35,
    modes: list[str] | None = None,
    slow: float = 0.4,
    seed: int = 0,
    workers: int = 0,
    log=print,
) -> dict:
    """Run the trials in ``work``; ``modes`` fixes the first kill's mode of each trial (else drawn)."""
    rng = random.Random(seed)
    reference, loop_seconds = clean_reference(work, workers)
    log(f"clean run: training loop {loop_seconds:.1f} s")
    results: list[Trial] = []
    for k in range(trials):
        run = work / f"trial_{k:03d}"
        kills = []
        for j in range(kills_per_trial):
            if modes is not None and j == 0:
                mode = modes[k % len(modes)]
            else:
                mode = "write" if rng.random() < write_fraction else "random"
            kills.append(kill_once(run, rng, mode, loop_seconds, resume=j > 0, slow=slow, workers=workers))
        code, err = finish(run, workers)
        names, corrupt = check_folder(run)
        identical = code == 0 and same_state(final_state(run), reference)
        trial = Trial(k, kills, code == 0, identical, corrupt, [p.name for p in temporaries(run)], err if code else "")
        results.append(trial)
        log(
            f"trial {k:3d}: "
            + ", ".join(
                f"{x.mode} at it {x.iteration}{'' if x.happened else ' (finished first)'}"
                f"{' [torn write]' if x.during_write else ''} -> {len(x.checkpoints_after)} ckpt, "
                f"{len(x.corrupt_after)} corrupt"
                for x in kills
            )
            + f"; resume {'ok' if code == 0 else 'FAILED'}, identical={identical}"
        )
    every = [x for t in results for x in t.kills]
    summary = {
        "trials": trials,
        "kills": sum(x.happened for x in every),
        "kills_targeted_at_write": sum(x.happened and x.mode == "write" for x in every),
        "kills_during_write": sum(x.during_write for x in every),
        "runs_finished_before_kill": sum(not x.happened for x in every),
        "checkpoint_loads_after_kills": sum(len(x.checkpoints_after) for x in every),
        "corrupt_checkpoints": sum(len(x.corrupt_after) for x in every) + sum(len(t.corrupt_at_end) for t in results),
        "resumes_ok": sum(t.resumed_ok for t in results),
        "identical_to_uninterrupted": sum(t.identical for t in results),
        "temporaries_left_at_end": sum(len(t.temporaries_left) for t in results),
        "clean_loop_seconds": loop_seconds,
    }
    return {"summary": summary, "trials": [asdict(t) for t in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--kills-per-trial", type=int, default=1)
    parser.add_argument("--write-fraction", type=float, default=0.35, help="share of kills aimed at a write")
    parser.add_argument("--slow-write", type=float, default=0.4, help="seconds a slowed checkpoint write takes")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the training runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        work = args.work_dir or Path(tmp)
        started = time.monotonic()
        result = run_trials(
            args.trials,
            work,
            kills_per_trial=args.kills_per_trial,
            write_fraction=args.write_fraction,
            slow=args.slow_write,
            seed=args.seed,
            workers=args.workers,
        )
    result["summary"]["wall_seconds"] = time.monotonic() - started
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    ok = s["corrupt_checkpoints"] == 0 and s["identical_to_uninterrupted"] == s["resumes_ok"] == args.trials
    sys.exit(0 if ok and s["temporaries_left_at_end"] == 0 else 1)


if __name__ == "__main__":
    main()
