"""The applyToken client against the sandbox gateway: signing, paths, verification, every outcome."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from authnotify.alipay.client import (
    AMS_APPLY_TOKEN_PATH,
    AMS_SANDBOX_APPLY_TOKEN_PATH,
    APPLY_TOKEN_TIMEOUT_SECONDS,
    APS_APPLY_TOKEN_PATH,
    AlipayClient,
    AlipayUnavailable,
)
from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import (
    AlipayGateway,
    Outcome,
    RunningAlipayGateway,
    start_alipay_gateway,
)
from authnotify.errors import ConfigError

if TYPE_CHECKING:
    from tests.conftest import TestKeys

AUTH_CODE = "281010133AB2F588D14B43231234ABCD"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def client_for(
    make_settings: Callable[..., Settings], gateway: RunningAlipayGateway, session: aiohttp.ClientSession
) -> Callable[..., AlipayClient]:
    def factory(provider: str, *, timeout: float = APPLY_TOKEN_TIMEOUT_SECONDS, **overrides: Any) -> AlipayClient:
        settings = make_settings(ams_gateway_url=gateway.url, aps_gateway_url=gateway.url, **overrides)
        config = settings.provider(provider)
        assert config is not None
        return AlipayClient(config, session, timeout=timeout)

    return factory


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_ams_sandbox_client_id_uses_the_sandbox_path_and_gets_tokens(
    client_for: Callable[..., AlipayClient], gateway: RunningAlipayGateway
) -> None:
    client = client_for("ams")
    assert client.apply_token_path == AMS_SANDBOX_APPLY_TOKEN_PATH
    timed = _metric("authnotify_apply_token_seconds_count", provider="ams")
    succeeded = _metric("authnotify_apply_token_results_total", provider="ams", result="S")

    result = await client.apply_token(auth_code=AUTH_CODE)

    assert result.result_status == "S" and result.result_code == "SUCCESS"
    access, refresh = gateway.gateway.tokens_for("ams", AUTH_CODE)
    assert (result.access_token, result.refresh_token) == (access, refresh)
    assert isinstance(result.access_token_expiry_time, datetime)
    assert result.access_token_expiry_time.tzinfo is not None
    assert result.refresh_token_expiry_time is not None
    assert result.refresh_token_expiry_time > result.access_token_expiry_time
    assert result.user_login_id and result.customer_id
    (call,) = gateway.gateway.requests
    assert call.path == AMS_SANDBOX_APPLY_TOKEN_PATH
    assert call.body == {"grantType": "AUTHORIZATION_CODE", "authCode": AUTH_CODE,
                         "customerBelongsTo": "ALIPAY_CN"}
    assert gateway.gateway.calls[AUTH_CODE] == 1
    assert _metric("authnotify_apply_token_seconds_count", provider="ams") == timed + 1
    assert _metric("authnotify_apply_token_results_total", provider="ams", result="S") == succeeded + 1


async def test_ams_production_client_id_uses_the_production_path(
    make_settings: Callable[..., Settings], keys: TestKeys, session: aiohttp.ClientSession
) -> None:
    running = await start_alipay_gateway(AlipayGateway(
        alipay_private_key=keys.alipay.private_key, client_public_key=keys.ours.private_key.public_key(),
        ams_client_id="5YBX2N2ZAMS01234",
    ))
    try:
        settings = make_settings(ams_client_id="5YBX2N2ZAMS01234", ams_gateway_url=running.url)
        config = settings.provider("ams")
        assert config is not None
        result = await AlipayClient(config, session).apply_token(auth_code=AUTH_CODE)
    finally:
        await running.aclose()
    assert result.succeeded
    assert [call.path for call in running.gateway.requests] == [AMS_APPLY_TOKEN_PATH]


async def test_alipay_plus_sends_auth_client_id_and_reference_merchant_id(
    client_for: Callable[..., AlipayClient], gateway: RunningAlipayGateway
) -> None:
    result = await client_for("aps").apply_token(
        auth_code=AUTH_CODE, auth_client_id="218823863726123456789", reference_merchant_id="218823863726123456780"
    )
    assert result.succeeded and result.customer_id
    (call,) = gateway.gateway.requests
    assert call.path == APS_APPLY_TOKEN_PATH
    assert call.body == {"grantType": "AUTHORIZATION_CODE", "authCode": AUTH_CODE,
                         "authClientId": "218823863726123456789",
                         "referenceMerchantId": "218823863726123456780"}


async def test_refresh_token_grant(client_for: Callable[..., AlipayClient], gateway: RunningAlipayGateway) -> None:
    first = await client_for("aps").apply_token(auth_code=AUTH_CODE, auth_client_id="218823863726123456789")
    assert first.refresh_token is not None
    refreshed = await client_for("aps").apply_token(
        refresh_token=first.refresh_token, auth_client_id="218823863726123456789"
    )
    assert refreshed.succeeded and refreshed.access_token != first.access_token
    assert gateway.gateway.requests[-1].grant_type == "REFRESH_TOKEN"


async def test_f_and_u_answers_are_typed_results(
    client_for: Callable[..., AlipayClient], gateway: RunningAlipayGateway
) -> None:
    gateway.gateway.script(Outcome.failure("INVALID_CODE"), auth_code=AUTH_CODE, times=1)
    gateway.gateway.script(Outcome.unknown(), auth_code=AUTH_CODE, times=1)
    client = client_for("ams")
    failed = await client.apply_token(auth_code=AUTH_CODE)
    unknown = await client.apply_token(auth_code=AUTH_CODE)
    assert (failed.result_status, failed.result_code, failed.access_token) == ("F", "INVALID_CODE", None)
    assert (unknown.result_status, unknown.result_code) == ("U", "UNKNOWN_EXCEPTION")
    assert (await client.apply_token(auth_code=AUTH_CODE)).succeeded  # the script ran out
    assert gateway.gateway.calls[AUTH_CODE] == 3


@pytest.mark.parametrize(
    ("outcome", "kind", "timeout"),
    [
        (Outcome.http_error(500), "http_error", APPLY_TOKEN_TIMEOUT_SECONDS),
        (Outcome.http_error(503), "http_error", APPLY_TOKEN_TIMEOUT_SECONDS),
        (Outcome.bad_signature(), "bad_signature", APPLY_TOKEN_TIMEOUT_SECONDS),
        (Outcome.slow(2.0), "timeout", 0.3),
    ],
    ids=["http-500", "http-503", "bad-signature", "timeout"],
)
async def test_untrustworthy_answers_raise_alipay_unavailable(
    client_for: Callable[..., AlipayClient], gateway: RunningAlipayGateway, outcome: Outcome, kind: str,
    timeout: float,
) -> None:
    gateway.gateway.script(outcome)
    before = _metric("authnotify_apply_token_results_total", provider="ams", result=kind)
    with pytest.raises(AlipayUnavailable) as raised:
        await client_for("ams", timeout=timeout).apply_token(auth_code=AUTH_CODE)
    assert raised.value.kind == kind
    assert AUTH_CODE not in str(raised.value)
    assert _metric("authnotify_apply_token_results_total", provider="ams", result=kind) == before + 1


async def test_the_default_timeout_is_five_seconds(client_for: Callable[..., AlipayClient]) -> None:
    assert client_for("ams").timeout == 5.0


async def test_an_answer_signed_by_another_key_is_not_trusted(
    client_for: Callable[..., AlipayClient], keys: TestKeys
) -> None:
    # Alipay's public key configured as ours: the gateway's real signature no longer verifies.
    client = client_for("aps", aps_alipay_public_key=keys.ours.public_pem)
    with pytest.raises(AlipayUnavailable) as raised:
        await client.apply_token(auth_code=AUTH_CODE, auth_client_id="218823863726123456789")
    assert raised.value.kind == "bad_signature"


async def test_gateway_refuses_a_request_signed_with_the_wrong_key(
    client_for: Callable[..., AlipayClient], gateway: RunningAlipayGateway, keys: TestKeys
) -> None:
    # We sign with Alipay's private key instead of ours: the gateway answers INVALID_SIGNATURE, F, signed.
    client = client_for("ams", ams_private_key=keys.alipay.private_pem)
    result = await client.apply_token(auth_code=AUTH_CODE)
    assert (result.result_status, result.result_code) == ("F", "INVALID_SIGNATURE")
    assert gateway.gateway.calls[AUTH_CODE] == 0
    assert gateway.gateway.requests[-1].answered == "INVALID_SIGNATURE"


async def test_connection_refused_is_unavailable(make_settings: Callable[..., Settings],
                                                 session: aiohttp.ClientSession) -> None:
    settings = make_settings(ams_gateway_url="http://127.0.0.1:9")  # discard port: nothing listens
    config = settings.provider("ams")
    assert config is not None
    with pytest.raises(AlipayUnavailable) as raised:
        await AlipayClient(config, session).apply_token(auth_code=AUTH_CODE)
    assert raised.value.kind == "connection_error"


async def test_ams_without_customer_belongs_to_is_a_config_error(
    make_settings: Callable[..., Settings], session: aiohttp.ClientSession
) -> None:
    config = make_settings(ams_customer_belongs_to=None).provider("ams")
    assert config is not None
    with pytest.raises(ConfigError, match="AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO"):
        AlipayClient(config, session)


async def test_no_secret_in_results_or_logs(
    client_for: Callable[..., AlipayClient], gateway: RunningAlipayGateway, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, json_logs: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = client_for("ams")
    result = await client.apply_token(auth_code=AUTH_CODE)
    gateway.gateway.script(Outcome.bad_signature())
    with pytest.raises(AlipayUnavailable):
        await client.apply_token(auth_code=AUTH_CODE)
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text + repr(result)
    assert "alipay_answered" in text
    for secret in (AUTH_CODE, result.access_token, result.refresh_token):
        assert secret and secret not in text


# --- answers as a hostile or flaky network delivers them (issue 1: an authorization lost to a chunked answer) ---


def _signed_answer_headers(keys: TestKeys, path: str, client_id: str, body: bytes) -> dict[str, str]:
    from authnotify.alipay.signature import sign_request_headers

    headers = sign_request_headers(keys.alipay.private_key, method="POST", path=path, client_id=client_id, body=body,
                                   time_header="Response-Time")
    headers["Content-Type"] = "application/json; charset=UTF-8"
    return headers


@pytest.fixture
async def odd_gateway(keys: TestKeys) -> AsyncIterator[Any]:
    """A gateway whose answers are correctly signed but written as the test says: in parts, or for ever."""
    import asyncio

    from aiohttp import web

    from tests.conftest import AMS_CLIENT_ID

    state: dict[str, Any] = {"mode": "parts", "written": 0}
    access_token = "AMS-ACCESS-" + "t" * 40
    # About 3 KB, as a real answer with long tokens and customer details can be.
    body = (b'{"result":{"resultCode":"SUCCESS","resultStatus":"S","resultMessage":"success"},'
            b'"accessToken":"' + access_token.encode() + b'","accessTokenExpiryTime":"2030-01-01T00:00:00+08:00",'
            b'"refreshToken":"AMS-REFRESH-1","refreshTokenExpiryTime":"2031-01-01T00:00:00+08:00",'
            b'"userLoginId":"u***@example.com","pspCustomerInfo":{"pspCustomerId":"c1","extra":"'
            + b"x" * 2800 + b'"}}')

    async def apply_token(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = _signed_answer_headers(keys, request.path, AMS_CLIENT_ID, body)
        response = web.StreamResponse(status=200, headers=headers)
        if state["mode"] == "parts":
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[:1000])
            await asyncio.sleep(0.05)
            await response.write(body[1000:])
        else:  # a body that never ends
            await response.prepare(request)
            chunk = b"x" * 65536
            try:
                while True:
                    await response.write(chunk)
                    state["written"] += len(chunk)
            except (ConnectionError, RuntimeError):
                return response
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/ams/sandbox/api/v1/authorizations/applyToken", apply_token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state["url"] = f"http://{host}:{port}"
    state["access_token"] = access_token
    yield state
    await runner.cleanup()


async def test_an_answer_written_in_parts_is_read_whole_and_verified(
        offline_settings: Callable[..., Settings], odd_gateway: Any, session: aiohttp.ClientSession) -> None:
    config = offline_settings(ams_gateway_url=odd_gateway["url"]).provider("ams")
    result = await AlipayClient(config, session).apply_token(auth_code=AUTH_CODE)
    assert result.succeeded and result.access_token == odd_gateway["access_token"]


async def test_an_answer_that_never_ends_is_a_bad_response_after_1_mib(
        offline_settings: Callable[..., Settings], odd_gateway: Any, session: aiohttp.ClientSession) -> None:
    from authnotify.alipay.client import MAX_RESPONSE_BYTES

    odd_gateway["mode"] = "forever"
    config = offline_settings(ams_gateway_url=odd_gateway["url"]).provider("ams")
    with pytest.raises(AlipayUnavailable) as raised:
        await AlipayClient(config, session).apply_token(auth_code=AUTH_CODE)
    assert raised.value.kind == "bad_response" and "over 1024 KiB" in str(raised.value)
    # Stopped soon after the limit, not at the timeout: what was sent is the limit plus socket buffers.
    assert odd_gateway["written"] < MAX_RESPONSE_BYTES + 16 * 1024 * 1024
