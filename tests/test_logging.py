"""Logs: every library's records go through the same JSON output and redaction; levels; tracebacks kept."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from authnotify.errors import PermanentError
from authnotify.messaging.consumer import ConsumerSpec, DeliveryProcessor, MessageContext
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.observability.logging import configure_logging, get_logger
from tests.fakes import notification_delivery

ACCESS_TOKEN = "281UT3C0aYAhE2bK2iVqfyXpZ5f0Rza5mA0P5ytj4iu1XUZT9e2"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(captured: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in captured.splitlines() if line.strip()]


def test_a_library_record_is_a_json_line_with_its_secrets_masked(restore_logging: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    logging.getLogger("asyncio").error("Task exception was never retrieved: Grant(accessToken=%s, x=1)", ACCESS_TOKEN)
    logging.getLogger("aiohttp.server").info("chatter below the libraries' floor")
    get_logger("authnotify.test").info("ours", refreshToken=ACCESS_TOKEN, detail=f"accessToken={ACCESS_TOKEN}")

    captured = capsys.readouterr().err
    assert ACCESS_TOKEN not in captured
    [library, ours] = lines(captured)
    assert library["logger"] == "asyncio" and library["level"] == "error" and "timestamp" in library
    assert library["event"] == "Task exception was never retrieved: Grant(accessToken=[redacted], x=1)"
    assert ours["refreshToken"] == "[redacted]" and ours["detail"] == "accessToken=[redacted]"


@pytest.mark.parametrize(("level", "shown"), [
    ("debug", {"ours-debug", "ours-info", "ours-warning", "lib-debug", "lib-info", "lib-warning"}),
    ("info", {"ours-info", "ours-warning", "lib-warning"}),
    ("warning", {"ours-warning", "lib-warning"}),
    ("error", set()),
])
# aio-pika and aiormq narrate every reconnect attempt that our own `broker_unreachable` line already reports:
# they are heard only at debug.
def test_the_log_level_applies_to_our_lines_and_the_libraries(restore_logging: None, level: str, shown: set[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", level)
    ours, library = get_logger("authnotify.test"), logging.getLogger("aiohttp.client")
    for name in ("debug", "info", "warning"):
        getattr(ours, name)(f"ours-{name}")
        getattr(library, name)(f"lib-{name}")
    assert {line["event"] for line in lines(capsys.readouterr().err)} == shown


async def test_an_unexpected_handler_error_keeps_its_traceback_without_the_messages_secrets(
    restore_logging: None, capsys: pytest.CaptureFixture[str], offline_settings: Any,
) -> None:
    configure_logging("json", "info")

    async def broken(_parsed: Any, _context: MessageContext) -> None:
        token = orjson.loads(_parsed)["accessToken"]
        raise KeyError(f"no row for {token}")

    body = orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": ACCESS_TOKEN})
    spec = ConsumerSpec(Consumer.TOKEN_CREATED, lambda raw, _context: raw, broken)
    await DeliveryProcessor(build_topology(offline_settings()), InMemoryPublisher()).process(
        spec, notification_delivery(body))

    captured = capsys.readouterr().err
    assert ACCESS_TOKEN not in captured
    [line] = [line for line in lines(captured) if line["event"] == "message_failed"]
    assert line["outcome"] == "retried" and "Traceback (most recent call last)" in line["exception"]
    assert "in broken" in line["exception"] and "no row for [redacted]" in line["exception"]


async def test_an_expected_failure_logs_its_reason_without_a_traceback(
    restore_logging: None, capsys: pytest.CaptureFixture[str], offline_settings: Any,
) -> None:
    configure_logging("json", "info")

    async def refuse(_parsed: Any, _context: MessageContext) -> None:
        raise PermanentError("applyToken answered F INVALID_CODE")

    spec = ConsumerSpec(Consumer.TOKEN_CREATED, lambda raw, _context: raw, refuse)
    await DeliveryProcessor(build_topology(offline_settings()), InMemoryPublisher()).process(
        spec, notification_delivery(b"{}"))
    [line] = [line for line in lines(capsys.readouterr().err) if line["event"] == "message_failed"]
    assert line["reason"] == "applyToken answered F INVALID_CODE" and "exception" not in line


@pytest.mark.slow
def test_version_and_a_misspelled_variable_named_with_the_closest_known_one(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_") or k.startswith("AUTHNOTIFY_TEST_")}
    version = subprocess.run([sys.executable, "-m", "authnotify", "--version"], env=clean, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("authnotify ") and version.stderr == ""

    (tmp_path / ".env").write_text("AUTHNOTIFY_NAMESPAC=oops\n")
    env = {**clean, "AUTHNOTIFY_RABITMQ_URL": "amqp://guest:guest@127.0.0.1:1/", "AUTHNOTIFY_ZZZ": "1"}
    result = subprocess.run([sys.executable, "-m", "authnotify", "dlq", "purge"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "authnotify: warning: unknown variable AUTHNOTIFY_NAMESPAC (did you mean AUTHNOTIFY_NAMESPACE?); it is ignored",
        "authnotify: warning: unknown variable AUTHNOTIFY_RABITMQ_URL (did you mean AUTHNOTIFY_RABBITMQ_URL?); "
        "it is ignored",
        "authnotify: warning: unknown variable AUTHNOTIFY_ZZZ; it is ignored",
    ]
    assert result.returncode == 2  # and it carried on to the command's own answer (purge needs --yes)


@pytest.mark.parametrize(("level", "heard"), [("info", False), ("debug", True)])
def test_the_brokers_reconnect_narration_is_heard_only_at_debug(restore_logging: None, level: str, heard: bool,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", level)
    logging.getLogger("aiormq.connection").error("error when creating transport")
    # Never their frame dumps, even at debug: those carry whole message bodies, tokens included.
    logging.getLogger("aiormq.connection").debug("Prepare to send ChannelFrame(payload=b'...')")
    assert [line["event"] for line in lines(capsys.readouterr().err)] == (
        ["error when creating transport"] if heard else [])
