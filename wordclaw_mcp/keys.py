"""The stored secrets against the configured keys: checked at start, resealed by ``wordclaw keys rotate``.

Every ciphertext is a target's secrets (``distribution_targets.secret_ciphertext``, bound to
``target:<id>``) or a channel's login session (``channel_sessions.ciphertext``, bound to
``session:<id>``). A server or worker that cannot decrypt one of them refuses to start
(:func:`verify_stored_secrets`), rather than failing that target's deliveries later. Rotating
keys is: put the new key first in WORDCLAW_SECRET_KEYS of every process, run :func:`rotate_keys`
(which seals everything again under it, binding tokens written before binding existed), then
drop the old key. Both read in batches ordered by id, with keyset pagination; the statements
are in the keys section of queries.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from . import queries
from .database import transaction
from .errors import DistributionError
from .secrets import SecretBox, session_binding, target_binding

BATCH_SIZE = 500
# Where every keyset walk starts: below any id (targets get random ids, never this one).
FIRST_ID = UUID(int=0)
# How many target names an error message gives.
NAMED = 5


@dataclass(frozen=True)
class _Kind:
    """One kind of stored ciphertext: where it is read, locked and written, and its binding."""

    read: str
    lock: str
    write: str
    binding: Callable[[object], str]
    fingerprinted: bool  # whether a fingerprint of the secrets is stored beside them


TARGET_SECRETS = _Kind(
    queries.TARGET_CIPHERTEXTS,
    queries.LOCK_TARGET_CIPHERTEXTS,
    queries.RESEAL_TARGET_CIPHERTEXTS,
    target_binding,
    fingerprinted=True,
)
SESSIONS = _Kind(
    queries.SESSION_CIPHERTEXTS,
    queries.LOCK_SESSION_CIPHERTEXTS,
    queries.RESEAL_SESSION_CIPHERTEXTS,
    session_binding,
    fingerprinted=False,
)


@dataclass(frozen=True)
class RotationReport:
    """What one ``rotate_keys`` resealed."""

    targets: int = 0  # target secrets
    sessions: int = 0  # channel login sessions

    def summary(self) -> str:
        return f"resealed {self.targets} target secret(s) and {self.sessions} session(s) under the first key"


async def verify_stored_secrets(pool: asyncpg.Pool, box: SecretBox, *, batch_size: int = BATCH_SIZE) -> None:
    """Refuse (DistributionError) if ``box`` cannot decrypt every stored ciphertext for its own row.

    Every target's secrets, active or not, and every channel session. SECRET_KEY_MISMATCH when
    some cannot be decrypted with these keys; otherwise SECRET_ROW_MISMATCH when some were sealed
    for another row. The messages name targets, never a secret or a ciphertext.
    """
    unreadable: list[str] = []  # the names of the targets concerned, one per ciphertext
    misplaced: list[str] = []
    for kind in (TARGET_SECRETS, SESSIONS):
        last = FIRST_ID
        while rows := await pool.fetch(kind.read, last, batch_size):
            for row in rows:
                try:
                    box.decrypt(row["ciphertext"], bound_to=kind.binding(row["id"]))
                except DistributionError as exc:
                    (misplaced if exc.code == "SECRET_ROW_MISMATCH" else unreadable).append(row["name"])
            last = rows[-1]["id"]
    if unreadable:
        raise DistributionError(
            "SECRET_KEY_MISMATCH",
            f"{len(unreadable)} stored secret(s) cannot be decrypted with this process's keys "
            f"(WORDCLAW_SECRET_KEYS): those of {_names(unreadable)}.",
            "Give this process the key the secrets were written with in WORDCLAW_SECRET_KEYS (the list the "
            "other processes use), or run `wordclaw keys rotate` from a process that has both the old and "
            "the new key, so that everything is sealed under the new one.",
        )
    if misplaced:
        raise DistributionError(
            "SECRET_ROW_MISMATCH",
            f"{len(misplaced)} stored secret(s) were sealed for another row and would not be used: "
            f"those of {_names(misplaced)}.",
            "Someone copied a ciphertext between rows: find out who can write to the database. Then clear "
            "those secrets (set the target's secret_ciphertext to NULL, delete its channel_sessions row) "
            "and give the targets their secrets again, by registering them anew.",
        )


async def rotate_keys(
    pool: asyncpg.Pool,
    box: SecretBox,
    *,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int, int], object] | None = None,
) -> RotationReport:
    """Seal every stored ciphertext again under ``box``'s first key, bound to its row.

    Nothing is written unless every ciphertext can be resealed (:func:`verify_stored_secrets`
    first). Then each batch is one short transaction that locks its rows, reseals them as they
    are once locked (with the targets' fingerprints, which the first key keys), and writes them
    back in one statement, so deliveries, rotate_target_secret and session refreshes carry on
    meanwhile and nothing they write is lost. ``progress(done, total)`` is called after each
    batch. Running it again is harmless.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    await verify_stored_secrets(pool, box, batch_size=batch_size)
    counts = await pool.fetchrow(queries.STORED_SECRET_COUNTS)
    total = counts["targets"] + counts["sessions"]
    done = 0

    def resealed(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, max(total, done))  # rows stored meanwhile are counted too

    targets = await _reseal(pool, box, TARGET_SECRETS, batch_size, resealed)
    sessions = await _reseal(pool, box, SESSIONS, batch_size, resealed)
    if progress is not None and 0 < done < total:
        progress(done, done)  # rows deleted meanwhile: the end is reached all the same
    return RotationReport(targets=targets, sessions=sessions)


async def _reseal(
    pool: asyncpg.Pool, box: SecretBox, kind: _Kind, batch_size: int, resealed: Callable[[int], None]
) -> int:
    """Every ciphertext of ``kind`` sealed again, batch after batch; how many."""
    count, last = 0, FIRST_ID
    while True:
        async with pool.acquire() as conn, transaction(conn):
            rows = await conn.fetch(kind.lock, last, batch_size)
            if not rows:
                return count
            ids = [row["id"] for row in rows]
            sealed = [box.reseal(row["ciphertext"], bound_to=kind.binding(row["id"])) for row in rows]
            columns = [ids, sealed]
            if kind.fingerprinted:  # keyed by the first key: recomputed under the new one
                columns.append([_fingerprint(box, row["ciphertext"], kind.binding(row["id"])) for row in rows])
            await conn.execute(kind.write, *columns)
        count, last = count + len(rows), ids[-1]
        resealed(len(rows))


def _fingerprint(box: SecretBox, ciphertext: bytes, bound_to: str) -> str:
    return box.fingerprint(box.decrypt(ciphertext, bound_to=bound_to), bound_to=bound_to)


def _names(names: list[str]) -> str:
    shown = ", ".join(f"target {name!r}" for name in names[:NAMED])
    return shown + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
