"""What the benchmarks share: a database of their own for each measurement, and a deadline."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import asyncpg

from wordclaw_mcp import queries


class BenchmarkFailed(RuntimeError):
    """A run that did not end as it must: its figures would be meaningless."""


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """``anyio.fail_after``, reported as a failed benchmark rather than a bare TimeoutError."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise BenchmarkFailed(f"{what} did not finish within {seconds:g} s (raise --timeout?)") from None


@asynccontextmanager
async def scratch_database(admin_url: str, prefix: str) -> AsyncIterator[str]:
    """A new, empty database for one measurement; its URL. Dropped however the block ends."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(queries.create_database(name))
        try:
            yield with_database(admin_url, name)
        finally:
            with anyio.CancelScope(shield=True):
                await admin.execute(queries.drop_database(name))
    finally:
        await admin.close()


def with_database(url: str, name: str) -> str:
    """``url`` naming the database ``name`` instead, keeping its query (a socket path, say)."""
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query else "")
