"""``authnotify simulate``: what it sends, how it counts the answers, and its one-line errors.

Most tests run simulate in-process against a real ingress (``authnotify.ingress.app.create_app``) on this test's broker
namespace, with keys given by option, and look at what reached the queues.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from authnotify.cli.main import build_parser, main
from authnotify.config import Settings
from authnotify.config.keys import private_key_pem, public_key_pem
from authnotify.devtools import simulate
from authnotify.ingress.app import create_app
from authnotify.messaging.topology import build_topology
from tests import conftest

AMS_CLIENT_ID = conftest.AMS_CLIENT_ID
APS_CLIENT_ID = conftest.APS_CLIENT_ID
KeysFixture = Any  # conftest.TestKeys: a name starting with Test would be collected

Ingress = tuple[Settings, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def ingress(make_settings: Callable[..., Settings]) -> AsyncIterator[Ingress]:
    settings = make_settings()
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):  # until the broker channel is open
            async with session.get(url + "/readyz") as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.05)
    yield settings, url
    await runner.cleanup()


def simulate_args(url: str, keys: KeysFixture, tmp_path: Path, *extra: str, public_pem: str | None = None,
                  alipay_pem: str | None = None) -> Any:
    return build_parser().parse_args([
        "simulate", *extra, "--url", url, "--json",
        "--ams-client-id", AMS_CLIENT_ID, "--aps-client-id", APS_CLIENT_ID,
        "--alipay-private-key", alipay_pem or keys.alipay.private_pem,
        "--public-key", public_pem or keys.ours.public_pem,
        "--dev-dir", str(tmp_path / "no-dev-here"),
    ])


async def run_simulate(args: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = await simulate.run(args)
    out = capsys.readouterr().out
    # In-process, the ingress's own log lines share stdout: the summary is the last line.
    return code, json.loads(out.strip().splitlines()[-1])


async def queued(connection: aio_pika.abc.AbstractConnection, settings: Settings, consumer: str) -> list[
        aio_pika.abc.AbstractIncomingMessage]:
    """Every message in the consumer's queue (taken off it: nothing consumes them here anyway)."""
    channel = await connection.channel()
    queue = await channel.get_queue(build_topology(settings).consumer_queue(consumer), ensure=True)
    messages = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    await channel.close()
    return messages


async def test_token_created_for_both_providers_is_acknowledged_and_queued(
        ingress: Ingress, keys: KeysFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        amqp_connection: aio_pika.abc.AbstractConnection) -> None:
    settings, url = ingress
    code, summary = await run_simulate(simulate_args(url, keys, tmp_path, "token-created", "--count", "2"), capsys)
    assert code == 0
    assert summary["ok"] is True and summary["sent"] == 4 and summary["acknowledged"] == 4
    assert summary["byNotification"] == {"ams.TOKEN_CREATED": 2, "aps.TOKEN_CREATED": 2}
    assert summary["signatures"] == {"verified": 4, "bad": 0, "unchecked": 0}
    assert summary["latencyMs"]["max"] >= summary["latencyMs"]["p99"] >= summary["latencyMs"]["p50"] > 0

    messages = await queued(amqp_connection, settings, "token-created")
    bodies = [json.loads(m.body) for m in messages]
    assert len(bodies) == 4
    assert len({b["accessToken"] for b in bodies}) == 4  # unique per notification
    aps = [b for b in bodies if "pspId" in b]
    ams = [b for b in bodies if "result" in b]
    assert len(aps) == 2 and len(ams) == 2
    for body in aps:  # the fields Alipay+ requires on TOKEN_CREATED
        assert {"authClientId", "referenceMerchantId", "referenceAgreementId", "accessToken", "acquirerId",
                "walletForAccountBinding"} <= set(body)
        assert len(body["referenceMerchantId"]) <= 32
    for body in ams:
        assert body["result"]["resultStatus"] == "S"


async def test_duplicates_send_one_body_several_times(
        ingress: Ingress, keys: KeysFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        amqp_connection: aio_pika.abc.AbstractConnection) -> None:
    settings, url = ingress
    args = simulate_args(url, keys, tmp_path, "duplicates", "--repeat", "3", "--provider", "aps",
                         "--type", "TOKEN_CANCELED")
    code, summary = await run_simulate(args, capsys)
    assert code == 0 and summary["sent"] == 3 and summary["ok"] is True
    messages = await queued(amqp_connection, settings, "token-canceled")
    assert len(messages) == 3
    assert len({m.body for m in messages}) == 1
    assert json.loads(messages[0].body)["tokenCancelSource"] in ("PSP", "ACQUIRER")


async def test_retry_pattern_sends_alipays_eight_deliveries_compressed(
        ingress: Ingress, keys: KeysFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        amqp_connection: aio_pika.abc.AbstractConnection) -> None:
    settings, url = ingress
    schedule = sum(simulate.RETRY_SCHEDULE_SECONDS)
    assert simulate.RETRY_SCHEDULE_SECONDS[:3] == (0.0, 120.0, 600.0) and schedule == 24 * 3600 + 22 * 60

    args = simulate_args(url, keys, tmp_path, "retry-pattern", "--provider", "ams", "--time-scale", "200000")
    code, summary = await run_simulate(args, capsys)
    assert code == 0 and summary["sent"] == 8
    assert summary["durationSeconds"] >= schedule / 200000  # the pacing is kept, only compressed
    assert len({m.body for m in await queued(amqp_connection, settings, "token-created")}) == 1

    args = simulate_args(url, keys, tmp_path, "retry-pattern", "--provider", "ams", "--time-scale", "200000",
                         "--stop-on-success")
    code, summary = await run_simulate(args, capsys)
    assert code == 0 and summary["sent"] == 1  # Alipay stops at the first S


async def test_rate_spaces_the_notifications(
        ingress: Ingress, keys: KeysFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _settings, url = ingress
    args = simulate_args(url, keys, tmp_path, "token-canceled", "--provider", "ams", "--count", "6",
                         "--rate", "50")
    code, summary = await run_simulate(args, capsys)
    assert code == 0 and summary["sent"] == 6
    assert summary["durationSeconds"] >= 5 / 50


async def test_answers_not_signed_by_our_key_are_counted_bad(
        ingress: Ingress, keys: KeysFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _settings, url = ingress
    stranger = public_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    args = simulate_args(url, keys, tmp_path, "token-created", "--provider", "aps", public_pem=stranger)
    code, summary = await run_simulate(args, capsys)
    assert code == 1
    assert summary["signatures"]["bad"] == 1 and summary["acknowledged"] == 0 and summary["ok"] is False


async def test_notifications_signed_with_the_wrong_key_are_refused_and_fail_the_run(
        ingress: Ingress, keys: KeysFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        amqp_connection: aio_pika.abc.AbstractConnection) -> None:
    settings, url = ingress
    args = simulate_args(url, keys, tmp_path, "token-created", alipay_pem=keys.ours.private_pem)
    code, summary = await run_simulate(args, capsys)
    assert code == 1
    assert summary["answers"] == [{"http": 401, "resultStatus": "F", "resultCode": "INVALID_SIGNATURE", "count": 2}]
    assert summary["notAcknowledged"] == 2
    assert await queued(amqp_connection, settings, "token-created") == []


async def test_human_summary_shows_answers_and_latencies(
        ingress: Ingress, keys: KeysFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _settings, url = ingress
    args = simulate_args(url, keys, tmp_path, "token-created", "--provider", "ams")
    args.json = False
    assert await simulate.run(args) == 0
    out = capsys.readouterr().out
    assert "SUCCESS" in out and "latency ms: p50" in out and "1 verified, 0 bad" in out
    assert "all 1 acknowledged" in out


async def test_unreachable_ingress_is_one_line(keys: KeysFixture, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = simulate_args(f"http://127.0.0.1:{free_port()}", keys, tmp_path, "token-created")
    assert await simulate.run(args) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("authnotify simulate: ingress unreachable at http://127.0.0.1:")


@pytest.mark.slow
def test_unreachable_ingress_from_the_command_line_is_one_line_without_traceback(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    result = subprocess.run(
        [sys.executable, "-m", "authnotify", "simulate", "--url", f"http://127.0.0.1:{free_port()}",
         "--ams-client-id", "A", "--aps-client-id", "B", "--alipay-private-key", private_key_pem(key)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "ingress unreachable" in result.stderr


async def test_without_dev_keys_or_a_key_it_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("AUTHNOTIFY_SIMULATE_ALIPAY_PRIVATE_KEY", "AUTHNOTIFY_AMS_CLIENT_ID", "AUTHNOTIFY_APS_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["simulate", "--ams-client-id", "A", "--aps-client-id", "B"])
    assert await simulate.run(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no key to sign notifications with" in err and "authnotify dev" in err


async def test_lifecycle_needs_the_dev_gateway(ingress: Ingress, keys: KeysFixture, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _settings, url = ingress
    assert await simulate.run(simulate_args(url, keys, tmp_path, "lifecycle")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lifecycle needs the dev gateway" in err


@pytest.mark.parametrize("option", [["--count", "0"], ["--rate", "-1"], ["--provider", "xyz"],
                                    ["--time-scale", "0"], ["nonsense"]])
def test_bad_options_are_one_line_usage_errors(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("authnotify simulate: ")
