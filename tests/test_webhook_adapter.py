"""The webhook adapter against a real HTTP server on 127.0.0.1, and its transform."""

from __future__ import annotations

import ipaddress
import json
import ssl
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import trustme
from standardwebhooks import Webhook

from queue_worker.adapters import AdapterOptions, DeliveryTarget, WebhookAdapter, truncate
from queue_worker.adapters.webhook import RESPONSE_BODY_LIMIT, HostPools
from queue_worker.retry import SCHEDULE_SECONDS, retry_delay
from tests.helpers import new_signing_secret
from wordclaw_mcp import netguard
from wordclaw_mcp.errors import DistributionError
from wordclaw_mcp.models import ContentItem, TransformPolicy
from wordclaw_mcp.receiver import WebhookReceiver

pytestmark = pytest.mark.anyio

PAYLOAD = {"type": "content.distributed", "data": {"title": "Hello", "body": "ünïcode ✓"}}


def target(url: str, **secrets: str) -> DeliveryTarget:
    return DeliveryTarget(id=uuid.uuid4(), name="hook", config={"url": url}, secrets=secrets)


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
    closed = WebhookReceiver()
    dead_url = closed.url
    closed.close()
    host = "hooks.example:1"
    addresses = [
        netguard.PinnedURL(url=dead_url, host_header=host, sni_hostname="hooks.example"),
        netguard.PinnedURL(url=receiver.url, host_header=host, sni_hostname="hooks.example"),
    ]
    response = await adapter._post(addresses, b"{}", {"content-type": "application/json"})
    assert response.status_code == 200
    assert receiver.requests[0].headers["host"] == host


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


async def test_connection_pools_per_hostname_are_bounded() -> None:
    pools = HostPools(lambda: httpx.AsyncClient(trust_env=False), limit=2)
    try:
        async with pools.client("a.example") as a, pools.client("b.example") as b:
            async with pools.client("A.example") as again:
                assert again is a  # hostnames are case-insensitive
        async with pools.client("b.example") as held:  # a.example is now the least recently used
            async with pools.client("c.example"), pools.client("d.example"):
                assert a.is_closed  # dropped at once: nobody was using it
                assert not held.is_closed  # dropped, but in use: closed when let go
            assert not held.is_closed
        assert held.is_closed and b is held
    finally:
        await pools.aclose()


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


def test_truncation_breaks_at_a_word_and_respects_the_limit() -> None:
    text = "one two three four five six"
    assert truncate(text, 100) == text
    cut = truncate(text, 12)
    assert cut == "one two…" and len(cut) <= 12
    assert truncate("x" * 50, 10) == "x" * 9 + "…"


def test_retry_delays_follow_the_schedule_with_bounded_jitter() -> None:
    for attempt, base in enumerate(SCHEDULE_SECONDS, start=1):
        delays = [retry_delay(attempt) for _ in range(50)]
        assert all(base * 0.9 <= delay <= base * 1.1 for delay in delays)
        assert len(set(delays)) > 1
    assert retry_delay(99) <= SCHEDULE_SECONDS[-1] * 1.1
    assert retry_delay(1, retry_after=600) == 600
    assert retry_delay(1, retry_after=10**9) == 24 * 3600
