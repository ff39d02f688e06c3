"""Webhook receivers for the benchmarks: a small uvicorn app in a child process on 127.0.0.1.

    .venv/bin/python bench/receivers.py FD DELAY   (how the parent starts the child; not run by hand)

The receiver answers every POST 200 ``{"ok":true}`` (after ``DELAY`` seconds) and keeps a tally
per path: POSTs, bytes of body, and distinct ``webhook-id`` headers. A GET on the same path
returns that tally as JSON, so a benchmark can check that every delivery arrived, once, with
the receiver's CPU time so far, so a benchmark can tell what its deliveries cost the receiver.

It runs in a child process so that it shares no interpreter lock with the client being measured.
The tests' ``WebhookReceiver`` is too slow to be a fast target: it is a ThreadingHTTPServer that
writes the status line and headers apart from the body, so Nagle's algorithm and the client's
delayed ACK hold every answer about 40 ms.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.abc import Process
from scratch import BenchmarkFailed  # bench/scratch.py, beside this module

SCRIPT = str(Path(__file__).resolve())
OK_BODY = b'{"ok":true}'


@dataclass
class Tally:
    """What one path has received."""

    posts: int = 0
    bytes: int = 0
    ids: set[bytes] = field(default_factory=set)


@dataclass(frozen=True)
class Received:
    """A path's tally as the parent reads it."""

    posts: int
    distinct_ids: int
    bytes: int
    cpu_seconds: float  # the receiver process's CPU time so far, all paths together


# --- the child ------------------------------------------------------------------------------


def receiver_app(delay: float) -> Callable[..., Awaitable[None]]:
    """An ASGI app: POST is counted and answered 200 ``{"ok":true}`` after ``delay`` s; GET returns the tally."""
    tallies: dict[str, Tally] = {}
    ok_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(OK_BODY)).encode())]

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        path = scope["path"]
        if scope["method"] == "GET":
            tally = tallies.get(path, Tally())
            body = json.dumps(
                {
                    "posts": tally.posts,
                    "distinctIds": len(tally.ids),
                    "bytes": tally.bytes,
                    "cpuSeconds": time.process_time(),
                }
            ).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        # Counted when it arrives, before the answer: a delivery the client gave up on still shows.
        tally = tallies.setdefault(path, Tally())
        tally.posts += 1
        tally.bytes += size
        for name, value in scope["headers"]:
            if name == b"webhook-id":
                tally.ids.add(value)
                break
        if delay:
            await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": 200, "headers": ok_headers})
        await send({"type": "http.response.body", "body": OK_BODY})

    return app


def serve_receiver(fd: int, delay: float) -> None:
    """The child process: serve ``receiver_app`` on the listening socket inherited as ``fd``."""
    import uvicorn

    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(receiver_app(delay), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


# --- the parent -----------------------------------------------------------------------------


def receiver_stack() -> str:
    """What serves the receiver: uvicorn picks httptools and uvloop when they are installed, else h11 and asyncio."""
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn {version('uvicorn')} ({parser}, {loop})"


@asynccontextmanager
async def receiver_process(name: str, delay: float, log: Path) -> AsyncIterator[str]:
    """A receiver in a child process; the URL ``/hooks/{name}`` on it. Any other path is tallied apart."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    port = listener.getsockname()[1]
    try:
        with log.open("wb") as sink:
            process = await anyio.open_process(
                [sys.executable, SCRIPT, str(listener.fileno()), str(delay)],
                pass_fds=(listener.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
    finally:
        listener.close()  # the child has its own copy
    try:
        url = f"http://127.0.0.1:{port}/hooks/{name}"
        await _wait_until_answering(url, log)
        yield url
    finally:
        await end_process(process, grace=10)


async def received(url: str) -> Received:
    """The tally of the path ``url`` names."""
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(url)
    if response.status_code != 200:
        raise BenchmarkFailed(f"the receiver answered GET {url} with {response.status_code}")
    tally = response.json()
    return Received(tally["posts"], tally["distinctIds"], tally["bytes"], tally["cpuSeconds"])


async def _wait_until_answering(url: str, log: Path) -> None:
    # A GET, so that the probe leaves no POST in the tally.
    async with httpx.AsyncClient(trust_env=False) as client:
        with anyio.move_on_after(20):
            while True:
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await anyio.sleep(0.1)
    output = (await anyio.Path(log).read_text())[-2000:]
    raise BenchmarkFailed(f"receiver {url} did not answer within 20 s: {output}")


async def end_process(process: Process, *, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; shielded, so an interrupted run still reaps it."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


if __name__ == "__main__":
    serve_receiver(int(sys.argv[1]), float(sys.argv[2]))
