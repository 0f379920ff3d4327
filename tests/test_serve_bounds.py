"""The server bounds memory and time: admission by estimated memory, tiles for large images,
deadlines, cancelled work when the client leaves, slow clients timed out, a load of large uploads."""

import dataclasses
import io
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from densepred.admission import MemoryBudget  # noqa: E402
from densepred.prediction import Predictor  # noqa: E402
from densepred.serve import create_app, running_server  # noqa: E402
from tiny import tiny_checkpoint  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("bounds"))


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint)


def _png(side: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _post(client, data: bytes):
    return client.post("/api/segment", files={"image": ("big.png", data, "image/png")})


def test_an_image_too_large_to_run_whole_runs_by_tiles_and_matches_the_mask_size(predictor):
    app = create_app(predictor, memory_budget=200 * MiB, max_concurrency=1, tile=256)
    planner = app.state.planner
    whole = planner.plan(1200, 1200, per_request=10**12)
    assert whole.path == "whole"
    tiled = planner.plan(1200, 1200, per_request=200 * MiB)
    assert tiled.path == "slide 256" and tiled.nbytes < whole.nbytes
    with TestClient(app) as client:
        r = _post(client, _png(1200))
    assert r.status_code == 200, r.text
    assert r.headers["x-inference-path"] == "slide 256"
    assert Image.open(io.BytesIO(r.content)).size == (1200, 1200)
    assert app.state.budget.reserved == 0  # released after the answer


def test_tiles_make_a_real_size_networks_memory_grow_by_its_buffers_not_its_activations():
    from densepred.admission import MemoryPlanner
    from densepred.config import EvalConfig
    from densepred.registry import create_model

    with __import__("torch").device("meta"):
        model = create_model("unet_padded", num_classes=2, in_channels=3, base_channels=64, batch_norm=True).eval()
    planner = MemoryPlanner(model, EvalConfig(), in_channels=3, num_classes=2, tile=512)
    # Activations of a 64-channel U-Net: 1,760 bytes of float32 tensors per pixel at the peak.
    assert planner.whole.per_pixel == pytest.approx(1760, rel=0.01)
    assert planner.tiled.per_pixel < planner.whole.per_pixel / 50  # the logits accumulators only
    five_k = planner.plan(5000, 5000, per_request=2**31)
    assert five_k.path == "slide 512" and five_k.nbytes < 2 * 2**30


def test_an_image_whose_memory_exceeds_the_whole_budget_is_refused_with_the_figures(predictor):
    app = create_app(predictor, memory_budget=8 * MiB, max_concurrency=1, tile=256)
    with TestClient(app) as client:
        r = _post(client, _png(1500))
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "1500x1500 needs about" in detail and "memory budget of 8 MiB" in detail


def test_a_request_that_must_wait_for_memory_gets_503(predictor):
    app = create_app(predictor, memory_budget=100 * MiB, max_concurrency=2, tile=256)
    with TestClient(app) as client:
        assert app.state.budget.reserve(95 * MiB)  # as if another large request were running
        r = _post(client, _png(600))
        app.state.budget.release(95 * MiB)
        ok = _post(client, _png(600))
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert "MiB are free" in r.json()["detail"]
    assert ok.status_code == 200


def test_inference_past_its_deadline_answers_504(predictor):
    app = create_app(predictor, timeout_s=1e-6, warmup=False)
    with TestClient(app) as client:
        r = _post(client, _png(64))
    assert r.status_code == 504 and "limit of 1e-06 s" in r.json()["detail"]
    assert app.state.budget.reserved == 0 and app.state.pool.admitted == 0


def _layer_calls(predictor: Predictor, delay_s: float) -> tuple[list[float], object]:
    """Make every forward of the model's first layer sleep ``delay_s``; returns the call times."""
    calls: list[float] = []
    first = next(m for m in predictor.trained.model.modules() if isinstance(m, __import__("torch").nn.Conv2d))

    def slow(module, args):
        calls.append(time.monotonic())
        time.sleep(delay_s)

    return calls, first.register_forward_pre_hook(slow)


def _multipart(data: bytes) -> tuple[bytes, bytes]:
    boundary = b"densepredboundary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n"
    )
    head = (
        b"POST /api/segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head, body


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_work_stops_when_its_client_disconnects(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)  # its own model: the test slows it down
    predictor = dataclasses.replace(predictor, options=dataclasses.replace(predictor.options, mode="slide", tile=128))
    calls, hook = _layer_calls(predictor, 0.05)
    app = create_app(predictor, memory_budget=1024 * MiB, max_concurrency=1, warmup=False)
    try:
        with running_server(app) as url:
            head, body = _multipart(_png(1024))  # 81 tiles of 128: at least 4 s of forward passes
            with socket.create_connection(_address(url)) as sock:
                sock.sendall(head + body)
                deadline = time.monotonic() + 20
                while len(calls) < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert len(calls) >= 3, "inference never started"
            # The client has gone: the server notices within its polling interval and stops.
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/health").json()["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.05)
            stopped_after = len(calls)
            assert httpx.get(f"{url}/health").json() | {"in_flight": 0} == httpx.get(f"{url}/health").json()
            time.sleep(0.3)
            assert len(calls) == stopped_after, "layers still ran after the request ended"
            assert stopped_after < 81, f"all {stopped_after} tiles ran although the client had left"
            assert app.state.budget.reserved == 0
    finally:
        hook.remove()


def test_a_client_that_never_finishes_its_headers_is_disconnected(predictor):
    app = create_app(predictor, warmup=False)
    with running_server(app, header_timeout_s=0.3) as url, socket.create_connection(_address(url)) as sock:
        sock.sendall(b"POST /api/segment HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        sock.settimeout(10)
        start = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 5


def test_a_stalled_upload_body_answers_408(predictor):
    app = create_app(predictor, warmup=False, read_timeout_s=0.3)
    head, body = _multipart(_png(64))
    with running_server(app) as url, socket.create_connection(_address(url)) as sock:
        sock.sendall(head + body[:100])  # then nothing
        sock.settimeout(10)
        reply = b""
        while b"stalled" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"the upload stalled" in reply


def test_api_docs_are_served_without_any_outside_network(predictor):
    with TestClient(create_app(predictor, warmup=False)) as client:
        r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "POST /api/segment" in r.text and "503" in r.text and "/openapi.json" in r.text
    for external in ("http://", "https://", "<script", "<link"):
        assert external not in r.text


def test_a_load_of_large_uploads_is_answered_within_the_budget_and_health_keeps_answering(predictor):
    budget = 80 * MiB
    app = create_app(predictor, memory_budget=budget, max_concurrency=2, queue_size=8, tile=256)
    images = [_png(700, seed) for seed in range(6)]
    health: list[tuple[int, float]] = []
    seen: list[int] = []
    done = threading.Event()
    with running_server(app) as url:

        def probe() -> None:
            while not done.is_set():
                start = time.monotonic()
                code = httpx.get(f"{url}/health", timeout=10).status_code
                health.append((code, time.monotonic() - start))
                time.sleep(0.02)

        def client(data: bytes) -> int:
            """Post until answered, retrying after a 503 as its Retry-After says (shortened here)."""
            for _ in range(1200):  # up to 2 minutes: a slow machine serves one image at a time
                r = httpx.post(f"{url}/api/segment", files={"image": ("a.png", data, "image/png")}, timeout=120)
                seen.append(r.status_code)
                if r.status_code != 503:
                    return r.status_code
                time.sleep(0.1)
            return 503

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(len(images)) as pool:
            codes = list(pool.map(client, images))
        done.set()
        prober.join()
    slowest = max(seconds for _, seconds in health)
    print(
        f"{len(images)} uploads of 700x700: {seen.count(503)} answers 503 before a 200; "
        f"/health max {slowest * 1e3:.0f} ms"
    )
    assert codes == [200] * len(images) and set(seen) <= {200, 503}
    assert {code for code, _ in health} == {200}
    assert app.state.budget.high_water <= budget and app.state.budget.reserved == 0


def test_memory_budget_accounting():
    b = MemoryBudget(100)
    assert b.reserve(60) and not b.reserve(50) and b.reserve(40)
    b.release(60)
    assert b.reserved == 40 and b.high_water == 100
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


def test_the_tiled_plan_bounds_real_resident_memory(checkpoint):
    """In a fresh process: the resident peak of a 2000x2000 image's tiled inference stays under
    what the planner reserved for it (and far under its whole-image estimate)."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from densepred.admission import MemoryPlanner, measured_peak
        from densepred.footprint import meta_model
        from densepred.prediction import Predictor
        p = Predictor.from_checkpoint({str(checkpoint)!r})
        t = p.trained
        planner = MemoryPlanner(meta_model(t.experiment, t.num_classes, t.in_channels).eval(), p.options,
                                in_channels=t.in_channels, num_classes=t.num_classes, tile=256)
        planner.calibrate(t.model, p.device)
        plan = planner.plan(2000, 2000, per_request=64 * 2**20)
        whole = planner.plan(2000, 2000, per_request=10**12)
        image = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
        real = measured_peak(lambda: p.labels(image, plan.options))
        print(plan.path, plan.nbytes, whole.nbytes, real)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    path, planned, whole, real = out.stdout.split()[-4:]
    if real == "None":
        pytest.skip("this OS cannot measure a resident-memory peak")
    print(f"tiled 2000x2000: planned {int(planned) / MiB:.0f} MiB, real {int(real) / MiB:.0f} MiB")
    assert path == "256"  # "slide 256" split in two
    assert int(real) <= int(planned) < int(whole) / 2
