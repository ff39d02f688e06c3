"""A local webhook receiver: the demo's destination and the tests' HTTP peer.

A real HTTP server on 127.0.0.1 that records each request. It can be told to answer with a
given status and body, to answer slowly, to trickle its answer out byte by byte, to send a huge
body, or to hang until it is closed.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    # The client's address and port: requests with the same one came over the same connection.
    peer: tuple[str, int] | None = None


@dataclass
class Behaviour:
    status: int = 200
    body: bytes = b'{"ok":true}'
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    delay: float = 0.0
    hang: bool = False
    # When set, each request is answered only once the gate opens (or the receiver closes).
    gate: threading.Event | None = None
    # Seconds between bytes: the whole answer (status line, headers, body) trickles out.
    drip: float = 0.0
    # The body is ``body`` this many times over, written as long as the client keeps reading.
    repeat: int = 1


class WebhookReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None) -> None:
        self.behaviour = Behaviour()
        self.requests: list[ReceivedRequest] = []
        self.answered = 0  # requests whose handling is over, answered in full or not
        self.body_bytes_sent = 0  # body bytes the clients' connections accepted
        # Requests received and not yet being answered, and the most ever at once, for tests of
        # concurrency limits. A request stops counting when its answer starts: once the client has
        # the answer it may send the next, before this thread gets round to counting it out.
        self.in_flight = 0
        self.most_in_flight = 0
        self._changed = threading.Condition()
        self._closing = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as real endpoints do, so tests see the client's connection reuse.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                with receiver._changed:
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                self._counted = True
                try:
                    self._handle(receiver.behaviour)
                except OSError:
                    self.close_connection = True  # the client hung up, as tests of slow answers want
                finally:
                    self._answering()
                    with receiver._changed:
                        receiver.answered += 1
                        receiver._changed.notify_all()

            def _answering(self) -> None:
                if self._counted:
                    self._counted = False
                    with receiver._changed:
                        receiver.in_flight -= 1

            def _handle(self, behaviour: Behaviour) -> None:
                length = int(self.headers.get("content-length", 0))
                request = ReceivedRequest(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    tuple(self.client_address[:2]),
                )
                with receiver._changed:
                    receiver.requests.append(request)
                    receiver._changed.notify_all()
                if behaviour.hang:
                    self.close_connection = True
                    receiver._closing.wait()
                    return
                if behaviour.delay:
                    receiver._closing.wait(behaviour.delay)
                if behaviour.gate is not None:
                    while not (behaviour.gate.wait(0.05) or receiver._closing.is_set()):
                        pass
                self._answering()
                if behaviour.drip:
                    self._drip(behaviour)
                    return
                self.send_response(behaviour.status)
                for name, value in behaviour.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(behaviour.body) * behaviour.repeat))
                self.end_headers()
                for _ in range(behaviour.repeat):
                    if receiver._closing.is_set():
                        self.close_connection = True
                        return
                    self.wfile.write(behaviour.body)
                    with receiver._changed:
                        receiver.body_bytes_sent += len(behaviour.body)

            def _drip(self, behaviour: Behaviour) -> None:
                self.close_connection = True
                reason = self.responses.get(behaviour.status, ("",))[0]
                head = [f"HTTP/1.1 {behaviour.status} {reason}", "connection: close"]
                head += [f"{name}: {value}" for name, value in behaviour.headers.items()]
                head.append(f"content-length: {len(behaviour.body)}")
                answer = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + behaviour.body
                for index in range(len(answer)):
                    self.wfile.write(answer[index : index + 1])
                    if receiver._closing.wait(behaviour.drip):
                        return

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._scheme = "https" if tls is not None else "http"
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="webhook-receiver", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host}:{port}/hooks/wordclaw"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which must have started
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Block until ``count`` requests have arrived, or raise TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.requests)} of {count} requests arrived within {timeout} s")
                self._changed.wait(remaining)
            return list(self.requests)

    def wait_answered(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` requests have been handled to the end, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.answered < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.answered} of {count} requests were answered within {timeout} s")
                self._changed.wait(remaining)
