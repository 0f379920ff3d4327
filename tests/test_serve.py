"""The segmentation web app: API contract, upload limits, concurrency, early refusal on a real server."""

import io
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("httpx", reason="httpx drives FastAPI's TestClient")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from densepred.data.synthetic import SyntheticShapes  # noqa: E402
from densepred.prediction import Predictor  # noqa: E402
from densepred.serve import create_app, running_server, sniff_format  # noqa: E402
from tiny import tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def client(predictor):
    app = create_app(predictor, max_upload_bytes=256 * 1024, max_pixels=300_000)
    with TestClient(app) as client:
        yield client


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _scene(height=56, width=72) -> np.ndarray:
    return SyntheticShapes("val", num_images=1, size=(height, width)).load(0)[0]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` RGB pixels in its header, with no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")


def _post(client, data: bytes, *, name="scene.png", ctype="image/png", path="/api/segment"):
    return client.post(path, files={"image": (name, data, ctype)})


def test_mask_png_has_image_size_and_valid_class_ids(client, predictor):
    image = _scene()
    r = _post(client, _png(image))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert float(r.headers["x-inference-ms"]) > 0
    mask = Image.open(io.BytesIO(r.content))
    assert mask.mode == "P" and mask.size == (72, 56)
    labels = np.asarray(mask)
    assert labels.max() < predictor.trained.num_classes
    # The palette carries the classes' colours, so any viewer shows the mask in them.
    assert mask.getpalette()[:6] == [v for c in predictor.trained.palette[:2] for v in c]
    expected, _ = predictor(image)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("path", ["/api/segment?format=json", "/api/counts"])
def test_counts_sum_to_pixel_count(client, predictor, path):
    r = _post(client, _png(_scene()), path=path)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["height"], body["width"]) == (56, 72)
    assert [c["name"] for c in body["counts"]] == predictor.trained.class_names
    assert sum(c["pixels"] for c in body["counts"]) == 56 * 72
    assert body["inference_ms"] > 0


def test_gray_and_jpeg_uploads_are_accepted(client):
    gray = _png(_scene()[..., 0])
    assert _post(client, gray).status_code == 200
    buf = io.BytesIO()
    Image.fromarray(_scene()).save(buf, format="JPEG")
    r = _post(client, buf.getvalue(), name="scene.jpg", ctype="image/jpeg")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (72, 56)


def test_upload_over_the_byte_limit_is_413(client):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # ~480 KB as PNG
    r = _post(client, _png(noise))
    assert r.status_code == 413
    assert "limit of 262,144 bytes" in r.json()["detail"]


def test_chunked_upload_over_the_limit_is_413_without_content_length(client):
    boundary = b"densepred"

    def body():  # a generator: httpx sends it chunked, with no Content-Length to check up front
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n" + b"\x89PNG\r\n\x1a\n"
        for _ in range(64):
            yield b"\0" * 8192
        yield b"\r\n--" + boundary + b"--\r\n"

    r = client.post(
        "/api/segment", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}
    )
    assert r.status_code == 413, r.text


@pytest.mark.parametrize(
    "width, height, reason",
    [(1000, 1000, "exceeds this server's limit of 300,000 pixels"), (100_000, 100_000, "decompression bomb")],
)
def test_too_many_pixels_is_413_from_the_header(client, width, height, reason):
    # Only a header: the refusal cannot have decoded anything, since there is nothing to decode.
    r = _post(client, _png_header(width, height), name="huge.png")
    assert r.status_code == 413
    assert reason in r.json()["detail"]


@pytest.mark.parametrize(
    "data, ctype",
    [(b"just some text\n", "text/plain"), (b"just some text\n", "image/png"), (b"%PDF-1.7\n", "application/pdf")],
)
def test_non_images_are_415(client, data, ctype):
    r = _post(client, data, name="notes.txt", ctype=ctype)
    assert r.status_code == 415
    assert "notes.txt" in r.json()["detail"]


def test_non_multipart_body_is_415(client):
    r = client.post("/api/segment", content=_png(_scene()), headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]


def test_truncated_image_is_400_with_the_reason(client):
    data = _png(_scene())
    r = _post(client, data[: len(data) // 2], name="cut.png")
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail.startswith("cut.png:") and "truncated" in detail
    assert "densepred-serve-" not in detail  # the server's temporary path is not leaked


def test_missing_field_and_empty_file(client):
    r = client.post("/api/segment", files={"picture": ("a.png", _png(_scene()), "image/png")})
    assert r.status_code == 422 and "'image'" in r.json()["detail"]
    assert _post(client, b"").status_code == 400


def test_health_classes_and_openapi(client, predictor):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "unet_padded"
    classes = client.get("/api/classes").json()["classes"]
    assert [c["name"] for c in classes] == predictor.trained.class_names
    assert [tuple(c["color"]) for c in classes] == predictor.trained.palette
    schema = client.get("/openapi.json").json()
    assert {"/api/segment", "/api/counts", "/api/classes", "/health"} <= set(schema["paths"])
    body = schema["paths"]["/api/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["image"]


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    for external in ("http://", "https://", "<link", "src="):
        assert external not in page, f"the page must not load {external!r} resources"


def test_eight_parallel_requests_all_succeed(client):
    data = _png(_scene())
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: _post(client, data).status_code, range(8)))
    assert codes == [200] * 8


def test_requests_beyond_the_queue_get_503(predictor):
    release = []

    class Slow:  # a predictor that holds its worker until told, to fill the pool deterministically
        trained, device, options, backend = predictor.trained, predictor.device, predictor.options, predictor.backend

        def labels(self, image, options):
            deadline = time.monotonic() + 30  # never hang the suite if the test goes wrong
            while not release and time.monotonic() < deadline:
                time.sleep(0.01)
            return predictor.labels(image, options)

    app = create_app(Slow(), max_concurrency=1, queue_size=1, warmup=False)
    data = _png(_scene())
    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        held = [pool.submit(_post, client, data) for _ in range(2)]
        while app.state.pool.admitted < 2:
            time.sleep(0.01)
        refused = _post(client, data)
        release.append(True)
        assert [f.result().status_code for f in held] == [200, 200]
    assert refused.status_code == 503
    assert "busy" in refused.json()["detail"] and refused.headers["retry-after"] == "1"


def test_requests_at_once_run_on_the_measured_streams_and_one_alone_on_the_predictor(predictor):
    ran, asked = [], []
    both_running = threading.Barrier(2, timeout=10)

    class Recording:  # a predictor that says which lane ran each request
        trained, device, options, backend = predictor.trained, predictor.device, predictor.options, predictor.backend

        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, image):
            return predictor(image)

        def labels(self, image, options):
            ran.append(self.name)
            if len(ran) <= 2:
                both_running.wait()  # the first two requests are inside the model at once
            return predictor.labels(image, options)

        def in_streams(self, frames: int):
            asked.append(frames)
            return [Recording("stream 1"), Recording("stream 2")]

    app = create_app(Recording("own"), max_concurrency=2, queue_size=2)
    data = _png(_scene())
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        codes = [f.result().status_code for f in [pool.submit(_post, client, data) for _ in range(2)]]
        alone = _post(client, data).status_code
        health = client.get("/health").json()
    assert codes == [200, 200] and alone == 200
    assert asked == [2], "the streams are measured for the server's concurrency, once"
    assert ran[0] != ran[1] and "own" in ran[:2] and {"stream 1", "stream 2"} & set(ran[:2])
    assert ran[2] == "own", "a request alone runs on the predictor itself, on all the threads"
    assert health["streams"] == 2


@pytest.mark.parametrize(
    ("options", "probed"),
    [
        ([], (128, 128)),
        (["--image-size", "48", "64"], (48, 64)),
        (["--image-size", "48", "64", "--mode", "slide", "--tile", "32"], (32, 32)),  # the tiles' forwards
    ],
)
def test_serve_measures_its_backend_once_at_the_expected_forward_size_with_the_given_options(
    checkpoint, monkeypatch, options, probed
):
    from densepred import backends
    from densepred.cli import main

    served, probes = [], []
    real_accelerate = backends.accelerate

    def accelerate(model, backend, example, amp="none"):
        probes.append(tuple(example.shape[-2:]))
        return real_accelerate(model, backend, example, amp)

    monkeypatch.setattr("densepred.prediction.accelerate", accelerate)
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.append(app))
    assert main(["serve", "--checkpoint", str(checkpoint), *options]) == 0
    predictor = served[0].state.predictor
    assert probes == [probed], "one probe, at the size given (128 pixels without one)"
    assert predictor.options.mode == ("slide" if "slide" in options else "whole")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident memory is read from Linux's /proc")
@pytest.mark.parametrize("budget_mib", [32, 1024])
def test_the_streams_copies_of_the_weights_are_held_from_the_memory_budget_or_not_used(predictor, budget_mib):
    class WithHeavyStreams:  # each stream holds 48 MiB of its own, as a runtime's copy of the weights would
        trained, device, options, backend = predictor.trained, predictor.device, predictor.options, predictor.backend

        def __call__(self, image):
            return predictor(image)

        def labels(self, image, options):
            return predictor.labels(image, options)

        def in_streams(self, frames: int):
            return [type("Stream", (), {"weights": np.ones(48 * 2**20, np.uint8)})() for _ in range(frames)]

    app = create_app(WithHeavyStreams(), max_concurrency=2, memory_budget=budget_mib * 2**20)
    with TestClient(app) as client:
        health = client.get("/health").json()
    if budget_mib == 32:  # 96 MiB of streams do not fit: one model for all requests, nothing held
        assert health["streams"] == 1 and health["memory_reserved_mib"] == 0
    else:
        assert health["streams"] == 2 and health["memory_reserved_mib"] >= 96


def test_sniff_format():
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "PNG"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_format(b"P5\n64 64\n255\n") == "PPM"
    assert sniff_format(b"Plain text") is None


def _send_until_answered(host: str, port: int, head: bytes, chunk: bytes, limit: int) -> tuple[bytes, int]:
    """Send ``head`` then ``chunk`` repeatedly until the server answers (or ``limit`` bytes); return both."""
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head)
        sock.settimeout(0.02)
        try:
            while sent < limit:
                try:
                    answer = sock.recv(4096)
                    if answer:
                        return answer, sent
                except TimeoutError:
                    pass
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server stopped reading: its answer is waiting in the receive buffer
        sock.settimeout(10)
        return sock.recv(4096), sent


def test_real_server_refuses_oversized_bodies_before_reading_them(predictor):
    app = create_app(predictor, max_upload_bytes=256 * 1024)
    with running_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        multipart = "Content-Type: multipart/form-data; boundary=b\r\n"
        # A declared size over the limit: refused from the headers alone, no body sent.
        head = f"POST /api/segment HTTP/1.1\r\nHost: x\r\n{multipart}Content-Length: {1 << 30}\r\n\r\n".encode()
        answer, _ = _send_until_answered(host, int(port), head, b"", 0)
        assert answer.startswith(b"HTTP/1.1 413")
        # A chunked body: cut off once the bytes received pass the limit, long before its 64 MiB end.
        head = f"POST /api/segment HTTP/1.1\r\nHost: x\r\n{multipart}Transfer-Encoding: chunked\r\n\r\n".encode()
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        data = b"\0" * 65536
        chunk = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        answer, sent = _send_until_answered(
            host, int(port), head + f"{len(part):x}\r\n".encode() + part + b"\r\n", chunk, 64 << 20
        )
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 8 << 20
    with running_server(app) as url:  # served a second time: the inference pool starts again
        r = httpx.post(f"{url}/api/segment", files={"image": ("a.png", _png(_scene()), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text


def test_cli_serve_loads_the_checkpoint_once_and_runs_uvicorn(predictor, monkeypatch, tmp_path):
    import uvicorn

    from densepred.cli import main

    calls, loads = [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setattr("densepred.cli.serve.load_source", lambda args, device: loads.append(args) or predictor.trained)
    argv = ["serve", "--checkpoint", str(tmp_path / "x.pt"), "--port", "8123", "--max-upload-mb", "1"]
    assert main([*argv, "--memory-budget-mb", "300", "--read-timeout", "5"]) == 0
    ((app, kw),) = calls
    protocol = kw.pop("http")
    assert kw == {"host": "127.0.0.1", "port": 8123, "log_level": "info"}
    assert protocol.__name__ == "HeaderTimeoutH11"
    assert len(loads) == 1 and app.state.predictor.trained is predictor.trained
    assert app.state.budget.total == 300 * 2**20
