"""A fault-injecting HTTP proxy on 127.0.0.1, put between the store and the S3 test server.

Why a proxy and not mocks: the faults that lose bytes happen on the wire (an upload cut
halfway, a 503 SlowDown after the body was sent, a slow answer), below botocore and s3fs,
whose retry layers must each cope with them. The proxy forwards every request to the
upstream server (moto) unless the policy says otherwise, and keeps a log of every request
it saw, so tests count requests the way the server would bill them.

Policy: a callable (method, key, n) -> action, where n counts requests for that key and
method from 1, and action is one of
  "pass"           forward as is
  "drop"           read half the body (or the headers of a bodiless request), then close
  "slowdown"       read the whole request, answer 503 SlowDown (S3's throttling reply)
  "drop_response"  forward it (the server acts on it), then close without an answer
  "truncate"       store only the first half of the body and answer 200 with its ETag, as
                   when a layer resends a half-read stream: the server gets a short body
                   that is correctly signed (needs `store_short`, which writes it upstream
                   with valid credentials; a forwarded half body would fail its signature)
  ("delay", s)     wait s seconds, then forward
"""

from __future__ import annotations

import http.client
import random
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

Action = Any  # str or ("delay", seconds)
Policy = Callable[[str, str, int], Action]

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te"}


@dataclass
class Seen:
    """One request as the proxy saw it."""

    method: str
    key: str  # the path without the query, unquoted: "/bucket/prefix/object"
    query: str
    action: str
    body_bytes: int  # bytes of request body the proxy received (all of it unless dropped)
    forwarded: bool  # the upstream server received it


class FaultProxy:
    """A threaded HTTP/1.1 proxy to `upstream` ("http://host:port") with injected faults."""

    def __init__(self, upstream: str, policy: Policy | None = None,
                 store_short: Callable[[str, bytes], str] | None = None):
        parts = urlsplit(upstream)
        self.store_short = store_short  # (path "/bucket/key", body) -> ETag
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.policy: Policy = policy or (lambda method, key, n: "pass")
        self.log: list[Seen] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve(self)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fault-proxy")
        self._thread.start()

    # -- what tests use

    def set_policy(self, policy: Policy) -> None:
        with self._lock:
            self.policy = policy
            self._counts.clear()

    def clear(self) -> None:
        with self._lock:
            self.log.clear()
            self._counts.clear()

    def seen(self, method: str | None = None, contains: str = "",
             forwarded: bool | None = True) -> list[Seen]:
        """Requests of a method whose key contains a string (those the server got, by default)."""
        with self._lock:
            rows = list(self.log)
        return [r for r in rows if (method is None or r.method == method)
                and contains in r.key and (forwarded is None or r.forwarded == forwarded)]

    def faults(self) -> Counter[str]:
        with self._lock:
            return Counter(r.action for r in self.log if r.action != "pass")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- serving

    def _serve(self, h: socketserver.StreamRequestHandler) -> None:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            while self._one(h, upstream):
                pass
        except (OSError, http.client.HTTPException):
            pass
        finally:
            upstream.close()

    def _one(self, h: socketserver.StreamRequestHandler, upstream: Any) -> bool:
        """Serve one request; False when the client connection is to be closed."""
        line = h.rfile.readline(65537)
        if not line.strip():
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            hl = h.rfile.readline(65537)
            if hl in (b"\r\n", b"\n", b""):
                break
            name, _, value = hl.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        path, _, query = target.partition("?")
        key = unquote(path)
        with self._lock:
            self._counts[(method, key)] += 1
            n = self._counts[(method, key)]
            action = self.policy(method, key, n)
        delay = 0.0
        if isinstance(action, tuple):
            action, delay = action[0], float(action[1])
        if lower.get("expect", "").lower() == "100-continue":
            h.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            h.wfile.flush()
        length = int(lower.get("content-length", "0") or 0)
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        if action == "drop":
            got = len(h.rfile.read(length // 2)) if length else 0
            self._record(method, key, query, action, got, False)
            h.connection.shutdown(socket.SHUT_RDWR)
            return False
        body = _read_chunked(h.rfile) if chunked else h.rfile.read(length)
        if action == "slowdown":
            self._record(method, key, query, action, len(body), False)
            _reply(h, 503, "Slow Down", [("Content-Type", "application/xml")], _SLOWDOWN,
                   method)
            return True
        if action == "truncate" and self.store_short is not None:
            half = body[:len(body) // 2]
            etag = self.store_short(key, half)
            self._record(method, key, query, action, len(half), True)
            _reply(h, 200, "OK", [("ETag", etag)], b"", method)
            return True
        if delay:
            time.sleep(delay)
        upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            if name.lower() not in _HOP and name.lower() != "content-length":
                upstream.putheader(name, value)
        if body or method in ("PUT", "POST"):
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body or None)
        resp = upstream.getresponse()
        data = resp.read()
        self._record(method, key, query, action if action != "pass" or not delay else "delay",
                     len(body), True)
        if action == "drop_response":
            h.connection.shutdown(socket.SHUT_RDWR)
            return False
        _reply(h, resp.status, resp.reason, resp.getheaders(), data, method)
        return True

    def _record(self, method: str, key: str, query: str, action: str, got: int,
                forwarded: bool) -> None:
        with self._lock:
            self.log.append(Seen(method, key, query, action, got, forwarded))


def _read_chunked(rfile: Any) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


def _reply(h: Any, status: int, reason: str, headers: list[tuple[str, str]], data: bytes,
           method: str) -> None:
    out = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers:
        low = name.lower()
        if low in _HOP or (low == "content-length" and method != "HEAD"):
            continue
        out.append(f"{name}: {value}")
    if method != "HEAD":
        out.append(f"Content-Length: {len(data)}")
    h.wfile.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
    if method != "HEAD":
        h.wfile.write(data)
    h.wfile.flush()


def random_faults(rate: float, seed: int, delay_s: float = 0.05,
                  methods: tuple[str, ...] = ("PUT", "GET", "HEAD", "POST", "DELETE")) -> Policy:
    """Each request of these methods is faulted with probability `rate`: drop, 503 or delay
    (and, for PUTs, which are idempotent, drop_response and truncate); the rest pass.

    The draw depends only on (seed, method, key, n), not on the order in which concurrent
    requests arrive, so a run sees the same faults each time.
    """

    def policy(method: str, key: str, n: int) -> Action:
        rng = random.Random(f"{seed}:{method}:{key}:{n}")
        if method not in methods or rng.random() >= rate:
            return "pass"
        kinds: list[Action] = ["drop", "slowdown", ("delay", delay_s)]
        if method == "PUT":
            kinds += ["drop_response", "truncate"]
        return rng.choice(kinds)

    return policy


# -- as a pytest plugin (`pytest_plugins = ["s3server", "faultproxy"]`) -----------------------

try:
    import pytest
except ImportError:  # usable without pytest, e.g. from a bench script
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture
    def s3_proxy(s3_server: Any) -> Any:
        """A fault-free proxy to the session's S3 server; tests set its policy."""
        def store_short(path: str, body: bytes) -> str:
            bucket, _, key = path.lstrip("/").partition("/")
            reply = s3_server.client().put_object(Bucket=bucket, Key=key, Body=body)
            return str(reply["ETag"])

        proxy = FaultProxy(s3_server.endpoint, store_short=store_short)
        try:
            yield proxy
        finally:
            proxy.stop()
