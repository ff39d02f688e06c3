"""What the local fakes of the social networks' APIs share: a JSON HTTP server on 127.0.0.1 in a
thread, answering each POST from a subclass's ``post`` under one lock."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    # Close the connection without answering (the post was made: a lost answer).
    drop: bool = False
    # Never answer, until the fake closes: a lost answer as a client with a deadline sees it.
    hang: bool = False
    # Answer this many seconds later (outside the fake's lock, so others are served meanwhile).
    delay: float = 0.0


class FakeJsonApi:
    content_type = "application/json"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def post(self, path: str, headers: Message, raw: bytes) -> Reply:
        raise NotImplementedError

    def get(self, path: str, headers: Message) -> Reply:
        return Reply(404, {"error": "Not Found"})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                with fake._lock:
                    reply = fake.post(self.path, self.headers, raw)
                self._answer(reply)

            def do_GET(self) -> None:
                with fake._lock:
                    reply = fake.get(self.path, self.headers)
                self._answer(reply)

            def _answer(self, reply: Reply) -> None:
                if reply.delay and fake._closing.wait(reply.delay):
                    return
                if reply.hang:
                    fake._closing.wait(30)
                    return
                if reply.drop:
                    self.close_connection = True
                    return
                payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", fake.content_type)
                self.send_header("content-length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler
