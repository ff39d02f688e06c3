"""Settings read from the environment, in one place, so every entry point agrees."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .errors import DistributionError

_TRUE = {"1", "true", "yes", "on"}

# The longest retention age, in days (a century): anything longer is better said with 0, for ever.
MAX_RETAIN_DAYS = 36500.0


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in _TRUE


def _int(name: str, default: int) -> int:
    return int(_number(name, default, int))


def _float(name: str, default: float) -> float:
    return float(_number(name, default, float))


def _number(name: str, default: float, kind: type[int] | type[float]) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return kind(value)
    except ValueError:
        raise DistributionError(
            "INVALID_SETTINGS", f"{name}={value!r} is not a number.", f"Set {name} to a number, or unset it."
        ) from None


def default_home() -> Path:
    return Path(platformdirs.user_data_dir("wordclaw", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """Deployment settings. See the configuration reference in README.md."""

    database_url: str | None = None
    home: Path = field(default_factory=default_home)
    secret_keys: tuple[str, ...] = ()
    allow_private_targets: bool = False
    ca_bundle: str | None = None
    # Where feed targets (rss, atom) write their files; a target's path is relative to it.
    feeds_dir: Path | None = None
    run_worker: bool | None = None
    # The API key a stdio session (or an in-process client) calls with; never printed.
    agent_key: str | None = field(default=None, repr=False)
    # Whether a session without a key acts as the local agent (admin of the default tenant).
    # None: only on the embedded database, the one-user default.
    local_agent: bool | None = None
    # Seconds added to the clock the duplicate, idempotency and expiry rules read (wordclaw_now()
    # in schema.sql). For tests, which move time instead of waiting for it.
    clock_offset: float = 0.0
    max_attempts: int = 8
    worker_concurrency: int = 20
    worker_batch_size: int = 20
    poll_interval: float = 1.0
    # A worker renews its attempts' leases every third of this; a vanished worker's attempts
    # are claimed again soon after it runs out.
    lease_seconds: float = 30.0
    delivery_timeout: float = 15.0
    # A job the channel keeps throttling fails (THROTTLED_TOO_LONG) after this long.
    max_throttled_seconds: float = 24 * 3600.0
    shutdown_grace: float = 20.0
    # Server-side limits on every pooled connection, so a stuck lock or a half-open
    # connection fails a statement instead of hanging a claim or a flush for ever.
    statement_timeout: float = 30.0
    lock_timeout: float = 10.0
    # Retention (wordclaw_mcp/retention.py): days a finished row is kept; 0 or less keeps it for
    # ever. Succeeded and cancelled jobs go after retain_succeeded_days, failed ones (the dead
    # letters) after retain_failed_days, each with its receipts; events after retain_events_days.
    retain_succeeded_days: float = 14.0
    retain_failed_days: float = 30.0
    retain_events_days: float = 14.0
    # The entitlement decision log (who was allowed or denied what): kept longer, as an audit trail.
    retain_decisions_days: float = 365.0
    # Seconds between a worker's pruning runs.
    retention_interval: float = 3600.0

    def __post_init__(self) -> None:
        # A delivery that could outlast its lease would be rescued and sent a second time
        # while the first is still in flight.
        if not 0 < self.delivery_timeout * 2 <= self.lease_seconds:
            raise DistributionError(
                "INVALID_SETTINGS",
                f"The delivery timeout ({self.delivery_timeout:g} s) must be positive and at most half "
                f"the lease ({self.lease_seconds} s).",
                "Lower the delivery timeout or lengthen the lease.",
            )
        if self.worker_concurrency < 1 or self.worker_batch_size < 1:
            raise DistributionError(
                "INVALID_SETTINGS",
                "Worker concurrency and batch size must be at least 1.",
                "Set WORDCLAW_WORKER_CONCURRENCY (or --concurrency) to 1 or more.",
            )
        for variable, days in (
            ("WORDCLAW_RETAIN_SUCCEEDED_DAYS", self.retain_succeeded_days),
            ("WORDCLAW_RETAIN_FAILED_DAYS", self.retain_failed_days),
            ("WORDCLAW_RETAIN_EVENTS_DAYS", self.retain_events_days),
            ("WORDCLAW_RETAIN_DECISIONS_DAYS", self.retain_decisions_days),
        ):
            # Written so that NaN, which compares false with everything, is refused too.
            if not days <= MAX_RETAIN_DAYS:
                raise DistributionError(
                    "INVALID_SETTINGS",
                    f"{variable} ({days:g}) must be a number of days, at most {MAX_RETAIN_DAYS:g}.",
                    f"Set {variable} to the days to keep them, or to 0 to keep them for ever.",
                )
        if not 0 < self.retention_interval < math.inf:
            raise DistributionError(
                "INVALID_SETTINGS",
                f"The retention interval ({self.retention_interval:g} s) must be a positive number of seconds.",
                "Give Settings a positive retention_interval.",
            )

    @classmethod
    def from_env(cls) -> Settings:
        home = os.environ.get("WORDCLAW_HOME")
        keys = os.environ.get("WORDCLAW_SECRET_KEYS", "")
        run_worker = os.environ.get("WORDCLAW_RUN_WORKER")
        return cls(
            database_url=os.environ.get("WORDCLAW_DATABASE_URL") or None,
            home=Path(home).expanduser() if home else default_home(),
            secret_keys=tuple(k.strip() for k in keys.split(",") if k.strip()),
            allow_private_targets=_flag("WORDCLAW_ALLOW_PRIVATE_TARGETS"),
            ca_bundle=os.environ.get("WORDCLAW_CA_BUNDLE") or None,
            feeds_dir=Path(os.environ["WORDCLAW_FEEDS_DIR"]).expanduser()
            if os.environ.get("WORDCLAW_FEEDS_DIR")
            else None,
            run_worker=None if run_worker is None else _flag("WORDCLAW_RUN_WORKER"),
            agent_key=os.environ.get("WORDCLAW_AGENT_KEY") or None,
            local_agent=None if os.environ.get("WORDCLAW_LOCAL_AGENT") is None else _flag("WORDCLAW_LOCAL_AGENT"),
            max_attempts=_int("WORDCLAW_MAX_ATTEMPTS", 8),
            worker_concurrency=_int("WORDCLAW_WORKER_CONCURRENCY", 20),
            worker_batch_size=_int("WORDCLAW_WORKER_BATCH_SIZE", 20),
            lease_seconds=_float("WORDCLAW_LEASE_SECONDS", 30.0),
            delivery_timeout=_float("WORDCLAW_DELIVERY_TIMEOUT", 15.0),
            max_throttled_seconds=_float("WORDCLAW_MAX_THROTTLED_HOURS", 24.0) * 3600,
            retain_succeeded_days=_float("WORDCLAW_RETAIN_SUCCEEDED_DAYS", 14.0),
            retain_failed_days=_float("WORDCLAW_RETAIN_FAILED_DAYS", 30.0),
            retain_events_days=_float("WORDCLAW_RETAIN_EVENTS_DAYS", 14.0),
            retain_decisions_days=_float("WORDCLAW_RETAIN_DECISIONS_DAYS", 365.0),
        )

    @property
    def feeds_path(self) -> Path:
        return self.feeds_dir or self.home / "feeds"

    @property
    def local_agent_allowed(self) -> bool:
        return self.embedded if self.local_agent is None else self.local_agent

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def worker_in_server(self) -> bool:
        # Embedded means a single local user: one process should deliver without a second
        # daemon. With a shared server, operators run dedicated workers, so it is opt-in.
        return self.embedded if self.run_worker is None else self.run_worker
