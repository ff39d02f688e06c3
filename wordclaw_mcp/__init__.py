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
    # Lazy: ``import wordclaw_mcp`` stays cheap for the settings and errors alone, without
    # the database driver, the HTTP client and the MCP SDK the service and server bring.
    if name == "DistributionService":
        from .service import DistributionService

        return DistributionService
    if name == "build_server":
        from .server import build_server

        return build_server
    raise AttributeError(f"module 'wordclaw_mcp' has no attribute {name!r}")
