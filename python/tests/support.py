"""Test helpers: a TCP proxy that can cut its connections, and a fake LLM provider over HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Proxy:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`cut` closes every live connection (new ones
    still work)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.accepted = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.target)
            except OSError:
                inbound.close()
                continue
            with self.lock:
                self.accepted += 1
                self.conns += [inbound, outbound]
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


class Provider:
    """A fake provider on 127.0.0.1: each path answers one way (see ``_Handler.do_POST``)."""

    def __init__(self) -> None:
        self.release_stream = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.provider = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.hits: dict[str, int] = {}
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.release_stream.set()
        self.server.shutdown()
        self.server.server_close()


USAGE = {"input_tokens": 11, "output_tokens": 22, "cache_read_input_tokens": 3}
LIMIT_HEADERS = {
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "49",
    "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._answer()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: some tests do that on purpose

    def _answer(self) -> None:
        provider: Provider = self.server.provider  # type: ignore[attr-defined]
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        path = self.path
        provider.hits[path] = provider.hits.get(path, 0) + 1
        if path == "/ok":
            body = json.dumps({"content": "hi", "usage": USAGE}).encode()
            self._send(200, body, {"content-type": "application/json", **LIMIT_HEADERS})
        elif path == "/429":
            body = json.dumps({"error": {"type": "rate_limit_error"}}).encode()
            self._send(429, body, {"content-type": "application/json", "retry-after": "3"})
        elif path == "/429-date":
            when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 4))
            self._send(429, b"{}", {"content-type": "application/json", "retry-after": when})
        elif path == "/429-once":
            if provider.hits[path] == 1:
                self._send(429, b"{}", {"content-type": "application/json", "retry-after": "0"})
            else:
                self._send(200, b"{}", {"content-type": "application/json"})
        elif path == "/529":
            self._send(
                529,
                b'{"type":"error","error":{"type":"overloaded_error"}}',
                {"content-type": "application/json"},
            )
        elif path == "/cut":
            # Promise 1000 bytes, send 100, hang up: the body is cut mid-way.
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", "1000")
            self.end_headers()
            self.wfile.write(b"data: {}\n\n" * 10)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif path == "/stream":
            # An Anthropic-style event stream that waits for the test before its last event.
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            start = {"type": "message_start", "message": {"usage": {"input_tokens": 7, "output_tokens": 1}}}
            self._chunk(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
            provider.release_stream.wait(10)
            delta = {"type": "message_delta", "usage": {"output_tokens": 9}}
            self._chunk(f"event: message_delta\ndata: {json.dumps(delta)}\n\n".encode())
            self._chunk(b"")
        else:
            self._send(404, b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
