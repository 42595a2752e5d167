"""A fault-injecting HTTP proxy in front of an S3-compatible server (moto), on 127.0.0.1, in a thread.

    proxy = FaultyS3(upstream="http://127.0.0.1:5000", rule=every_nth(3, "503"))
    proxy.url  ->  point s3_endpoint_url here; proxy.counts says what was injected

A rule sees (method, path, request number) and returns None (forward) or a fault:
"503" (S3 SlowDown, retryable), "500" (InternalError, retryable), "drop" (close the connection without
an answer), "403" (AccessDenied, permanent).
"""
from __future__ import annotations

import collections
import http.client
import http.server
import socket
import threading
import urllib.parse
from typing import Callable, Optional

Rule = Callable[[str, str, int], Optional[str]]

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}


def every_nth(n: int, fault: str, methods: tuple[str, ...] = ()) -> Rule:
    """Fault every n-th request (of the given methods, or all); the others pass."""
    def rule(method: str, path: str, i: int) -> Optional[str]:
        if methods and method not in methods:
            return None
        return fault if i % n == 0 else None
    return rule


class FaultyS3:
    def __init__(self, upstream: str, rule: Rule | None = None):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rule: Rule = rule or (lambda m, p, i: None)
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._n = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy._n += 1
                    i = proxy._n
                fault = proxy.rule(self.command, self.path, i)
                proxy.counts[fault or "forwarded"] += 1
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault:
                    status, code, message = _ERRORS[fault]
                    data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                            f"<Message>{message}</Message><RequestId>fault-{i}</RequestId></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD: the object's size, as upstream said; else the body we forward
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultyS3":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
