"""A loopback HTTP server for download tests: files from a dict, Range requests, dropped connections.

Only 127.0.0.1 is ever contacted. Tests get one through the ``http_server`` fixture of
``tests/conftest.py``::

    http_server.files["/w.pth"] = data
    http_server.interrupt("/w.pth", after=1000)  # the next response stops after 1000 bytes of body
    fetch(http_server.url("/w.pth"), ...)
    assert http_server.requests == [("/w.pth", None), ("/w.pth", "bytes=1000-")]
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        owner = self.server.owner
        path, asked = self.path, self.headers.get("Range")
        owner.requests.append((path, asked))
        data = owner.files.get(path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if asked and path not in owner.ignore_range:
            start = 0 if path in owner.wrong_range else int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path in owner.cuts:  # the connection drops early: an interrupted transfer
            after, times = owner.cuts[path]
            body = body[:after]
            if times is not None:
                owner.cuts[path] = (after, times - 1)
                if times == 1:
                    del owner.cuts[path]
        owner.sent += len(body)  # counted first: the client may finish reading before write() returns
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    owner: LoopbackServer


class LoopbackServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 from a daemon thread; a context manager.

    ``requests`` logs each GET as ``(path, Range header or None)``; ``sent`` counts body bytes
    sent. Paths in ``ignore_range`` get the whole file (200) whatever the Range, as from a server
    without Range support; paths in ``wrong_range`` get a 206 from byte 0 whatever was asked.
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0
        self.ignore_range: set[str] = set()
        self.wrong_range: set[str] = set()
        self.cuts: dict[str, tuple[int, int | None]] = {}  # path -> (bytes sent, responses left or None: all)
        self.port = 0
        self._httpd: _Server | None = None

    def interrupt(self, path: str, after: int, times: int | None = 1) -> None:
        """Drop the connection after ``after`` bytes of body in the next ``times`` responses for
        ``path`` (``None``: every response)."""
        self.cuts[path] = (after, times)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> LoopbackServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)  # loopback only, any free port
        self._httpd.owner = self
        self.port = self._httpd.server_port
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Shut down (again: no-op). ``url`` keeps naming the closed port: clients are refused."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
