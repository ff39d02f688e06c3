"""Stored secrets against the keys: each ciphertext bound to its row, ``wordclaw keys rotate``
resealing everything under the first key in batches, and processes that refuse to start with
keys that cannot read what is stored. Real PostgreSQL, real HTTP peers."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import anyio
import asyncpg
import pytest
from cryptography.fernet import Fernet
from mcp import Client
from standardwebhooks import Webhook

from queue_worker.worker import Worker
from tests.fake_bluesky import FakeBluesky
from tests.helpers import eventually, new_signing_secret
from wordclaw_mcp import cli
from wordclaw_mcp.config import Settings
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.keys import rotate_keys, verify_stored_secrets
from wordclaw_mcp.models import (
    CreateDistributionPlanInput,
    PlanRef,
    RegisterTargetInput,
    Target,
    UpsertContentItemInput,
)
from wordclaw_mcp.receiver import WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.secrets import SecretBox, session_binding, target_binding
from wordclaw_mcp.server import build_server
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

# A target's ciphertext written as someone with access to the database would.
SET_CIPHERTEXT = "UPDATE distribution_targets SET secret_ciphertext = $2 WHERE id = $1"


@asynccontextmanager
async def opened(settings: Settings, *keys: str) -> AsyncIterator[Runtime]:
    """A runtime on the same database holding exactly ``keys``."""
    async with Runtime.open(replace(settings, secret_keys=keys)) as runtime:
        yield runtime


async def hook(service: DistributionService, url: str, signing_secret: str | None = None) -> Target:
    return await service.register_target(
        RegisterTargetInput(
            name=f"hook-{uuid.uuid4().hex[:8]}",
            channel_type="webhook",
            config={"url": url},
            secrets={"signingSecret": signing_secret} if signing_secret else None,
        )
    )


async def plan_to(service: DistributionService, target_ids: list[uuid.UUID]) -> uuid.UUID:
    item = await service.upsert_content_item(UpsertContentItemInput(title="Keys", body="Turned."))
    plan = await service.create_distribution_plan(
        CreateDistributionPlanInput(content_item_id=item.id, target_ids=target_ids)
    )
    return plan.id


async def stored(db: asyncpg.Connection, target_id: uuid.UUID) -> bytes:
    return await db.fetchval("SELECT secret_ciphertext FROM distribution_targets WHERE id = $1", target_id)


def signed_by(request, signing_secret: str) -> bool:
    try:
        Webhook(signing_secret).verify(request.body, request.headers)
    except Exception:
        return False
    return True


# --- binding -----------------------------------------------------------------------------------


async def test_a_ciphertext_copied_to_another_row_does_not_decrypt_there(
    service: DistributionService,
    runtime: Runtime,
    worker: Worker,
    receiver: WebhookReceiver,
    db: asyncpg.Connection,
) -> None:
    mine, theirs = new_signing_secret(), new_signing_secret()
    source = await hook(service, receiver.url, mine)
    victim = await hook(service, receiver.url + "/other", theirs)
    await db.execute(
        "UPDATE distribution_targets SET secret_ciphertext = "
        "(SELECT secret_ciphertext FROM distribution_targets WHERE id = $1) WHERE id = $2",
        source.id,
        victim.id,
    )
    copied = await stored(db, victim.id)
    assert runtime.secrets.decrypt(copied, bound_to=target_binding(source.id)) == {"signingSecret": mine}
    with pytest.raises(DistributionError) as refused:
        SecretBox(list(runtime.settings.secret_keys)).decrypt(copied, bound_to=target_binding(victim.id))
    assert refused.value.code == "SECRET_ROW_MISMATCH"

    # A worker refuses to start on it, naming the target and never the secret ...
    with pytest.raises(DistributionError) as refused:
        await worker.check_secret_keys()
    assert refused.value.code == "SECRET_ROW_MISMATCH"
    assert repr(victim.name) in refused.value.message and repr(source.name) not in refused.value.message
    assert mine not in json.dumps(refused.value.to_dict())

    # ... and one already running sends nothing to the victim with the copied secret.
    plan_id = await plan_to(service, [source.id, victim.id])
    assert await worker.run_once() == 2
    [request] = receiver.requests
    assert request.path == "/hooks/wordclaw" and signed_by(request, mine)
    jobs = {job.target_id: job for job in (await service.get_plan(PlanRef(plan_id=plan_id))).jobs}
    assert jobs[source.id].status == "succeeded"
    assert (jobs[victim.id].status, jobs[victim.id].attempt) == ("queued", 0)
    assert jobs[victim.id].last_error.startswith("SECRET_ROW_MISMATCH")


# --- rotation ----------------------------------------------------------------------------------


async def test_after_a_rotation_every_target_works_with_the_new_key_alone(
    settings: Settings,
    service: DistributionService,
    worker: Worker,
    receiver: WebhookReceiver,
    pds: FakeBluesky,
    db: asyncpg.Connection,
) -> None:
    [old], new = settings.secret_keys, Fernet.generate_key().decode()
    signing = [new_signing_secret(), new_signing_secret(), new_signing_secret()]
    hooks = [await hook(service, f"{receiver.url}/{index}", secret) for index, secret in enumerate(signing)]
    # The last was stored before ciphertexts were bound to their row: the bare secrets.
    legacy = hooks[-1]
    await db.execute(
        SET_CIPHERTEXT,
        legacy.id,
        Fernet(old.encode()).encrypt(json.dumps({"signingSecret": signing[-1]}).encode()),
    )
    skeets = await service.register_target(
        RegisterTargetInput(
            name="skeets",
            channel_type="bluesky",
            config={"baseUrl": pds.base_url, "identifier": pds.account.identifier},
            secrets={"appPassword": pds.account.app_password},
        )
    )
    await plan_to(service, [skeets.id])
    assert await worker.run_once() == 1  # logs in: its session is stored too
    assert pds.account.sessions == 1
    target_ids = [target.id for target in [*hooks, skeets]]
    before = {target_id: await stored(db, target_id) for target_id in target_ids}

    async with opened(settings, new) as only_new:
        with pytest.raises(DistributionError) as refused:
            await Worker(only_new).check_secret_keys()
        assert refused.value.code == "SECRET_KEY_MISMATCH"
        assert refused.value.message.startswith("5 stored secret(s)")  # 4 targets, 1 session

    async with opened(settings, new, old) as both:
        report = await rotate_keys(both.pool, both.secrets)
    assert (report.targets, report.sessions) == (4, 1)

    new_box, old_box = SecretBox([new]), SecretBox([old])
    for target_id in target_ids:
        ciphertext = await stored(db, target_id)
        assert ciphertext != before[target_id]
        assert new_box.decrypt(ciphertext, bound_to=target_binding(target_id))
        with pytest.raises(DistributionError):
            old_box.decrypt(ciphertext, bound_to=target_binding(target_id))
    fingerprints = dict(await db.fetch("SELECT id, secret_fingerprint FROM distribution_targets"))
    for target_id, secret in zip([target.id for target in hooks], signing, strict=True):
        binding = target_binding(target_id)
        assert fingerprints[target_id] == new_box.fingerprint({"signingSecret": secret}, bound_to=binding)
    sealed = json.loads(Fernet(new.encode()).decrypt(await stored(db, legacy.id)))
    assert sealed == {"boundTo": target_binding(legacy.id), "secrets": {"signingSecret": signing[-1]}}
    session = await db.fetchval("SELECT ciphertext FROM channel_sessions WHERE target_id = $1", skeets.id)
    assert set(new_box.decrypt(session, bound_to=session_binding(skeets.id))) == {"accessJwt", "refreshJwt", "did"}

    async with opened(settings, new) as only_new:
        new_worker = Worker(only_new)
        await new_worker.check_secret_keys()
        plan_id = await plan_to(service, target_ids)
        assert await new_worker.run_once() == len(target_ids)
    plan = await service.get_plan(PlanRef(plan_id=plan_id))
    assert [job.status for job in plan.jobs] == ["succeeded"] * len(target_ids)
    by_path = {request.path: request for request in receiver.requests}
    for index, secret in enumerate(signing):
        assert signed_by(by_path[f"/hooks/wordclaw/{index}"], secret)
    assert pds.account.sessions == 1, "the resealed session was reused, not replaced by a new login"
    assert len(pds.account.records) == 2


async def test_a_rotation_goes_in_batches_each_committed_on_its_own(
    settings: Settings, service: DistributionService, db: asyncpg.Connection
) -> None:
    [old], new = settings.secret_keys, Fernet.generate_key().decode()
    targets = [await hook(service, "https://example.com/hook") for _ in range(5)]
    new_box = SecretBox([new])

    def resealed() -> list[uuid.UUID]:
        found = []
        for target_id, ciphertext in rows:
            try:
                new_box.decrypt(ciphertext, bound_to=target_binding(target_id))
            except DistributionError:
                continue
            found.append(target_id)
        return found

    class Interrupted(Exception):
        pass

    def interrupt(done: int, total: int) -> None:
        raise Interrupted

    calls: list[tuple[int, int]] = []
    async with opened(settings, new, old) as both:
        with pytest.raises(Interrupted):
            await rotate_keys(both.pool, both.secrets, batch_size=2, progress=interrupt)
        rows = await db.fetch("SELECT id, secret_ciphertext FROM distribution_targets")
        assert sorted(resealed()) == sorted(target.id for target in targets)[:2], "the first batch stays done"

        report = await rotate_keys(both.pool, both.secrets, batch_size=2, progress=lambda *at: calls.append(at))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert (report.targets, report.sessions) == (5, 0)
    rows = await db.fetch("SELECT id, secret_ciphertext FROM distribution_targets")
    assert len(resealed()) == 5


async def test_a_secret_rotated_while_its_batch_waits_is_the_one_resealed(
    settings: Settings, service: DistributionService, runtime: Runtime
) -> None:
    [old], new = settings.secret_keys, Fernet.generate_key().decode()
    target = await hook(service, "https://example.com/hook", new_signing_secret())
    fresh = new_signing_secret()
    # What rotate_target_secret writes, held uncommitted while the rotation reaches the row.
    rotating = await asyncpg.connect(settings.database_url)
    try:
        transaction = rotating.transaction()
        await transaction.start()
        await rotating.execute(
            SET_CIPHERTEXT,
            target.id,
            runtime.secrets.encrypt({"signingSecret": fresh}, bound_to=target_binding(target.id)),
        )
        async with opened(settings, new, old) as both, anyio.create_task_group() as tg:
            tg.start_soon(rotate_keys, both.pool, both.secrets)
            await eventually(
                lambda: rotating.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            )
            await transaction.commit()
    finally:
        await rotating.close()
    async with service.pool.acquire() as db:
        ciphertext = await stored(db, target.id)
    assert SecretBox([new]).decrypt(ciphertext, bound_to=target_binding(target.id)) == {"signingSecret": fresh}


async def test_wordclaw_keys_rotate_reseals_and_says_how_many(
    settings: Settings,
    service: DistributionService,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    [old], new = settings.secret_keys, Fernet.generate_key().decode()
    targets = [await hook(service, "https://example.com/hook") for _ in range(3)]
    monkeypatch.setenv("WORDCLAW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WORDCLAW_SECRET_KEYS", f"{new},{old}")
    monkeypatch.setenv("WORDCLAW_HOME", str(settings.home))

    assert await anyio.to_thread.run_sync(cli.main, ["keys", "rotate", "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == "resealed 3 target secret(s) and 0 session(s) under the first key\n"
    assert err == "", "no progress bar when stderr is not a terminal"
    for target in targets:
        SecretBox([new]).decrypt(await stored(db, target.id), bound_to=target_binding(target.id))

    # On a terminal, a progress bar on stderr; the summary still on stdout.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert await anyio.to_thread.run_sync(cli.main, ["keys", "rotate"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("resealed 3 target secret(s)")
    assert "resealing secrets" in err and "100%" in err

    # Keys that cannot read what is stored: one coded line, nothing written.
    monkeypatch.setenv("WORDCLAW_SECRET_KEYS", Fernet.generate_key().decode())
    assert await anyio.to_thread.run_sync(cli.main, ["keys", "rotate"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("wordclaw: SECRET_KEY_MISMATCH: 3 stored secret(s)")


# --- refusing to start -------------------------------------------------------------------------


async def test_a_worker_and_a_server_that_cannot_decrypt_one_stored_secret_refuse_to_start(
    settings: Settings,
    service: DistributionService,
    worker: Worker,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await hook(service, "https://example.com/readable")
    other_key = Fernet.generate_key().decode()
    secret = new_signing_secret()

    async def refusal() -> DistributionError:
        with pytest.raises(DistributionError) as worker_refused:
            await worker.check_secret_keys()
        with pytest.raises(DistributionError) as server_refused:
            async with Client(build_server(settings)):
                pass
        assert worker_refused.value.to_dict() == server_refused.value.to_dict()
        return worker_refused.value

    await worker.check_secret_keys()
    async with Client(build_server(settings)):
        pass

    # A deactivated target's secrets, sealed under a key this process does not hold.
    unreadable = await hook(service, "https://example.com/unreadable")
    ciphertext = SecretBox([other_key]).encrypt({"signingSecret": secret}, bound_to=target_binding(unreadable.id))
    await db.execute(SET_CIPHERTEXT, unreadable.id, ciphertext)
    await db.execute("UPDATE distribution_targets SET active = false WHERE id = $1", unreadable.id)
    refused = await refusal()
    assert refused.code == "SECRET_KEY_MISMATCH"
    assert refused.message.startswith("1 stored secret(s) cannot be decrypted")
    assert repr(unreadable.name) in refused.message
    assert "WORDCLAW_SECRET_KEYS" in refused.remediation and "wordclaw keys rotate" in refused.remediation
    said = json.dumps(refused.to_dict())
    assert secret not in said and ciphertext.decode() not in said

    monkeypatch.setenv("WORDCLAW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WORDCLAW_SECRET_KEYS", settings.secret_keys[0])
    monkeypatch.setenv("WORDCLAW_HOME", str(settings.home))
    assert await anyio.to_thread.run_sync(cli.mcp_main, []) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("wordclaw-mcp: SECRET_KEY_MISMATCH: 1 stored secret(s)")

    # A channel session counts as much as a target's secrets.
    await db.execute(SET_CIPHERTEXT, unreadable.id, None)
    await worker.check_secret_keys()
    async with opened(settings, other_key) as elsewhere:
        await elsewhere.adapters.get("bluesky").store.put_session(unreadable.id, {"accessJwt": secret})
    assert (await refusal()).code == "SECRET_KEY_MISMATCH"


async def test_the_check_reads_every_stored_secret_in_batches(
    settings: Settings, service: DistributionService, runtime: Runtime, db: asyncpg.Connection
) -> None:
    targets = [await hook(service, "https://example.com/hook") for _ in range(5)]
    await verify_stored_secrets(runtime.pool, runtime.secrets, batch_size=2)
    last = max(targets, key=lambda target: target.id)  # in the last, short batch
    await db.execute(
        SET_CIPHERTEXT,
        last.id,
        SecretBox([Fernet.generate_key().decode()]).encrypt({"signingSecret": "x"}, bound_to=target_binding(last.id)),
    )
    with pytest.raises(DistributionError) as refused:
        await verify_stored_secrets(runtime.pool, runtime.secrets, batch_size=2)
    assert refused.value.code == "SECRET_KEY_MISMATCH" and repr(last.name) in refused.value.message


async def test_a_rotation_blocked_by_a_held_lock_is_one_coded_line(
    settings: Settings,
    service: DistributionService,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = await hook(service, "https://example.com/hook")
    # Its lock timeout short, so the blocked batch gives up at once rather than after 10 s.
    monkeypatch.setattr(cli.Settings, "from_env", classmethod(lambda cls: replace(settings, lock_timeout=0.2)))
    async with db.transaction():
        await db.execute("SELECT 1 FROM distribution_targets WHERE id = $1 FOR UPDATE", target.id)
        assert await anyio.to_thread.run_sync(cli.main, ["keys", "rotate"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("wordclaw: DATABASE_REFUSED: ") and "LockNotAvailableError" in line and "again" in line
    assert await anyio.to_thread.run_sync(cli.main, ["keys", "rotate"]) == 0  # once the lock is gone
