"""Settings read from the environment, in one place, so every entry point agrees."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from .errors import DistributionError

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in _TRUE


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or not value.strip() else int(value)


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
    run_worker: bool | None = None
    agent_id: str = "local-agent"
    max_attempts: int = 8
    worker_concurrency: int = 20
    worker_batch_size: int = 20
    poll_interval: float = 1.0
    lease_seconds: int = 120
    delivery_timeout: float = 15.0
    shutdown_grace: float = 20.0
    # Server-side limits on every pooled connection, so a stuck lock or a half-open
    # connection fails a statement instead of hanging a claim or a flush for ever.
    statement_timeout: float = 30.0
    lock_timeout: float = 10.0

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
            run_worker=None if run_worker is None else _flag("WORDCLAW_RUN_WORKER"),
            agent_id=os.environ.get("WORDCLAW_AGENT_ID", "local-agent"),
            max_attempts=_int("WORDCLAW_MAX_ATTEMPTS", 8),
            worker_concurrency=_int("WORDCLAW_WORKER_CONCURRENCY", 20),
        )

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def worker_in_server(self) -> bool:
        # Embedded means a single local user: one process should deliver without a second
        # daemon. With a shared server, operators run dedicated workers, so it is opt-in.
        return self.embedded if self.run_worker is None else self.run_worker
