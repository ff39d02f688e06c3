"""The webhook adapter against a real HTTP server on 127.0.0.1, and its transform."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit

import anyio
import pytest
import trustme
from pydantic import ValidationError
from standardwebhooks import Webhook

from queue_worker.adapters import (
    AdapterOptions,
    AdapterRegistry,
    DeliveryTarget,
    Progress,
    WebhookAdapter,
    delivery_progress,
)
from queue_worker.adapters.webhook import RESPONSE_BODY_LIMIT
from queue_worker.retry import SCHEDULE_SECONDS, retry_delay
from tests.helpers import new_signing_secret
from wordclaw_mcp import netguard
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.http import CheckedResolver, DeadlineExceeded, HttpClient, TargetRefused
from wordclaw_mcp.models import (
    ContentItem,
    CreateDistributionPlanInput,
    RegisterTargetInput,
    TransformPolicy,
    UpsertContentItemInput,
)
from wordclaw_mcp.receiver import WebhookReceiver

pytestmark = pytest.mark.anyio

PAYLOAD = {"type": "content.distributed", "data": {"title": "Hello", "body": "ünïcode ✓"}}


def target(url: str, **secrets: str) -> DeliveryTarget:
    return DeliveryTarget(id=uuid.uuid4(), name="hook", config={"url": url}, secrets=secrets)


def resolving_to(*addresses: str):
    """A stand-in for netguard.resolve that answers every name with ``addresses``.

    The tests need names (the resolver is only asked about names, and cookies and connection
    pools are per name) that lead to their receivers on 127.0.0.1, and no DNS server here can
    be told what to answer.
    """

    async def lookup(host: str, port: int) -> list[netguard.IPAddress]:
        return [ipaddress.ip_address(address) for address in addresses]

    return lookup


def named(receiver: WebhookReceiver, hostname: str) -> str:
    """The receiver's URL with ``hostname`` in place of its address."""
    return receiver.url.replace("127.0.0.1", hostname)


async def post_to(client: HttpClient, url: str) -> None:
    answer = await client.request("POST", url, body=b"{}", timeout=10.0)
    assert answer.status == 200


@pytest.fixture
async def adapter():
    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=1.0))
    yield adapter
    await adapter.aclose()


async def test_delivery_is_signed_per_standard_webhooks(adapter: WebhookAdapter, receiver: WebhookReceiver) -> None:
    secret = new_signing_secret()
    result = await adapter.deliver(PAYLOAD, target(receiver.url, signingSecret=secret), message_id="msg_1")
    assert result.succeeded and result.status_code == 200
    request = receiver.requests[0]
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == "msg_1"
    assert abs(int(request.headers["webhook-timestamp"]) - datetime.now(UTC).timestamp()) < 60
    # The reference verifier accepts it, and the body is the payload, byte for byte as signed.
    assert Webhook(secret).verify(request.body, request.headers) == PAYLOAD
    with pytest.raises(Exception, match="signature"):
        Webhook(new_signing_secret()).verify(request.body, request.headers)


async def test_without_a_secret_no_signature_is_sent(adapter: WebhookAdapter, receiver: WebhookReceiver) -> None:
    await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
    assert "webhook-signature" not in receiver.requests[0].headers
    assert json.loads(receiver.requests[0].body) == PAYLOAD


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (429, True), (408, True), (400, False), (401, False), (404, False), (410, False)],
)
async def test_only_2xx_succeeds_and_throttling_or_server_errors_are_retryable(
    adapter: WebhookAdapter, receiver: WebhookReceiver, status: int, retryable: bool
) -> None:
    receiver.behaviour.status = status
    receiver.behaviour.body = b'{"error":"nope"}'
    result = await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
    assert not result.succeeded
    assert (result.status_code, result.retryable) == (status, retryable)
    assert result.raw_meta["responseBody"] == '{"error":"nope"}'


async def test_a_redirect_is_a_failure_and_is_not_followed(adapter: WebhookAdapter) -> None:
    with WebhookReceiver() as elsewhere, WebhookReceiver() as redirecting:
        redirecting.behaviour.status = 302
        redirecting.behaviour.headers = {"location": elsewhere.url}
        result = await adapter.deliver(PAYLOAD, target(redirecting.url), message_id="m")
        assert (result.succeeded, result.status_code, result.retryable) == (False, 302, False)
        assert elsewhere.requests == []


async def test_a_slow_endpoint_times_out_as_a_retryable_failure(
    adapter: WebhookAdapter, receiver: WebhookReceiver
) -> None:
    receiver.behaviour.delay = 3.0  # the adapter's timeout is 1 s
    result = await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
    assert not result.succeeded and result.retryable
    assert result.error == "The endpoint did not answer within 1 s."


async def test_an_answer_that_trickles_in_is_cut_off_at_the_total_deadline(
    adapter: WebhookAdapter, receiver: WebhookReceiver
) -> None:
    # A byte every 0.1 s: no single read waits anywhere near the 1 s timeout, yet the whole
    # answer takes about 10 s.
    receiver.behaviour.drip = 0.1
    started = time.monotonic()
    result = await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
    elapsed = time.monotonic() - started
    assert (result.succeeded, result.retryable) == (False, True)
    assert result.error == "The endpoint did not answer within 1 s."
    assert elapsed < 3.0  # the deadline plus slack for a loaded machine, far short of the drip


async def test_the_deadline_covers_a_lookup_that_never_ends(receiver: WebhookReceiver) -> None:
    never = anyio.Event()

    async def lookup(host: str, port: int) -> list[netguard.IPAddress]:
        await never.wait()  # a DNS server that never answers
        raise AssertionError("unreachable")

    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=0.5))
    adapter.http = HttpClient(allow_private=True, lookup=lookup)
    started = time.monotonic()
    try:
        result = await adapter.deliver(PAYLOAD, target(named(receiver, "silent.example")), message_id="m")
    finally:
        await adapter.aclose()
    assert (result.succeeded, result.retryable) == (False, True)
    assert result.error == "The endpoint did not answer within 0.5 s."
    assert time.monotonic() - started < 2.5


async def test_the_deadline_covers_the_wait_for_a_connection(receiver: WebhookReceiver) -> None:
    client = HttpClient(allow_private=True, limit_per_host=1)
    receiver.behaviour.gate = gate = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(post_to, client, receiver.url)  # holds the one connection until the gate opens
            await anyio.to_thread.run_sync(receiver.wait_for, 1)
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await client.request("POST", receiver.url, body=b"{}", timeout=0.5)
            assert time.monotonic() - started < 2.5
            gate.set()
    finally:
        gate.set()
        await client.aclose()
    assert len(receiver.requests) == 1  # the second never got a connection, so was never sent


async def test_a_huge_body_is_read_only_as_far_as_the_receipt_keeps(
    adapter: WebhookAdapter, receiver: WebhookReceiver
) -> None:
    chunk = b"y" * 65536
    receiver.behaviour.body, receiver.behaviour.repeat = chunk, 1600  # 100 MiB
    started = time.monotonic()
    result = await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
    assert result.succeeded, result.error
    assert result.raw_meta["responseBody"] == "y" * RESPONSE_BODY_LIMIT
    assert time.monotonic() - started < 3.0
    # The adapter hung up after the first bytes: the server could hand over no more than the
    # sockets' buffers hold, nowhere near the whole body.
    await anyio.to_thread.run_sync(receiver.wait_answered, 1)
    assert receiver.body_bytes_sent < len(chunk) * 1600 // 4


async def test_retry_after_as_an_http_date_is_understood(adapter: WebhookAdapter, receiver: WebhookReceiver) -> None:
    receiver.behaviour.status = 503
    receiver.behaviour.headers = {"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"}
    result = await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
    assert result.retry_after is not None and result.retry_after > 86400


async def test_loopback_targets_are_refused_unless_the_deployment_allows_them(receiver: WebhookReceiver) -> None:
    strict = WebhookAdapter(AdapterOptions(allow_private_targets=False))
    try:
        result = await strict.deliver(PAYLOAD, target(receiver.url), message_id="m")
        assert not result.succeeded and not result.retryable
        assert result.error.startswith("TARGET_ADDRESS_FORBIDDEN")
        assert receiver.requests == []
        with pytest.raises(DistributionError) as refused:
            await strict.check_target(WebhookAdapter.config_model(url="http://localhost:9/hook"))
        assert refused.value.code == "TARGET_ADDRESS_FORBIDDEN"
    finally:
        await strict.aclose()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fc00::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
        ("192.0.0.1", False),  # IETF protocol assignments
        ("192.0.0.9", False),
        ("64:ff9b::10.0.0.1", False),  # NAT64 reaches the embedded IPv4 address
        ("64:ff9b::127.0.0.1", False),
        ("64:ff9b::169.254.169.254", False),
        ("64:ff9b::8.8.8.8", True),
        ("64:ff9b:1::8.8.8.8", False),  # local-use NAT64 prefix
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated)
        ("::10.0.0.1", False),
        ("::8.8.8.8", False),
        ("::ffff:0:10.0.0.1", False),  # IPv4-translated
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("2001::1", False),
        ("2001:db8::1", False),  # documentation
        ("3fff::1", False),
        ("100::1", False),  # discard-only
        ("5f00::1", False),  # SRv6 segment identifiers
        ("fec0::1", False),  # site-local (deprecated)
        ("ff02::1", False),
        ("198.18.0.1", False),  # benchmarking
        ("240.0.0.1", False),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_address_classification(address: str, public: bool) -> None:
    assert netguard.is_public(ipaddress.ip_address(address)) is public


async def test_pinning_rewrites_the_host_to_each_checked_address() -> None:
    pinned = await netguard.check_url("http://user:pw@localhost:8080/a?b=1", allow_private=True)
    assert pinned
    assert {p.url for p in pinned} <= {"http://127.0.0.1:8080/a?b=1", "http://[::1]:8080/a?b=1"}
    assert {(p.host_header, p.sni_hostname) for p in pinned} == {("localhost:8080", "localhost")}


async def test_an_address_that_refuses_the_connection_falls_back_to_the_next(
    adapter: WebhookAdapter, receiver: WebhookReceiver
) -> None:
    # Nothing listens on 127.0.0.2 (loopback too): it refuses the connection at once.
    adapter.http = HttpClient(allow_private=True, lookup=resolving_to("127.0.0.2", "127.0.0.1"))
    url = named(receiver, "hooks.example")
    result = await adapter.deliver(PAYLOAD, target(url), message_id="m")
    assert result.succeeded, result.error
    assert receiver.requests[0].headers["host"] == urlsplit(url).netloc


def tls_receiver(ca: trustme.CA, hostname: str) -> WebhookReceiver:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(context)
    return WebhookReceiver(tls=context)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_adapter(ca: trustme.CA, tmp_path):
    """A webhook adapter that trusts ``ca`` (through WORDCLAW_CA_BUNDLE's option) and nothing else."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=5.0, ca_bundle=str(ca_file)))
    yield adapter
    await adapter.aclose()


async def test_https_is_pinned_to_the_checked_address_and_still_verifies_the_name(
    ca: trustme.CA, tls_adapter: WebhookAdapter
) -> None:
    adapter = tls_adapter
    with tls_receiver(ca, "localhost") as receiver:
        url = receiver.url.replace("127.0.0.1", "localhost")
        result = await adapter.deliver(PAYLOAD, target(url), message_id="m")
        assert result.succeeded, result.error
        assert receiver.requests[0].headers["host"] == urlsplit(url).netloc
    with tls_receiver(ca, "someone-else.example") as impostor:
        url = impostor.url.replace("127.0.0.1", "localhost")
        result = await adapter.deliver(PAYLOAD, target(url), message_id="m")
        assert not result.succeeded
        assert "CERTIFICATE_VERIFY_FAILED" in result.error
        assert impostor.requests == []


async def test_a_connection_verified_for_one_hostname_is_not_reused_for_another(
    ca: trustme.CA, tls_adapter: WebhookAdapter
) -> None:
    adapter = tls_adapter
    with tls_receiver(ca, "localhost") as receiver:  # the certificate names localhost only
        named = receiver.url.replace("127.0.0.1", "localhost")
        first = await adapter.deliver(PAYLOAD, target(named), message_id="m1")
        assert first.succeeded, first.error
        # Same address and port, another name: the open connection verified "localhost".
        second = await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m2")
        assert not second.succeeded
        assert "CERTIFICATE_VERIFY_FAILED" in second.error
        assert [request.headers["webhook-id"] for request in receiver.requests] == ["m1"]


async def test_a_silent_address_does_not_use_up_the_deadline_of_the_next(receiver: WebhookReceiver) -> None:
    port = urlsplit(receiver.url).port
    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=2.0))
    adapter.http = HttpClient(allow_private=True, lookup=resolving_to("127.0.0.3", "127.0.0.1"))
    # A listener whose backlog is full answers no new connection at all: a silent address.
    with socket.socket() as silent:
        silent.bind(("127.0.0.3", port))
        silent.listen(0)
        with socket.create_connection(("127.0.0.3", port), timeout=2.0):
            try:
                # Tried one after the other, the first would hold the delivery to its deadline.
                result = await adapter.deliver(PAYLOAD, target(named(receiver, "hooks.example")), message_id="m")
            finally:
                await adapter.aclose()
    assert result.succeeded, result.error
    assert len(receiver.requests) == 1


# --- the HTTP layer (wordclaw_mcp/http.py) -----------------------------------------------------


async def test_the_resolver_refuses_a_name_whose_answer_turns_private_after_passing() -> None:
    # Stubbed: the point is a DNS answer that changes from one lookup to the next (rebinding),
    # which no DNS server here can be told to do. The connector asks this resolver afresh for
    # every connection it opens, and connects only to what it returns.
    answers = [["93.184.215.14"], ["93.184.215.14", "10.0.0.1"]]

    async def lookup(host: str, port: int) -> list[netguard.IPAddress]:
        return [ipaddress.ip_address(address) for address in answers.pop(0)]

    resolver = CheckedResolver(allow_private=False, lookup=lookup)
    [first] = await resolver.resolve("rebind.example", 443, socket.AF_UNSPEC)
    assert (first["hostname"], first["host"], first["port"]) == ("rebind.example", "93.184.215.14", 443)
    with pytest.raises(DistributionError) as refused:
        await resolver.resolve("rebind.example", 443, socket.AF_UNSPEC)
    assert refused.value.code == "TARGET_ADDRESS_FORBIDDEN"
    assert "10.0.0.1" in refused.value.message


async def test_a_name_that_passed_at_registration_is_refused_when_it_resolves_to_loopback_at_delivery(
    receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stubbed DNS, for the reason above: registration's check sees a public address, then the
    # delivery's connection is offered loopback, where the receiver stands for an internal service.
    answers = [["93.184.215.14"], ["127.0.0.1"]]
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[netguard.IPAddress]:
        lookups.append(host)
        return [ipaddress.ip_address(address) for address in answers.pop(0)]

    monkeypatch.setattr(netguard, "resolve", resolve)
    strict = WebhookAdapter(AdapterOptions(allow_private_targets=False, timeout=2.0))
    url = named(receiver, "rebind.example")
    try:
        await strict.check_target(WebhookAdapter.config_model(url=url))  # passes: the answer was public
        result = await strict.deliver(PAYLOAD, target(url), message_id="m")
    finally:
        await strict.aclose()
    assert (result.succeeded, result.retryable) == (False, False)
    assert result.error.startswith("TARGET_ADDRESS_FORBIDDEN") and "127.0.0.1" in result.error
    assert lookups == ["rebind.example", "rebind.example"]
    assert receiver.requests == []


async def test_a_name_that_does_not_resolve_is_a_retryable_failure(receiver: WebhookReceiver) -> None:
    async def lookup(host: str, port: int) -> list[netguard.IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=2.0))
    adapter.http = HttpClient(allow_private=True, lookup=lookup)
    try:
        result = await adapter.deliver(PAYLOAD, target(named(receiver, "gone.example")), message_id="m")
    finally:
        await adapter.aclose()
    assert (result.succeeded, result.retryable) == (False, True)
    assert result.error == "TARGET_UNRESOLVABLE: The target host gone.example could not be resolved."
    assert receiver.requests == []


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0177.0.0.1", "127.000.000.001"])
async def test_addresses_in_legacy_forms_are_refused_even_where_private_targets_are_allowed(
    adapter: WebhookAdapter, receiver: WebhookReceiver, host: str
) -> None:
    # The socket layer reads each as 127.0.0.1, and aiohttp would connect without a lookup.
    result = await adapter.deliver(PAYLOAD, target(named(receiver, host)), message_id="m")
    assert (result.succeeded, result.retryable) == (False, False)
    assert result.error.startswith("INVALID_URL")
    assert receiver.requests == []


async def test_user_info_in_a_url_is_refused_and_not_echoed(adapter: WebhookAdapter, receiver: WebhookReceiver) -> None:
    # Registration refuses it; a row stored before that rule, or a social adapter's URL, meets this.
    url = receiver.url.replace("http://", "http://alice:s3cr3t-Passw0rd@")
    result = await adapter.deliver(PAYLOAD, target(url), message_id="m")
    assert (result.succeeded, result.retryable) == (False, False)
    assert result.error.startswith("INVALID_URL")
    assert "s3cr3t-Passw0rd" not in result.error and "alice" not in result.error
    assert receiver.requests == []


async def test_an_error_names_the_endpoint_without_its_credentials(adapter: WebhookAdapter) -> None:
    closed = WebhookReceiver()
    url = closed.url + "?token=tok-3f9a0c1e77b24d8a"
    closed.close()  # nothing listens there any more
    result = await adapter.deliver(PAYLOAD, target(url), message_id="m")
    assert (result.succeeded, result.retryable) == (False, True)
    assert result.error.startswith("ConnectError: Cannot connect to http://127.0.0.1:")
    assert "tok-3f9a0c1e77b24d8a" not in result.error and "/hooks" not in result.error


async def test_proxies_in_the_environment_are_not_used(
    adapter: WebhookAdapter, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    with WebhookReceiver() as proxy:
        proxy_url = proxy.url.removesuffix("/hooks/wordclaw")
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy_url)
            monkeypatch.setenv(name.lower(), proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        result = await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
        assert result.succeeded, result.error
        assert len(receiver.requests) == 1
        assert proxy.requests == []


async def test_ssl_cert_file_is_not_trusted(ca: trustme.CA, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=5.0))  # no ca_bundle: certifi's
    try:
        with tls_receiver(ca, "localhost") as receiver:
            result = await adapter.deliver(PAYLOAD, target(named(receiver, "localhost")), message_id="m")
            assert not result.succeeded
            assert "CERTIFICATE_VERIFY_FAILED" in result.error
            assert receiver.requests == []
    finally:
        await adapter.aclose()


async def test_the_answer_is_asked_for_uncompressed_and_cookies_are_not_kept(receiver: WebhookReceiver) -> None:
    receiver.behaviour.headers = {"content-type": "application/json", "set-cookie": "session=abc123; Path=/"}
    adapter = WebhookAdapter(AdapterOptions(allow_private_targets=True, timeout=2.0))
    # A name, as a cookie jar keeps no cookies from a bare address.
    adapter.http = HttpClient(allow_private=True, lookup=resolving_to("127.0.0.1"))
    try:
        for message_id in ("m1", "m2"):
            result = await adapter.deliver(PAYLOAD, target(named(receiver, "cookies.example")), message_id=message_id)
            assert result.succeeded, result.error
    finally:
        await adapter.aclose()
    first, second = receiver.requests
    assert first.headers["accept-encoding"] == "identity"
    assert "cookie" not in second.headers


async def test_delivery_progress_says_whether_the_request_went_out(
    adapter: WebhookAdapter, receiver: WebhookReceiver
) -> None:
    closed = WebhookReceiver()
    dead = closed.url
    closed.close()
    delivery_progress.set(Progress.NOT_SENT)
    result = await adapter.deliver(PAYLOAD, target(dead), message_id="m")
    assert "ConnectError" in result.error
    assert delivery_progress.get() is Progress.NOT_SENT

    assert (await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")).succeeded
    assert delivery_progress.get() is Progress.SENT

    # Cancelled, as the worker cancels a delivery, while the endpoint holds the request unanswered.
    receiver.behaviour.gate = threading.Event()
    try:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_received() -> None:
                    await anyio.to_thread.run_sync(receiver.wait_for, 2)
                    scope.cancel()

                tg.start_soon(cancel_once_received)
                await adapter.deliver(PAYLOAD, target(receiver.url), message_id="m")
    finally:
        receiver.behaviour.gate.set()
    assert scope.cancelled_caught
    assert delivery_progress.get() is Progress.MAYBE_SENT


async def test_one_session_and_one_connection_carry_successive_deliveries(
    adapter: WebhookAdapter, receiver: WebhookReceiver
) -> None:
    for message_id in ("m1", "m2", "m3"):
        assert (await adapter.deliver(PAYLOAD, target(receiver.url), message_id=message_id)).succeeded
        session = adapter.http._session
        assert session is not None
        if message_id == "m1":
            first_session = session
        assert session is first_session
    assert len({request.peer for request in receiver.requests}) == 1  # the same TCP connection
    await adapter.aclose()
    assert first_session.closed


async def test_every_new_connection_resolves_and_checks_the_name_afresh(receiver: WebhookReceiver) -> None:
    # The endpoint closes each connection, so each delivery opens a new one; with a DNS cache
    # the second would connect to the first answer without asking (and checking) again.
    receiver.behaviour.headers = {"content-type": "application/json", "connection": "close"}
    lookups: list[str] = []

    async def lookup(host: str, port: int) -> list[netguard.IPAddress]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    client = HttpClient(allow_private=True, lookup=lookup)
    try:
        for _ in range(2):
            await post_to(client, named(receiver, "fresh.example"))
    finally:
        await client.aclose()
    assert lookups == ["fresh.example", "fresh.example"]
    assert len({request.peer for request in receiver.requests}) == 2


async def test_the_layer_sends_json_and_bounds_what_it_reads(receiver: WebhookReceiver) -> None:
    client = HttpClient(allow_private=True)
    receiver.behaviour.body = json.dumps({"id": "1", "text": "é" * 40}).encode()
    try:
        answer = await client.request(
            "POST", receiver.url, json={"status": "ünï"}, headers={"authorization": "Bearer t0k"}, timeout=5.0
        )
        assert (answer.status, answer.reason, answer.truncated) == (200, "OK", False)
        assert answer.json() == {"id": "1", "text": "é" * 40}
        request = receiver.requests[0]
        assert json.loads(request.body) == {"status": "ünï"}
        assert (request.headers["content-type"], request.headers["authorization"]) == ("application/json", "Bearer t0k")

        cut = await client.request("POST", receiver.url, body=b"{}", max_body=10, timeout=5.0)
        assert (cut.text, cut.truncated) == ('{"id": "1"', True)
        with pytest.raises(ValueError, match="not whole JSON"):
            cut.json()

        with pytest.raises(TargetRefused) as refused:
            await client.request("GET", receiver.url.replace("http://", "ftp://"), timeout=5.0)
        assert refused.value.code == "INVALID_URL"
    finally:
        await client.aclose()


def test_the_registry_gives_every_adapter_the_one_http_client() -> None:
    registry = AdapterRegistry(AdapterOptions(allow_private_targets=True))
    assert registry.get("webhook").http is registry.http


async def test_connections_to_one_host_are_limited_and_other_hosts_are_not_held_up() -> None:
    client = HttpClient(allow_private=True, limit=10, limit_per_host=2, lookup=resolving_to("127.0.0.1"))
    gate = threading.Event()
    try:
        with WebhookReceiver() as busy, WebhookReceiver() as free:
            busy.behaviour.gate = gate
            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(5):
                        tg.start_soon(post_to, client, named(busy, "busy.example"))
                    await anyio.to_thread.run_sync(busy.wait_for, 2)
                    # Two requests are held at busy.example; free.example is not kept waiting by them.
                    await post_to(client, named(free, "free.example"))
                    assert len(free.requests) == 1
                    gate.set()
            finally:
                gate.set()
            assert len(busy.requests) == 5
            assert busy.most_in_flight == 2
            assert len({request.peer for request in busy.requests}) == 2  # three waited for a connection
    finally:
        await client.aclose()


async def test_connections_are_limited_in_all_across_hostnames(receiver: WebhookReceiver) -> None:
    client = HttpClient(allow_private=True, limit=2, limit_per_host=2, lookup=resolving_to("127.0.0.1"))
    receiver.behaviour.gate = gate = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            for name in ("a.example", "b.example", "c.example", "d.example"):
                tg.start_soon(post_to, client, named(receiver, name))
            await anyio.to_thread.run_sync(receiver.wait_for, 2)
            gate.set()
    finally:
        gate.set()
        await client.aclose()
    assert len(receiver.requests) == 4
    assert receiver.most_in_flight == 2
    # Each name had a connection of its own: none verified (or opened) for one name serves another.
    assert len({request.peer for request in receiver.requests}) == 4


async def test_idle_connections_are_kept_for_a_bounded_number_of_hosts(receiver: WebhookReceiver) -> None:
    client = HttpClient(allow_private=True, idle_hosts=2, lookup=resolving_to("127.0.0.1"))
    try:
        for name in ("a.example", "b.example", "a.example", "c.example", "a.example", "b.example"):
            await post_to(client, named(receiver, name))
    finally:
        await client.aclose()
    a1, b1, a2, c1, a3, b2 = (request.peer for request in receiver.requests)
    assert a1 == a2 == a3  # a.example was used most recently each time a third host came
    assert b2 != b1  # b.example's idle connection was closed for c.example's
    assert len({a1, b1, c1, b2}) == 4


def content(body: str = "# Title\n\nA **bold** claim and more words here.") -> ContentItem:
    now = datetime.now(UTC)
    return ContentItem(
        id=uuid.uuid4(),
        title="T",
        body=body,
        summary="S",
        canonical_url="https://example.com/t",
        metadata={"lang": "en"},
        version=3,
        created_at=now,
        updated_at=now,
    )


def test_transform_renders_markdown_to_html_on_request() -> None:
    adapter = WebhookAdapter()
    data = adapter.transform(content(), TransformPolicy(body_format="html"))["data"]
    assert data["body"] == "<h1>Title</h1>\n<p>A <strong>bold</strong> claim and more words here.</p>\n"
    assert (data["bodyFormat"], data["version"], data["metadata"]) == ("html", 3, {"lang": "en"})


def test_transform_policy_can_send_an_excerpt_only() -> None:
    data = WebhookAdapter().transform(content(), TransformPolicy(include_body=False, include_metadata=False))["data"]
    assert "body" not in data and "metadata" not in data
    assert data["canonicalUrl"] == "https://example.com/t"


def test_plain_text_keeps_link_targets() -> None:
    item = content().model_copy(update={"body": "Read [the post](https://e.com/p) **now**."})
    data = WebhookAdapter().transform(item, TransformPolicy(output_format="plaintext"))["data"]
    assert (data["body"], data["bodyFormat"]) == ("Read the post (https://e.com/p) now.", "plaintext")


def test_an_excerpt_is_the_summary_or_the_bodys_opening_never_the_whole_body() -> None:
    item = content().model_copy(update={"body": "First paragraph.\n\nSecond, longer paragraph."})
    assert WebhookAdapter().transform(item, TransformPolicy(excerpt_only=True))["data"]["body"] == "S"
    no_summary = item.model_copy(update={"summary": None})
    assert WebhookAdapter().transform(no_summary, TransformPolicy(excerpt_only=True))["data"]["body"] == (
        "First paragraph."
    )


def test_the_canonical_link_carries_utm_parameters_or_is_left_out() -> None:
    item = content().model_copy(update={"canonical_url": "https://example.com/t?id=7&utm_source=old"})
    policy = TransformPolicy(utm={"source": "mastodon", "campaign": "launch"})
    link = WebhookAdapter().transform(item, policy)["data"]["canonicalUrl"]
    assert link == "https://example.com/t?id=7&utm_source=mastodon&utm_campaign=launch"
    assert (
        WebhookAdapter().transform(item, TransformPolicy(include_canonical_url=False))["data"]["canonicalUrl"] is None
    )


def test_attribution_and_hashtags_are_added_when_asked() -> None:
    item = content().model_copy(update={"metadata": {"author": "Ada", "license": "CC BY 4.0"}})
    data = WebhookAdapter().transform(item, TransformPolicy(include_attribution=True, hashtags=["#launch", "news"]))
    assert (data["data"]["attribution"], data["data"]["hashtags"]) == ("By Ada · CC BY 4.0", ["launch", "news"])
    assert "attribution" not in WebhookAdapter().transform(item, TransformPolicy())["data"]


@pytest.mark.parametrize(
    ("policy", "mentions"),
    [
        ({"utm": {"sauce": "x"}}, "unknown UTM parameter"),
        ({"hashtags": ["two words"]}, "hashtags are letters"),
        ({"outputFormat": "pdf"}, "outputFormat"),
        ({"maxLength": 0}, "maxLength"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(policy: dict, mentions: str) -> None:
    with pytest.raises(ValidationError, match=mentions):
        TransformPolicy.model_validate(policy)


def test_retry_delays_follow_the_schedule_with_bounded_jitter() -> None:
    for attempt, base in enumerate(SCHEDULE_SECONDS, start=1):
        delays = [retry_delay(attempt) for _ in range(50)]
        assert all(base * 0.9 <= delay <= base * 1.1 for delay in delays)
        assert len(set(delays)) > 1
    assert retry_delay(99) <= SCHEDULE_SECONDS[-1] * 1.1
    assert retry_delay(1, retry_after=600) == 600
    assert retry_delay(1, retry_after=10**9) == 24 * 3600


async def test_extra_headers_are_sent_kept_secret_and_cannot_override_the_signature(
    service, worker, receiver: WebhookReceiver
) -> None:
    target = await service.register_target(
        RegisterTargetInput(
            name="keyed",
            channel_type="webhook",
            config={"url": receiver.url, "headers": {"X-Api-Key": "k3y-value"}, "timeoutSeconds": 3},
        )
    )
    assert target.config["headers"] == {"X-Api-Key": "[redacted]"} and target.config["timeoutSeconds"] == 3
    item = await service.upsert_content_item(UpsertContentItemInput(title="T", body="b"))
    await service.create_distribution_plan(CreateDistributionPlanInput(content_item_id=item.id, target_ids=[target.id]))
    await worker.run_once()
    [request] = receiver.requests
    assert request.headers["x-api-key"] == "k3y-value" and "webhook-signature" in request.headers
    assert "k3y-value" not in (await service.list_targets()).model_dump_json()
    for bad in ({"webhook-signature": "v1,forged"}, {"X-Evil": "a\r\nInjected: yes"}, {"bad name": "x"}):
        with pytest.raises(DistributionError) as refused:
            await service.register_target(
                RegisterTargetInput(name="bad", channel_type="webhook", config={"url": receiver.url, "headers": bad})
            )
        assert refused.value.code == "INVALID_TARGET_CONFIG"
