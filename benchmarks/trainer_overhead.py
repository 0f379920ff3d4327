"""densepred's training loop against a bare PyTorch loop on the same model, data and batch.

    python benchmarks/trainer_overhead.py --iterations 150 --repeats 2

Both loops train the default recipe's model on the synthetic data with the same DataLoader
settings, optimiser, loss and autocast; runs alternate (bare, trainer, bare, ...) so a noisy
machine affects both alike. Prints images/s for each and the trainer's overhead in percent.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from densepred import losses
from densepred.build import build_dataset, build_model
from densepred.config import load_experiment, resolve_config
from densepred.data.loader import worker_init
from densepred.distributed import seed_everything
from densepred.precision import autocast, resolve_amp
from densepred.trainer import build_optimizer, train


def bare_loop(exp, iterations: int) -> float:
    """Images/s of the simplest loop that does the same work (no logging, no checkpoints)."""
    seed_everything(exp.train.seed)
    dataset = build_dataset(exp, exp.data.train_split, train=True, seed=exp.train.seed)
    model = build_model(exp, dataset.num_classes, dataset.in_channels).train()
    optimizer = build_optimizer(model, exp.optim)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=exp.data.batch_size,
        shuffle=True,
        num_workers=exp.data.workers,
        worker_init_fn=worker_init,
        persistent_workers=True,
        drop_last=True,
    )
    batches, done, start = iter(loader), 0, None
    while done < iterations + 10:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        if done == 10:  # skip warm-up (worker start, first allocations)
            start = time.perf_counter()
        with autocast(resolve_amp(exp.train.amp, "cpu"), "cpu"):
            out = model(batch["image"])
        loss = losses.cross_entropy(out.float(), batch["mask"]) + losses.dice_loss(out.float(), batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1
    return iterations * exp.data.batch_size / (time.perf_counter() - start)


def trainer_loop(exp, iterations: int) -> float:
    """Images/s of densepred's trainer over the same number of iterations (from its own log)."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        train(exp, tmp, progress=False)
        records = [json.loads(s) for s in open(f"{tmp}/log.jsonl") if '"loss"' in s]
    first = next(r for r in records if r["iter"] >= 10)
    last = records[-1]
    return (last["iter"] - first["iter"]) * exp.data.batch_size / (last["time"] - first["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic_unet")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    overrides = [
        f"train.iterations={args.iterations + 10}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "eval.max_images=1",
        "train.max_minutes=null",
    ]
    exp = load_experiment(resolve_config(args.config), overrides)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(exp, args.iterations))
        ours.append(trainer_loop(exp, args.iterations))
        print(f"bare {bare[-1]:.1f} img/s   densepred {ours[-1]:.1f} img/s", flush=True)
    b, o = max(bare), max(ours)
    print(
        f"best of {args.repeats}: bare loop {b:.1f} img/s, densepred trainer {o:.1f} img/s, "
        f"overhead {100 * (b - o) / b:+.1f}% ({args.config}, batch {exp.data.batch_size}, {exp.data.workers} workers)"
    )


if __name__ == "__main__":
    main()
