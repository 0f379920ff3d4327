"""Peak memory of tiled inference on a large image (padded U-Net, sliding window).

    python benchmarks/large_image.py --size 4000 --tile 512 --base-channels 64

Prints wall time and the process's peak resident memory (which includes PyTorch itself and
the image, logits and blending buffers). No data is needed: the image is random.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import densepred
from densepred.inference import sliding_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=2, help="tiles per forward pass")
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--classes", type=int, default=2)
    args = parser.parse_args()

    model = densepred.create_model(
        "unet_padded", num_classes=args.classes, in_channels=3, base_channels=args.base_channels
    ).eval()
    image = torch.randn(1, 3, args.size, args.size)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window(model, image, args.tile, args.overlap, batch_size=args.batch_size, blend="gaussian")
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    params = sum(p.numel() for p in model.parameters())
    print(
        f"padded U-Net (base {args.base_channels}, {params / 1e6:.1f}M params), {args.size}x{args.size} image, "
        f"{args.tile}px tiles, overlap {args.overlap}, {args.batch_size} tiles/pass: logits {tuple(logits.shape)} "
        f"in {seconds:.1f} s; peak resident memory {peak_gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()
