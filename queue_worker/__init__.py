"""The worker daemon and the channel adapters it delivers through."""

from typing import TYPE_CHECKING, Any

from .adapters import Adapter, AdapterRegistry, DeliveryResult, DeliveryTarget

if TYPE_CHECKING:
    from .worker import ClaimedJob, Worker

__all__ = ["Adapter", "AdapterRegistry", "ClaimedJob", "DeliveryResult", "DeliveryTarget", "Worker"]


def __getattr__(name: str) -> Any:
    # Lazy: the worker needs wordclaw_mcp's runtime, which needs these adapters, so importing
    # the worker while the adapters package initialises would be circular.
    if name in {"Worker", "ClaimedJob"}:
        from . import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'queue_worker' has no attribute {name!r}")
