"""WordClaw Distribution: publish a content item once, fan it out to many channels."""

from typing import TYPE_CHECKING, Any

from .config import Settings
from .errors import DistributionError

if TYPE_CHECKING:
    from .server import build_server
    from .service import DistributionService

__all__ = ["DistributionError", "DistributionService", "Settings", "build_server"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: the service depends on queue_worker's adapters, which depend on this package's
    # models and errors, so importing the service here eagerly would be circular.
    if name == "DistributionService":
        from .service import DistributionService

        return DistributionService
    if name == "build_server":
        from .server import build_server

        return build_server
    raise AttributeError(f"module 'wordclaw_mcp' has no attribute {name!r}")
