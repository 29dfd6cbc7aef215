"""A local HTTP server for the URL tests (127.0.0.1 only, threads), answering with the faults of issue 22.

Paths:
    /img/NAME.jpg     a small JPEG (its colour from NAME), after ``latency`` seconds
    /missing.jpg      404
    /flaky/NAME.jpg   500 the first time, then the image (recovered by a retry)
    /busy/NAME.jpg    429 with Retry-After: 1 the first time, then the image
    /hang.jpg         headers, then a body that never ends (a few bytes, then silence)
    /huge.jpg         50 MB, streamed without Content-Length (refused by size while reading)
    /huge-declared.jpg  Content-Length 50 MB (refused before reading)
    /loop.jpg         a redirect to itself
    /page.jpg         an HTML page
    /trunc.jpg        a truncated JPEG
    /shard/NAME.tar   a file under ``files`` (WebDataset shards), Range requests honoured
    /cut/NAME.tar     the first half of the ``files`` entry ``/shard/NAME.tar`` with the whole one's
                      Content-Length, then the connection closed (a download cut short)
    /redirect?to=URL  a redirect (302) to URL

``host``: the loopback address to listen on (``127.0.0.2``, ``::1``...); ``seen_hosts`` lists the ``Host``
header of every request.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def jpeg(name: str, size: tuple[int, int] = (40, 30)) -> bytes:
    """A JPEG whose colour comes from ``name``."""
    h = hashlib.blake2b(name.encode(), digest_size=3).digest()
    buf = io.BytesIO()
    Image.new("RGB", size, tuple(h)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class FaultServer:
    """The server; ``url(path)`` gives a full URL; ``hits[path]`` counts requests and ``served[path]`` the
    body bytes sent; ``latency`` adds seconds before each answer; ``files`` maps ``/shard/...`` paths to
    local files."""

    def __init__(self, latency: float = 0.0, host: str = "127.0.0.1") -> None:
        self.latency = latency
        self.host = host
        self.seen_hosts: list[str] = []
        self.hits: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.files: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                owner._serve(self)

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            request_queue_size = 1024  # socketserver's 5 drops handshakes of 16 connections opened at once
            daemon_threads = True

        self.httpd = Server((host, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str = "image/jpeg",
              headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        path = h.path.split("?")[0]
        with self.lock:
            self.served[path] = self.served.get(path, 0) + len(body)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        with self.lock:
            n = self.hits[path] = self.hits.get(path, 0) + 1
            self.seen_hosts.append(h.headers.get("Host", ""))
        if self.latency:
            time.sleep(self.latency)
        name = path.rsplit("/", 1)[-1]
        try:
            if path.startswith("/img/"):
                self._send(h, 200, jpeg(name))
            elif path == "/missing.jpg":
                self._send(h, 404, b"not found", "text/plain")
            elif path.startswith("/flaky/"):
                if n == 1:
                    self._send(h, 500, b"oops", "text/plain")
                else:
                    self._send(h, 200, jpeg(name))
            elif path.startswith("/busy/"):
                if n == 1:
                    self._send(h, 429, b"slow down", "text/plain", {"Retry-After": "1"})
                else:
                    self._send(h, 200, jpeg(name))
            elif path == "/hang.jpg":
                h.send_response(200)
                h.send_header("Content-Type", "image/jpeg")
                h.send_header("Content-Length", "100000")
                h.end_headers()
                h.wfile.write(b"\xff\xd8\xff")
                h.wfile.flush()
                self.stop.wait(30)
            elif path == "/huge.jpg":
                h.send_response(200)
                h.send_header("Content-Type", "image/jpeg")
                h.send_header("Connection", "close")
                h.end_headers()
                block = b"\0" * (1 << 20)
                for _ in range(50):
                    h.wfile.write(block)
                h.close_connection = True
            elif path == "/huge-declared.jpg":
                h.send_response(200)
                h.send_header("Content-Type", "image/jpeg")
                h.send_header("Content-Length", str(50 << 20))
                h.end_headers()
                h.close_connection = True
            elif path == "/loop.jpg":
                h.send_response(302)
                h.send_header("Location", "/loop.jpg")
                h.send_header("Content-Length", "0")
                h.end_headers()
            elif path == "/redirect":
                h.send_response(302)
                h.send_header("Location", parse_qs(urlsplit(h.path).query)["to"][0])
                h.send_header("Content-Length", "0")
                h.end_headers()
            elif path == "/page.jpg":
                self._send(h, 200, b"<html><body>Not here</body></html>", "text/html; charset=utf-8")
            elif path == "/trunc.jpg":
                self._send(h, 200, jpeg("trunc", (200, 150))[:400])
            elif path.startswith("/cut/") and "/shard/" + name in self.files:
                data = self.files["/shard/" + name].read_bytes()
                h.send_response(200)
                h.send_header("Content-Type", "application/x-tar")
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data[: len(data) // 2])
                h.close_connection = True
            elif path in self.files:
                data = self.files[path].read_bytes()
                rng = h.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start, end = int(a), int(b) if b else len(data) - 1
                    chunk = data[start : end + 1]
                    self._send(h, 206, chunk, "application/x-tar",
                               {"Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"})
                else:
                    self._send(h, 200, data, "application/x-tar")
            else:
                self._send(h, 404, b"no such path", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass
