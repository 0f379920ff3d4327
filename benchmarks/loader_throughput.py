"""Loader throughput on CamVid with DeepLab-style training augmentation.

    python benchmarks/loader_throughput.py --root ../shared/data/camvid

Random scale 0.5-1.5, pad with the ignore label, 321x321 crop, flip, ImageNet normalisation;
DataLoader with 2 workers, batch 8. Prints images/s over whole epochs after a warm-up batch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from densepred.data import create_dataset, deeplab_train, make_loader


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="CamVid folder (train/ + trainannot/)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)

    dataset = create_dataset("camvid", root=args.root, split=args.split, transform=deeplab_train(crop=args.crop))
    loader = make_loader(dataset, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True, seed=0)
    iterator = iter(loader)
    next(iterator)  # warm-up: worker start-up is not throughput
    images, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        for batch in iterator if epoch == 0 else loader:
            images += batch["image"].shape[0]
            assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.int64
    elapsed = time.perf_counter() - start
    rate = images / elapsed
    # Other processes on the machine take cores from the workers: say how busy it was.
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"{images} images in {elapsed:.2f} s: {rate:.1f} images/s "
        f"({args.workers} workers, batch {args.batch_size}, crop {args.crop}; "
        f"load average {load} on {os.cpu_count()} CPUs)"
    )
    return rate


if __name__ == "__main__":
    main()
