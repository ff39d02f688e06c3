"""POST throughput of the HTTP clients a webhook delivery could use, measured in one run.

    .venv/bin/python bench/http_clients.py [--posts N] [--concurrency C] [--repeat K]

Every client sends the same ~1 KB JSON body N times, C at a time, to one receiver on 127.0.0.1,
with the headers a webhook delivery carries:

- httpx: a plain ``httpx.AsyncClient``;
- httpx-aiohttp: httpx over the aiohttp transport (``httpx_aiohttp.HttpxAiohttpClient``);
- aiohttp: a plain ``aiohttp.ClientSession``;
- layer: ``wordclaw_mcp.http.HttpClient.request``, as the webhook adapter calls it: the SSRF
  resolver on (the URL names ``localhost``, so it is resolved and checked), ``allow_private``
  on because the receiver is loopback, a deadline and a bounded read per request;
- webhook adapter: ``WebhookAdapter.deliver`` on that layer, which adds JSON encoding of the
  payload and a Standard Webhooks signature per delivery.

Every POST must be answered 200, or the run fails. The receiver is a low-level aiohttp.web
server in a child process (uvloop when installed), so this process measures only the client,
and each client gets a few hundred untimed POSTs first to open its connections. With
``--repeat`` the clients take turns, in a rotated order each round. Absolute figures depend on
whatever else the machine is doing: compare the ratios to aiohttp, measured back to back. The
client process's CPU time per POST is printed too: it moves less than throughput when other
work shares the machine.

Needs the project's ``bench`` extra (httpx-aiohttp). Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import aiohttp
import anyio
import httpx
from httpx_aiohttp import HttpxAiohttpClient
from scratch import BenchmarkFailed, deadline  # bench/scratch.py, beside this script

from queue_worker.adapters import AdapterOptions, DeliveryTarget, WebhookAdapter
from queue_worker.adapters.webhook import USER_AGENT
from wordclaw_mcp.http import HttpClient

SCRIPT = os.path.abspath(__file__)
TIMEOUT = 15.0
WARMUP = 200
SIGNING_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes

# Ways to send one POST: each gets the URL, and returns an async "post once" plus its closer.
Sender = Callable[[str], Awaitable[tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]]]]]


def payload() -> dict[str, Any]:
    """A content.distributed payload whose JSON is about 1 KB."""
    return {
        "type": "content.distributed",
        "data": {
            "contentItemId": "0f8fad5b-d9cb-469f-a165-70867728950e",
            "version": 3,
            "title": "Hello from WordClaw",
            "summary": "A short summary of the item.",
            "canonicalUrl": "https://example.com/posts/hello",
            "body": "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 14,
            "bodyFormat": "markdown",
            "metadata": {"lang": "en", "tags": ["news", "release"]},
        },
    }


def encoded() -> bytes:
    return json.dumps(payload(), separators=(",", ":"), ensure_ascii=False).encode()


def headers() -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": "msg_2fb5b2a4d6c94c3f9a1d",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "accept-encoding": "identity",
    }


async def plain_httpx(url: str):
    client = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False)
    body, sent = encoded(), headers()

    async def post() -> int:
        return (await client.post(url, content=body, headers=sent)).status_code

    return post, client.aclose


async def httpx_over_aiohttp(url: str):
    client = HttpxAiohttpClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False)
    body, sent = encoded(), headers()

    async def post() -> int:
        return (await client.post(url, content=body, headers=sent)).status_code

    return post, client.aclose


async def plain_aiohttp(url: str):
    session = aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=TIMEOUT))
    body, sent = encoded(), headers()

    async def post() -> int:
        async with session.post(url, data=body, headers=sent, allow_redirects=False) as response:
            await response.read()
            return response.status

    return post, session.close


async def layer(url: str):
    client = HttpClient(allow_private=True)
    body, sent = encoded(), headers()

    async def post() -> int:
        return (await client.request("POST", url, headers=sent, body=body, timeout=TIMEOUT)).status

    return post, client.aclose


async def webhook_adapter(url: str):
    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=TIMEOUT))
    target = DeliveryTarget(
        id=uuid.UUID(int=0), name="bench", config={"url": url}, secrets={"signingSecret": SIGNING_SECRET}
    )
    message = payload()

    async def post() -> int:
        result = await adapter.deliver(message, target, message_id="msg_bench")
        if not result.succeeded:
            raise BenchmarkFailed(f"webhook adapter: {result.error}")
        return result.status_code or 0

    return post, adapter.aclose


# (label, sender, whether its URL names localhost rather than 127.0.0.1)
CLIENTS: list[tuple[str, Sender, bool]] = [
    ("httpx", plain_httpx, False),
    ("httpx-aiohttp", httpx_over_aiohttp, False),
    ("aiohttp", plain_aiohttp, False),
    ("layer (HttpClient.request)", layer, True),
    ("webhook adapter (deliver)", webhook_adapter, True),
]
REFERENCE = "aiohttp"


@dataclass(frozen=True)
class Figure:
    rate: float  # POSTs per second
    cpu_us: float  # this process's CPU time per POST, in microseconds


async def measure(sender: Sender, url: str, posts: int, concurrency: int) -> Figure:
    """Throughput over ``posts`` POSTs, ``concurrency`` at a time, after an untimed warm-up."""
    post, close = await sender(url)
    try:
        await burst(post, WARMUP, concurrency)
        cpu = time.process_time()
        elapsed = await burst(post, posts, concurrency)
        return Figure(posts / elapsed, (time.process_time() - cpu) / posts * 1e6)
    finally:
        await close()


async def burst(post: Callable[[], Awaitable[int]], count: int, concurrency: int) -> float:
    """Seconds to send ``count`` POSTs, ``concurrency`` at a time; every one must be answered 200."""
    remaining = count
    failures: list[int] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            if (status := await post()) != 200:
                failures.append(status)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - started
    if failures:
        raise BenchmarkFailed(f"{len(failures)} POSTs were answered {sorted(set(failures))}, not 200")
    return elapsed


# --- the receiver ---------------------------------------------------------------------------


def serve_receiver(fd: int) -> None:
    """The child process: answer every request 200 with a tiny body, on the socket inherited as ``fd``."""
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        server = web.Server(handle, access_log=None)
        await asyncio.get_running_loop().create_server(server, sock=sock, backlog=1024)
        await asyncio.Event().wait()  # until SIGTERM

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


@asynccontextmanager
async def receiver_process() -> AsyncIterator[int]:
    """A receiver in a child process, so it shares no interpreter lock with the client; its port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    try:
        process = await anyio.open_process(
            [sys.executable, SCRIPT, "--serve-receiver", str(listener.fileno())],
            pass_fds=(listener.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    finally:
        listener.close()  # the child has its own copy
    try:
        yield port
    finally:
        with anyio.CancelScope(shield=True):
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def wait_until_answering(port: int) -> None:
    async with aiohttp.ClientSession(trust_env=False) as session:
        with anyio.move_on_after(20):
            while True:
                try:
                    async with session.post(f"http://127.0.0.1:{port}/", data=b"{}") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await anyio.sleep(0.1)
    raise BenchmarkFailed("the receiver did not answer within 20 s")


# --- the run --------------------------------------------------------------------------------


def machine() -> str:
    load = " ".join(f"{figure:.2f}" for figure in os.getloadavg())
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {os.cpu_count()} cores, load {load}, "
        f"Python {platform.python_version()}, httpx {version('httpx')}, aiohttp {version('aiohttp')}, "
        f"httpx-aiohttp {version('httpx-aiohttp')}"
    )


async def run(args: argparse.Namespace) -> dict[str, list[Figure]]:
    figures: dict[str, list[Figure]] = {label: [] for label, _, _ in CLIENTS}
    async with receiver_process() as port:
        await wait_until_answering(port)
        urls = {False: f"http://127.0.0.1:{port}/hooks/bench", True: f"http://localhost:{port}/hooks/bench"}
        for round_ in range(args.repeat):
            turn = CLIENTS[round_ % len(CLIENTS) :] + CLIENTS[: round_ % len(CLIENTS)]
            for label, sender, named in turn:
                with deadline(args.timeout, label):
                    figure = await measure(sender, urls[named], args.posts, args.concurrency)
                figures[label].append(figure)
                print(f"  round {round_ + 1}, {label}: {figure.rate:,.0f} POSTs/s, {figure.cpu_us:.0f} µs CPU each")
    return figures


def report(figures: dict[str, list[Figure]], args: argparse.Namespace) -> None:
    """Medians over the rounds; each ratio is taken within a round, against aiohttp's figure of that round."""
    reference = figures[REFERENCE]
    print()
    print(f"{args.posts:,} POSTs of {len(encoded()):,} bytes at concurrency {args.concurrency}, {args.repeat} round(s)")
    header = f"{'client':<28} {'POSTs/s':>8} {'x aiohttp':>9} {'CPU µs/POST':>12} {'x aiohttp':>9}"
    print(header)
    print("-" * len(header))
    for label, _, _ in CLIENTS:
        mine = figures[label]
        rate = statistics.median(figure.rate for figure in mine)
        cpu = statistics.median(figure.cpu_us for figure in mine)
        rate_ratio = statistics.median(a.rate / b.rate for a, b in zip(mine, reference, strict=True))
        cpu_ratio = statistics.median(a.cpu_us / b.cpu_us for a, b in zip(mine, reference, strict=True))
        print(f"{label:<28} {rate:>8,.0f} {rate_ratio:>8.2f}x {cpu:>12,.0f} {cpu_ratio:>8.2f}x")
    if args.repeat > 1:
        print("(medians of the rounds; each ratio is to aiohttp in the same round)")
    print("CPU µs/POST: this process's CPU time per timed POST; the receiver's is not counted.")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=5000, help="timed POSTs per client and round (default 5000)")
    parser.add_argument("--concurrency", type=int, default=20, help="POSTs in flight at once (default 20)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, each client once per round (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per measurement (default 120)")
    parser.add_argument("--serve-receiver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_receiver is None and min(args.posts, args.concurrency, args.repeat) < 1:
        parser.error("--posts, --concurrency and --repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_receiver is not None:
        serve_receiver(args.serve_receiver)
        return 0
    print(f"before: {machine()}", flush=True)
    try:
        figures = anyio.run(run, args)
    except BenchmarkFailed as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(f"after:  {machine()}", flush=True)
    report(figures, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
