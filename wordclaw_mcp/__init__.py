"""WordClaw Distribution: publish a content item once, fan it out to many channels."""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .config import Settings
from .errors import DistributionError

if TYPE_CHECKING:
    from .server import build_server
    from .service import DistributionService

__all__ = ["DistributionError", "DistributionService", "Settings", "build_server"]
try:
    # The installed distribution's, so that --version and the MCP serverInfo say what pyproject.toml does.
    __version__ = version("wordclaw-distribution")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"


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
