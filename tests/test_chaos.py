"""Chaos: worker processes killed at random while they drain, and a PostgreSQL restarted under a
worker. Real `wordclaw-worker` processes, a real HTTP receiver, real PostgreSQL servers."""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import warnings
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Protocol, TypeVar
from uuid import UUID

import anyio
import asyncpg
import pytest
from anyio.abc import Process
from cryptography.fernet import Fernet

from queue_worker.worker import UNKNOWN_OUTCOME, Outcome, Worker
from tests.fake_x import FakeX
from tests.helpers import eventually
from tests.test_processes import external_database_env, stop, worker_process
from wordclaw_mcp import queries
from wordclaw_mcp.config import Settings
from wordclaw_mcp.database import CONNECTION_ERRORS, apply_schema, connect
from wordclaw_mcp.models import CreateDistributionPlanInput, PlanRef, RegisterTargetInput, UpsertContentItemInput
from wordclaw_mcp.receiver import ReceivedRequest, WebhookReceiver
from wordclaw_mcp.runtime import Runtime
from wordclaw_mcp.service import DistributionService

pytestmark = pytest.mark.anyio

T = TypeVar("T")

# A job is known by where its request went and what it carried, as well as by its webhook-id:
# (request path, contentItemId) -> job id. One content item per plan, one path per target.
JobKeys = dict[tuple[str, str], UUID]


async def enqueue(service: DistributionService, receiver: WebhookReceiver, *, plans: int, targets: int) -> JobKeys:
    """``plans`` plans, each of its own content item, over ``targets`` webhook targets on the receiver."""
    base = receiver.url.rsplit("/", 1)[0]
    paths: dict[UUID, str] = {}
    for index in range(targets):
        target = await service.register_target(
            RegisterTargetInput(name=f"chaos-{index}", channel_type="webhook", config={"url": f"{base}/t{index}"})
        )
        paths[target.id] = f"/hooks/t{index}"
    keys: JobKeys = {}

    async def publish(numbers: range) -> None:
        for number in numbers:
            item = await service.upsert_content_item(
                UpsertContentItemInput(title=f"Chaos {number}", body="At least *once*.")
            )
            plan = await service.create_distribution_plan(
                CreateDistributionPlanInput(content_item_id=item.id, target_ids=list(paths))
            )
            keys.update(((paths[job.target_id], str(item.id)), job.id) for job in plan.jobs)

    async with anyio.create_task_group() as tg:
        for first in range(4):  # four at a time: the pool has connections to spare
            tg.start_soon(publish, range(first, plans, 4))
    return keys


def job_key(request: ReceivedRequest) -> tuple[str, str] | None:
    """The job a request was for, read from its path and body; None if the body arrived cut short
    (a worker killed while it was sending)."""
    try:
        return request.path, json.loads(request.body)["data"]["contentItemId"]
    except (ValueError, KeyError, TypeError):
        return None


async def open_jobs(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM distribution_jobs WHERE status IN ('queued', 'running')")


async def when_all_final(conn: asyncpg.Connection) -> Counter[str] | None:
    """Jobs by status once none is queued or running."""
    rows = await conn.fetch("SELECT status, count(*) AS n FROM distribution_jobs GROUP BY status")
    statuses = Counter({row["status"]: row["n"] for row in rows})
    return None if statuses["queued"] or statuses["running"] else statuses


def check_deliveries(keys: JobKeys, requests: list[ReceivedRequest], jobs: list[asyncpg.Record]) -> dict[UUID, int]:
    """Every delivery of a job carries that job's id as its webhook-id, and no request carries
    any other id. Returns how many requests each job got."""
    known = {str(job_id) for job_id in keys.values()}
    deliveries: Counter[UUID] = Counter()
    for request in requests:
        webhook_id = request.headers.get("webhook-id")
        assert webhook_id in known, f"a request to {request.path} carries an unknown webhook-id {webhook_id!r}"
        if (key := job_key(request)) is not None:
            assert webhook_id == str(keys[key]), f"a delivery of job {keys[key]} carries webhook-id {webhook_id}"
        deliveries[UUID(webhook_id)] += 1
    attempts = {job["id"]: job["attempt"] for job in jobs}
    undelivered = set(attempts) - set(deliveries)
    assert not undelivered, f"{len(undelivered)} succeeded job(s) never reached the receiver, e.g. {min(undelivered)}"
    # An attempt sends at most one request.
    over = {job_id: (n, attempts[job_id]) for job_id, n in deliveries.items() if n > attempts[job_id]}
    assert not over, f"jobs with more requests than attempts (requests, attempts): {over}"
    return dict(deliveries)


async def check_receipts(conn: asyncpg.Connection, jobs: list[asyncpg.Record]) -> int:
    """A receipt for every attempt of every job, at least one of them a success. Returns how many
    receipts are for an attempt rescued from a worker that stopped responding."""
    rows = await conn.fetch("SELECT job_id, attempt, succeeded, error_message FROM distribution_receipts")
    attempts: defaultdict[UUID, list[int]] = defaultdict(list)
    succeeded: set[UUID] = set()
    for row in rows:
        attempts[row["job_id"]].append(row["attempt"])
        if row["succeeded"]:
            succeeded.add(row["job_id"])
    for job in jobs:
        assert sorted(attempts[job["id"]]) == list(range(1, job["attempt"] + 1)), (job, sorted(attempts[job["id"]]))
    assert succeeded == {job["id"] for job in jobs}, "a succeeded job without a successful receipt"
    return sum(1 for row in rows if row["error_message"] == UNKNOWN_OUTCOME)


async def tail(log: Path, lines: int = 40) -> str:
    path = anyio.Path(log)
    text = await path.read_text(errors="replace") if await path.exists() else "(no log)"
    return f"--- {log.name}:\n" + "\n".join(text.splitlines()[-lines:])


# --- workers killed at random ----------------------------------------------------------------

PLANS, TARGETS = 200, 10  # 2,000 jobs
WORKERS = 3
KILL_SECONDS = 20
# While the kills go on, every request is answered after this long. With 3 workers x 20 deliveries
# in flight, at most 60 / 0.65 = 92 jobs a second can succeed: about 1,900 in the 20 s and the
# answers in flight when they began, so the drain outlasts the kills on any machine. After the
# kills the answers come at once, and the rest drains as fast as the machine allows.
RECEIVER_DELAY = 0.65


async def test_workers_killed_at_random_while_draining_lose_no_job_and_redeliver_under_the_same_webhook_id(
    database_url: str,
    settings: Settings,
    service: DistributionService,
    db: asyncpg.Connection,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    receiver.behaviour.delay = RECEIVER_DELAY
    keys = await enqueue(service, receiver, plans=PLANS, targets=TARGETS)
    assert len(keys) == PLANS * TARGETS
    # A short lease, so that a killed worker's jobs come back within seconds.
    env = external_database_env(database_url, tmp_path) | {
        "WORDCLAW_SECRET_KEYS": settings.secret_keys[0],
        "WORDCLAW_LEASE_SECONDS": "4",
        "WORDCLAW_DELIVERY_TIMEOUT": "2",
    }
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    started = 0

    async with AsyncExitStack() as stack:

        async def start() -> tuple[Process, Path]:
            nonlocal started
            log = tmp_path / f"worker-{started}.log"
            started += 1
            return await stack.enter_async_context(worker_process(env, log)), log

        workers = [await start() for _ in range(WORKERS)]
        await anyio.to_thread.run_sync(receiver.wait_for, 1, 30)  # they are delivering
        began = anyio.current_time()
        for second in range(1, KILL_SECONDS + 1):
            await anyio.sleep(began + second - anyio.current_time())  # the test's pace, not a wait
            slot = rng.randrange(WORKERS)
            doomed, log = workers[slot]
            assert doomed.returncode is None, f"a worker exited by itself ({doomed.returncode})\n" + await tail(log)
            doomed.kill()  # SIGKILL: no chance to record anything
            await doomed.wait()
            workers[slot] = await start()
        open_after_kills = await open_jobs(db)
        receiver.behaviour.delay = 0.0
        try:
            statuses = await eventually(lambda: when_all_final(db), within=45, interval=0.25)
        except AssertionError as exc:
            rows = await db.fetch("SELECT status, count(*) FROM distribution_jobs GROUP BY status")
            logs_text = "\n".join([await tail(log) for _, log in workers])
            raise AssertionError(f"{exc}\njobs by status: {[tuple(row) for row in rows]}\n{logs_text}") from exc
        drained_after = anyio.current_time() - began
        exited = [(process.returncode, await tail(log)) for process, log in workers if process.returncode is not None]

    assert not exited, f"a worker of the last generation exited by itself: {exited}"
    assert statuses == {"succeeded": PLANS * TARGETS}, statuses
    assert open_after_kills > 0, "the queue drained before the kills ended: the test proved nothing"
    jobs = await db.fetch("SELECT id, attempt FROM distribution_jobs")
    deliveries = check_deliveries(keys, list(receiver.requests), jobs)
    rescued = await check_receipts(db, jobs)
    assert rescued > 0, "no attempt was ever rescued from a killed worker"
    twice = sum(1 for n in deliveries.values() if n > 1)
    cut_short = sum(1 for request in receiver.requests if job_key(request) is None)
    print(
        f"\nchaos (seed {seed}): {KILL_SECONDS} kills, {started} worker processes; {open_after_kills} jobs open "
        f"when the kills ended, all {len(jobs)} succeeded {drained_after:.1f} s after the first kill; "
        f"{len(receiver.requests)} requests ({cut_short} cut short), {rescued} attempts rescued; "
        f"{twice} jobs delivered more than once, each time under the same webhook-id"
    )


# --- a PostgreSQL restarted under a worker ----------------------------------------------------


class Cluster(Protocol):
    """A PostgreSQL cluster this test owns: it can stop and start it without touching anyone else's."""

    kind: str

    def url(self, database: str) -> str: ...
    def stop(self) -> None: ...
    def crash(self) -> None: ...
    def start(self) -> None: ...
    def destroy(self) -> None: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def system_bindir() -> Path:
    """The newest PostgreSQL server binaries installed on the machine."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    if found := shutil.which("pg_ctl"):
        candidates.insert(0, Path(found).parent)
    for bindir in candidates:
        if all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise FileNotFoundError("no initdb, pg_ctl and postgres in /usr/lib/postgresql/*/bin or on PATH")


class SystemCluster:
    """The machine's PostgreSQL binaries on a private data directory and a free port on 127.0.0.1.

    PostgreSQL refuses to run as root, so as root it runs as the postgres user, in a folder made
    with mkdtemp (the pytest folders are closed to other users).
    """

    kind = "the system's PostgreSQL binaries"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="wordclaw-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        try:
            if os.geteuid() == 0:
                owner = pwd.getpwnam("postgres")
                os.chown(self.root, owner.pw_uid, owner.pw_gid)
                self.as_user = ["runuser", "-u", "postgres", "--"]
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
            self.start()
        except BaseException:
            self.destroy()
            raise

    def _run(self, tool: str, *args: str) -> None:
        with (self.root / "commands.log").open("ab") as sink:
            result = subprocess.run(
                [*self.as_user, str(self.bindir / tool), *args],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                timeout=60,
            )
        if result.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} exited with {result.returncode}:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.root.glob("*.log"))

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def crash(self) -> None:
        """Stop at once, as a crash would: what was not yet written out of the WAL buffers is lost."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class PgserverCluster:
    """The pgserver package's PostgreSQL on a private data directory and a unix socket."""

    kind = "pgserver"

    def __init__(self, pgdata: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver

            self.handle = pgserver.get_server(pgdata, cleanup_mode="delete")

    def url(self, database: str) -> str:
        return self.handle.get_uri(database)

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-m", "fast", "-w", "stop"], pgdata=self.handle.pgdata, user=self.handle.system_user, timeout=60)

    def crash(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=self.handle.pgdata, user=self.handle.system_user, timeout=60)

    def start(self) -> None:
        # Starts it again on the same socket, as get_server did.
        with self.handle._lock:
            self.handle.ensure_postgres_running()

    def destroy(self) -> None:
        self.handle.cleanup()


@pytest.fixture
def owned_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A PostgreSQL cluster of the test's own: the system binaries, or else pgserver."""
    failures = []
    cluster: Cluster | None = None
    for kind, make in (
        (SystemCluster.kind, lambda: SystemCluster(system_bindir())),
        (PgserverCluster.kind, lambda: PgserverCluster(tmp_path / "pgdata")),
    ):
        try:
            cluster = make()
            break
        except Exception as exc:
            failures.append(f"{kind}: {type(exc).__name__}: {exc}")
    if cluster is None:
        pytest.skip("no PostgreSQL cluster of the test's own could start; " + "; ".join(failures))
    try:
        yield cluster
    finally:
        cluster.destroy()


async def wordclaw_database(cluster: Cluster, tmp_path: Path, *server_settings: str) -> tuple[str, Settings]:
    """A database with the schema on ``cluster``, after running ``server_settings`` (ALTER SYSTEM …)
    and reloading; its URL and settings for the test's own processes."""
    admin = await asyncpg.connect(cluster.url("postgres"))
    try:
        await admin.execute(queries.create_database("wordclaw"))
        for statement in server_settings:
            await admin.execute(statement)
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    url = cluster.url("wordclaw")
    conn = await connect(url)
    try:
        await apply_schema(conn)
    finally:
        await conn.close()
    settings = Settings(
        database_url=url,
        home=tmp_path / "home",
        secret_keys=(Fernet.generate_key().decode(),),
        allow_private_targets=True,
        run_worker=False,
        local_agent=True,
    )
    return url, settings


async def test_a_worker_reconnects_by_itself_after_its_database_restarts_and_no_job_is_lost(
    owned_cluster: Cluster, tmp_path: Path
) -> None:
    url, settings = await wordclaw_database(owned_cluster, tmp_path)
    key = settings.secret_keys[0]
    plans, targets = 50, 10
    env = external_database_env(url, tmp_path) | {
        "WORDCLAW_SECRET_KEYS": key,
        # A claim whose answer the restart swallowed is held by nobody until its lease runs out.
        "WORDCLAW_LEASE_SECONDS": "10",
        "WORDCLAW_DELIVERY_TIMEOUT": "5",
    }
    log = tmp_path / "worker.log"
    with WebhookReceiver() as receiver:
        receiver.behaviour.delay = 0.2  # 20 in flight: about 100 deliveries a second
        async with Runtime.open(settings) as runtime:
            keys = await enqueue(DistributionService(runtime), receiver, plans=plans, targets=targets)
        async with worker_process(env, log) as worker:
            await anyio.to_thread.run_sync(receiver.wait_for, 100, 30)
            restarted = anyio.current_time()
            await anyio.to_thread.run_sync(owned_cluster.stop)
            delivered_before = len(receiver.requests)

            async def alive() -> None:
                assert worker.returncode is None, f"the worker exited ({worker.returncode})\n" + await tail(log)

            async def met_the_restart() -> bool:
                await alive()
                return "lost the database" in await anyio.Path(log).read_text(errors="replace")

            await eventually(met_the_restart, within=15)
            await anyio.to_thread.run_sync(owned_cluster.start)
            conn = await asyncpg.connect(url)
            try:

                async def drained() -> Counter[str] | None:
                    await alive()
                    return await when_all_final(conn)

                try:
                    statuses = await eventually(drained, within=40, interval=0.25)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{await tail(log)}") from exc
                drained_after = anyio.current_time() - restarted
                jobs = await conn.fetch("SELECT id, attempt FROM distribution_jobs")
                deliveries = check_deliveries(keys, list(receiver.requests), jobs)
                rescued = await check_receipts(conn, jobs)
            finally:
                await conn.close()
            assert await stop(worker, log) == 0
    assert statuses == {"succeeded": plans * targets}, statuses
    assert delivered_before < plans * targets, "the queue drained before the restart: the test proved nothing"
    twice = sum(1 for n in deliveries.values() if n > 1)
    print(
        f"\nrestart of {owned_cluster.kind}: {delivered_before} of {len(jobs)} jobs delivered when it stopped; "
        f"all succeeded {drained_after:.1f} s after; {rescued} attempts rescued, {twice} jobs delivered more than once"
    )


# --- a claim and a server crash -----------------------------------------------------------------


async def test_a_claim_survives_a_server_crash_so_no_other_worker_takes_the_attempt_it_delivers(
    owned_cluster: Cluster, tmp_path: Path
) -> None:
    """A worker claims a job and starts delivering it; PostgreSQL crashes (`pg_ctl stop -m
    immediate`) and comes back. The claim must still be there: were it lost, another worker would
    claim the job again under the same attempt number while the first still delivers it, and the
    first's late result would move the second's attempt. The WAL writer is made slow, so that a
    commit that did not wait for its flush is still in the WAL buffers when the server dies."""
    _url, settings = await wordclaw_database(owned_cluster, tmp_path, "ALTER SYSTEM SET wal_writer_delay = '10s'")
    gate = threading.Event()
    with WebhookReceiver() as receiver:
        receiver.behaviour.gate = gate
        async with Runtime.open(settings) as runtime:
            service = DistributionService(runtime)
            first, second = Worker(runtime, name="first"), Worker(runtime, name="second")
            item = await service.upsert_content_item(UpsertContentItemInput(title="Crash", body="Once."))
            target = await service.register_target(
                RegisterTargetInput(name="hook", channel_type="webhook", config={"url": receiver.url})
            )
            plan = await service.create_distribution_plan(
                CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
            )
            [mine] = await first.claim(1)
            outcome: list[Outcome | None] = []
            async with anyio.create_task_group() as tg:

                async def deliver() -> None:
                    outcome.append(await first.attempt(mine))

                tg.start_soon(deliver)
                await anyio.to_thread.run_sync(receiver.wait_for, 1, 10)  # the request is out
                await anyio.to_thread.run_sync(owned_cluster.crash)
                await anyio.to_thread.run_sync(owned_cluster.start)
                await runtime.pool.expire_connections()
                theirs = await _once_it_answers(lambda: second.claim(10))
                gate.set()
            assert theirs == [], "another worker claimed an attempt the first still holds"
            [done] = outcome
            assert done is not None
            assert await _once_it_answers(lambda: first.record_many([done])) == {mine.id: "succeeded"}
            receipts = (await service.get_receipts(PlanRef(plan_id=plan.id))).receipts
    assert [(receipt.attempt, receipt.succeeded) for receipt in receipts] == [(1, True)]
    assert len(receiver.requests) == 1


async def _once_it_answers(call: Callable[[], Awaitable[T]], within: float = 30.0) -> T:
    """``call``'s result once the database takes it (it is coming back from a crash)."""
    with anyio.fail_after(within):
        while True:
            try:
                return await call()
            except (*CONNECTION_ERRORS, asyncpg.CannotConnectNowError):
                await anyio.sleep(0.1)


# --- X, which cannot take a post twice, with workers killed mid-post ---------------------------

X_PLANS = 40
X_KILLS = 8


async def test_workers_killed_mid_post_never_make_a_second_post_on_x(
    database_url: str, settings: Settings, service: DistributionService, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """X has no idempotency key. Workers are killed at random while X takes half a second to answer
    each post it has already made; every job must end with at most one post: succeeded with its
    post, or failed DELIVERY_OUTCOME_UNKNOWN (its worker died after the request went out), never
    posted again by a rescue."""
    with FakeX() as x:
        x.account.remaining = 10_000
        x.account.answer_after = 0.5
        target = await service.register_target(
            RegisterTargetInput(
                name="x",
                channel_type="x",
                config={"baseUrl": x.base_url},
                secrets={"accessToken": x.account.token},
                # Two posts in flight at a time, about four a second: the posts outlast the kills.
                max_concurrency=2,
            )
        )
        texts: dict[UUID, str] = {}
        for number in range(X_PLANS):
            item = await service.upsert_content_item(UpsertContentItemInput(title=f"Post {number}", body="Once."))
            plan = await service.create_distribution_plan(
                CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id])
            )
            texts[plan.jobs[0].id] = f"Post {number}\n\nOnce."
        env = external_database_env(database_url, tmp_path) | {
            "WORDCLAW_SECRET_KEYS": settings.secret_keys[0],
            "WORDCLAW_LEASE_SECONDS": "4",
            "WORDCLAW_DELIVERY_TIMEOUT": "2",
        }
        rng = random.Random()
        started = 0
        async with AsyncExitStack() as stack:

            async def start() -> tuple[Process, Path]:
                nonlocal started
                log = tmp_path / f"x-worker-{started}.log"
                started += 1
                return await stack.enter_async_context(worker_process(env, log)), log

            workers = [await start() for _ in range(2)]
            await eventually(lambda: _true(x.account.requests), within=30)
            began = anyio.current_time()
            for second in range(1, X_KILLS + 1):
                await anyio.sleep(began + second - anyio.current_time())  # the test's pace, not a wait
                slot = rng.randrange(len(workers))
                workers[slot][0].kill()
                await workers[slot][0].wait()
                workers[slot] = await start()
            open_after_kills = await open_jobs(db)
            try:
                await eventually(lambda: when_all_final(db), within=60, interval=0.25)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n" + "\n".join([await tail(log) for _, log in workers])) from exc
        jobs = await db.fetch("SELECT id, status, last_error FROM distribution_jobs")
        posts = Counter(post["text"] for post in x.account.posts)
        asked = Counter(x.account.asked)
    # X refuses some duplicates by content, but not reliably: a second request is the failure.
    assert max(asked.values()) == 1, f"sent twice: {[text for text, n in asked.items() if n > 1]}"
    assert max(posts.values()) == 1, f"posted twice: {[text for text, n in posts.items() if n > 1]}"
    unknown = 0
    for job in jobs:
        if job["status"] == "succeeded":
            assert posts[texts[job["id"]]] == 1, job
        else:
            assert job["status"] == "failed" and job["last_error"].startswith("DELIVERY_OUTCOME_UNKNOWN"), job
            unknown += 1
    assert open_after_kills > 0, "the queue drained before the kills ended: the test proved nothing"
    assert unknown > 0, "no worker died with a post in flight: the test proved nothing"
    print(
        f"\nX chaos: {X_KILLS} kills, {started} workers, {len(x.account.posts)} posts for {len(jobs)} jobs, "
        f"{unknown} ended DELIVERY_OUTCOME_UNKNOWN"
    )


async def _true(value: object) -> bool:
    return bool(value)
