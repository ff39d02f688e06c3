"""WordClaw Distribution: publish a content item once, fan it out to many channels."""

from .config import Settings
from .errors import DistributionError
from .service import DistributionService

__all__ = ["DistributionError", "DistributionService", "Settings", "build_server"]
__version__ = "0.1.0"


def build_server(settings: Settings | None = None):
    """The MCP server; imported lazily so the domain core does not load the SDK."""
    from .server import build_server as _build

    return _build(settings)
