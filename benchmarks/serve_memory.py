"""Load test of ``densepred serve`` with large-but-legal uploads: memory stays in its budget.

    python benchmarks/serve_memory.py --side 5000 --clients 4 --rounds 2 --memory-budget-mb 2048

Starts ``densepred serve`` as a subprocess (default model: the tiny U-Net of serve_load.py,
or ``--checkpoint``) and has ``--clients`` threads post an all-zero ``--side`` x ``--side``
PNG (under the default 25 Mpx limit) ``--rounds`` times each, retrying after a 503 as its
Retry-After says, right after ``--abandon`` clients posted the same image and left after one
second (their work must stop).
Meanwhile one thread asks ``/health`` every 50 ms and another samples the server's resident
memory every 50 ms. Prints the status counts, latencies, the slowest ``/health``, and the
server's peak resident memory against its budget.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serve_load import free_port, peak_rss_mib, tiny_checkpoint, wait_until_up  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: a tiny one-iteration U-Net)")
    parser.add_argument("--side", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--abandon", type=int, default=2, help="clients that leave after 1 s")
    parser.add_argument("--memory-budget-mb", type=float, default=2048)
    parser.add_argument("--timeout", type=float, default=120, help="the server's inference deadline, s")
    args = parser.parse_args()

    buf = io.BytesIO()
    Image.fromarray(np.zeros((args.side, args.side, 3), np.uint8)).save(buf, format="PNG")
    payload = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "densepred", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
        command += ["--device", "cpu", "--memory-budget-mb", str(args.memory_budget_mb)]
        command += ["--timeout", str(args.timeout)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = threading.Event()
        health_ms: list[float] = []
        health_codes: Counter = Counter()
        rss: list[float] = []
        try:
            wait_until_up(url, server)
            idle_rss = rss_mib(server.pid)

            def probe() -> None:
                with httpx.Client(timeout=30) as client:
                    while not done.is_set():
                        start = time.perf_counter()
                        try:
                            health_codes[client.get(f"{url}/health").status_code] += 1
                        except httpx.HTTPError:
                            health_codes["error"] += 1
                        health_ms.append((time.perf_counter() - start) * 1000)
                        time.sleep(0.05)

            def sample() -> None:
                while not done.is_set():
                    rss.append(rss_mib(server.pid))
                    time.sleep(0.05)

            answers: list[str] = []

            def post(abandon: bool) -> tuple[str, float, str]:
                start = time.perf_counter()
                while True:
                    try:
                        r = httpx.post(
                            f"{url}/api/segment",
                            files={"image": ("zeros.png", payload, "image/png")},
                            timeout=1.0 if abandon else args.timeout + 60,
                        )
                    except httpx.TimeoutException:
                        answers.append("left")
                        return "left", time.perf_counter() - start, ""
                    answers.append(str(r.status_code))
                    if r.status_code != 503 or abandon:
                        return str(r.status_code), time.perf_counter() - start, r.headers.get("x-inference-path", "")
                    time.sleep(float(r.headers.get("retry-after", "1")))

            watchers = [threading.Thread(target=probe), threading.Thread(target=sample)]
            for w in watchers:
                w.start()
            start = time.perf_counter()
            with ThreadPoolExecutor(args.abandon or 1) as pool:
                left = list(pool.map(post, [True] * args.abandon))
            with ThreadPoolExecutor(args.clients) as pool:
                results = left + list(pool.map(post, [False] * (args.clients * args.rounds)))
            wall = time.perf_counter() - start
            # Abandoned work must stop: wait for the server to be idle again.
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/health").json()["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.1)
            idle_after = time.perf_counter() - start - wall
            done.set()
            for w in watchers:
                w.join()
            peak = peak_rss_mib(server.pid)
        finally:
            done.set()
            server.terminate()
            server.communicate(timeout=30)

    codes = Counter(code for code, _, _ in results)
    print(
        f"{len(results)} uploads of a {args.side}x{args.side} all-zero PNG ({len(payload) / 1024:.0f} KiB): "
        f"{args.clients} clients x {args.rounds} rounds + {args.abandon} that leave after 1 s; "
        f"server memory budget {args.memory_budget_mb:.0f} MiB, deadline {args.timeout:g} s"
    )
    print(f"final status counts: {dict(sorted(codes.items()))}; every answer: {dict(sorted(Counter(answers).items()))}")
    print(f"inference paths: {dict(Counter(p for _, _, p in results if p))}")
    for code in sorted(codes):
        seconds = np.array([t for c, t, _ in results if c == code])
        print(f"  {code}: latency p50 {np.median(seconds):.2f} s, max {seconds.max():.2f} s")
    h = np.array(health_ms)
    print(
        f"/health: {len(h)} probes {dict(health_codes)}, p50 {np.median(h):.1f} ms, p99 {np.percentile(h, 99):.1f} ms, "
        f"max {h.max():.1f} ms"
    )
    print(
        f"server resident memory: idle {idle_rss:.0f} MiB, peak {peak:.0f} MiB (sampled max {max(rss):.0f}); "
        f"budget {args.memory_budget_mb:.0f} MiB above idle -> "
        f"{'within' if peak - idle_rss <= args.memory_budget_mb else 'OVER'}"
    )
    print(f"all done in {wall:.1f} s; idle again {idle_after:.1f} s after the last answer")


if __name__ == "__main__":
    main()
