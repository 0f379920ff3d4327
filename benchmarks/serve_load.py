"""Load test of ``densepred serve``: many segmentation requests, a few at a time, against a real server.

    python benchmarks/serve_load.py --checkpoint runs/demo/checkpoints/best.pt --requests 200 --parallel 8

Starts ``densepred serve`` as a subprocess on a free loopback port (without ``--checkpoint``: a
one-iteration tiny U-Net trained first, in about a second), posts one synthetic scene ``--requests``
times with ``--parallel`` client threads, and prints the machine, the server's backend and
streams (requests at once, each on a share of the threads, where measured faster), the errors,
p50/p95 latency, requests per second and the server process's peak resident memory (VmHWM from /proc).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from densepred.data.synthetic import SyntheticShapes
from densepred.precision import machine_info

TINY = [
    "data.dataset=synthetic",
    "data.options={num_images: 2, size: 64}",
    "data.augment=none",
    "data.workers=0",
    "data.batch_size=1",
    "train.iterations=1",
    "train.checkpoint_every=0",
    "eval.max_images=1",
    "model.name=unet_padded",
    "model.options={base_channels: 8, depth: 3, batch_norm: false, dropout: 0.0}",
]


def tiny_checkpoint(folder: Path) -> Path:
    from densepred.config import load_experiment
    from densepred.trainer import train

    return train(load_experiment(None, TINY), folder, progress=False).checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """The process's high-water resident memory (Linux ``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server did not answer {url}/health within {timeout:.0f} s")


def _lanes(streams: int) -> str:
    return f"{streams} streams when at once" if streams > 1 else "one model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: a tiny one-iteration model)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="image size")
    parser.add_argument("--concurrency", type=int, default=2, help="the server's inference threads")
    parser.add_argument("--queue", type=int, default=16, help="the server's queue places")
    parser.add_argument(
        "--streams", type=int, help="the server's --streams (default: measured; 1: requests at once share one model)"
    )
    parser.add_argument("--backend", help="the server's --backend (default: measured)")
    parser.add_argument(
        "--tell-size", action="store_true", help="start the server with --image-size of the posted image"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(tmp))
        image = SyntheticShapes("val", num_images=1, size=tuple(args.size)).load(0)[0]
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        payload = buf.getvalue()

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "densepred", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
        command += ["--device", "cpu", "--concurrency", str(args.concurrency), "--queue", str(args.queue)]
        command += ["--streams", str(args.streams)] if args.streams else []
        command += ["--image-size", *map(str, args.size)] if args.tell_size else []
        command += ["--backend", args.backend] if args.backend else []
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        try:
            wait_until_up(url, server)
            health = httpx.get(f"{url}/health", timeout=10).json()
            with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=args.parallel)) as client:

                def one(_: int) -> tuple[int, float, float]:
                    start = time.perf_counter()
                    try:
                        files = {"image": ("scene.png", payload, "image/png")}
                        r = client.post(f"{url}/api/segment", files=files)
                        code, server_ms = r.status_code, float(r.headers.get("x-inference-ms", "nan"))
                    except httpx.HTTPError:
                        code, server_ms = -1, float("nan")
                    return code, time.perf_counter() - start, server_ms

                one(0)  # warm-up: the first forward pass allocates and picks kernels
                start = time.perf_counter()
                with ThreadPoolExecutor(args.parallel) as pool:
                    results = list(pool.map(one, range(args.requests)))
                wall = time.perf_counter() - start
            peak = peak_rss_mib(server.pid)
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=30)

    codes = np.array([c for c, _, _ in results])
    latency_ms = np.array([t for _, t, _ in results]) * 1000
    inference_ms = np.array([m for _, _, m in results])
    errors = int((codes != 200).sum())
    told = f", told --image-size {args.size[0]} {args.size[1]}" if args.tell_size else ""
    print(f"{machine_info().line()}; server: {health['model']} on {health['backend']}{told}")
    print(
        f"{args.requests} requests, {args.parallel} in flight, {args.size[1]}x{args.size[0]} PNG "
        f"({len(payload) / 1024:.0f} KiB), server: {args.concurrency} inference threads on "
        f"{_lanes(health.get('streams', 1))}, queue {args.queue}"
    )
    print(f"errors: {errors}" + (f" (status codes {sorted(set(codes.tolist()) - {200})})" if errors else ""))
    print(
        f"latency: p50 {np.percentile(latency_ms, 50):.0f} ms, p95 {np.percentile(latency_ms, 95):.0f} ms, "
        f"max {latency_ms.max():.0f} ms; server inference p50 {np.nanpercentile(inference_ms, 50):.0f} ms"
    )
    print(f"throughput: {args.requests / wall:.1f} requests/s over {wall:.1f} s")
    print(f"server peak resident memory (VmHWM): {peak:.0f} MiB")
    if errors and stderr:
        print(stderr.decode(errors="replace")[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
