"""The worker daemon and the built-in channel adapters it delivers through."""

from .adapters import Adapter, AdapterRegistry, DeliveryResult, DeliveryTarget
from .worker import ClaimedJob, Worker

__all__ = ["Adapter", "AdapterRegistry", "ClaimedJob", "DeliveryResult", "DeliveryTarget", "Worker"]
