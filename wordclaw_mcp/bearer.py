"""API keys over HTTP: every request to the streamable HTTP transport carries
``Authorization: Bearer wck_…``; a missing, wrong or revoked key is answered 401 before the MCP
layer sees the request. The agent the key belongs to rides in the request's state, where the
tools find it (server.caller), and in the request's ``user``, where the SDK's session manager
finds it: a session answers only the agent that opened it, and any other agent's request for it
gets the 404 an unknown session gets (mcp/server/streamable_http_manager.py)."""

from __future__ import annotations

import json
import sys
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken

from .access import AccessService, invalid_key
from .config import Settings
from .database import CONNECTION_ERRORS, create_pool_for, resolve_url
from .errors import DatabaseUnavailable, DistributionError
from .models import Agent

AGENT_STATE = "wordclaw_agent"

AsgiScope = dict[str, Any]


class BearerAuth:
    """ASGI middleware: authenticate each HTTP request by its bearer key."""

    def __init__(self, app: Any, access: AccessService) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: AsgiScope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            agent = await self.access.authenticate(_bearer_key(scope))
        except DistributionError as exc:
            await _answer(send, 401, exc)
            return
        except CONNECTION_ERRORS as exc:
            await _answer(send, 503, DatabaseUnavailable(f"authenticating the request failed ({type(exc).__name__})"))
            return
        scope.setdefault("state", {})[AGENT_STATE] = agent
        scope["user"] = _principal(agent)
        await self.app(scope, receive, send)


def _principal(agent: Agent) -> AuthenticatedUser:
    """The agent as the SDK tells a session's owner from another caller: by its client_id."""
    # Not the key: the SDK may keep and show the token, and the agent's id is all it compares.
    return AuthenticatedUser(AccessToken(token=f"agent:{agent.id}", client_id=str(agent.id), scopes=agent.scopes))


def _bearer_key(scope: AsgiScope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()
    error = invalid_key()
    error.message = "The request has no `Authorization: Bearer wck_…` header."
    raise error


async def _answer(send: Any, status: int, error: DistributionError) -> None:
    body = json.dumps({"error": error.to_dict()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="wordclaw"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


MCP_PATH = "/mcp"


async def serve_http(server: Any, settings: Settings, *, host: str, port: int, ready: Any = None) -> None:
    """Serve ``server`` over streamable HTTP on host:port, every request authenticated.

    Once listening it says where on stderr (``wordclaw-mcp: serving MCP at http://…/mcp``): the
    URL a client needs, with the port the system chose when ``port`` is 0.
    """
    url = await resolve_url(settings)
    pool = await create_pool_for(settings, url, max_size=2)
    try:
        app = BearerAuth(server.streamable_http_app(host=host, streamable_http_path=MCP_PATH), AccessService(pool))
        http = _announcing_server(app, host=host, port=port)
        if ready is not None:
            ready(http)
        await http.serve()
    finally:
        await pool.close()


def _announcing_server(app: Any, *, host: str, port: int) -> Any:
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                address, bound_port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"wordclaw-mcp: serving MCP at {served_url(address, bound_port)}", file=sys.stderr, flush=True)

    return AnnouncingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))


def served_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{MCP_PATH}"
