"""`authnotify verify-signature`: a captured notification checked as the ingress would, naming what fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from authnotify.alipay.verification import explain_notification_signature
from authnotify.config import Settings
from authnotify.config.keys import load_public_key_ring
from tests.conftest import AMS_CLIENT_ID
from tests.conftest import TestKeys as Keys
from tests.ingress_harness import PROVIDER_CASES, epoch_ms_request_time, notification_headers

AMS = PROVIDER_CASES[0]
BODY = orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": "AT-captured"})
DAY = 24 * 3600.0


def verdict(keys: Keys, headers: dict[str, str], body: bytes = BODY, *, path: str = AMS.path,
            other_paths: tuple[str, ...] = (), key_ring: str | None = None) -> tuple[bool, str | None, str]:
    result = explain_notification_signature(
        keys=load_public_key_ring(key_ring or keys.alipay.public_pem), client_id=AMS_CLIENT_ID, path=path,
        headers=headers, body=body, tolerance_seconds=26 * 3600, other_paths=other_paths)
    return result.valid, result.part, result.line()


def test_a_good_capture_is_valid_whatever_the_header_case(keys: Keys) -> None:
    headers = notification_headers(keys.alipay.private_key, AMS, BODY, lower_case=True)
    assert verdict(keys, headers) == (True, None, "valid")


@pytest.mark.parametrize(("change", "part", "words"), [
    ({"Client-Id": "SANDBOX_SOMEONE_ELSE"}, "client id", "'SANDBOX_SOMEONE_ELSE', ours is"),
    ({"Client-Id": None}, "client id", "no Client-Id header"),
    ({"Request-Time": "2001-01-01T00:00:00Z"}, "request time", "at most 26 h old"),
    ({"Request-Time": "not-a-time"}, "request time", "'not-a-time'"),
    ({"Signature": "algorithm=RSA256,keyVersion=1"}, "signature over the body", "malformed"),
    ({"Signature": None}, "signature over the body", "no Signature header"),
])
def test_each_broken_part_is_named(keys: Keys, change: dict[str, str | None], part: str, words: str) -> None:
    headers = notification_headers(keys.alipay.private_key, AMS, BODY)
    for name, value in change.items():
        if value is None:
            headers.pop(name)
        else:
            headers[name] = value
    valid, failed, line = verdict(keys, headers)
    assert (valid, failed) == (False, part) and line.startswith(f"{part}: ") and words in line


def test_a_key_version_without_a_key_is_named(keys: Keys) -> None:
    ring = json.dumps({"1": keys.alipay.public_pem})
    headers = notification_headers(keys.alipay.private_key, AMS, BODY, key_version="2")
    valid, failed, line = verdict(keys, headers, key_ring=ring)
    assert (valid, failed) == (False, "key version") and "keyVersion '2'" in line and "configured: 1" in line


def test_a_changed_body_or_another_key_is_the_signature_over_the_body(keys: Keys) -> None:
    headers = notification_headers(keys.alipay.private_key, AMS, BODY)
    assert verdict(keys, headers, BODY + b" ")[1] == "signature over the body"
    assert verdict(keys, notification_headers(keys.ours.private_key, AMS, BODY))[1] == "signature over the body"


def test_a_path_a_proxy_changed_is_named_with_the_fix(keys: Keys) -> None:
    # Alipay called https://host/alipay/ams/notifyAuthorization; a proxy stripped /alipay.
    headers = notification_headers(keys.alipay.private_key, AMS, BODY, signed_path="/alipay" + AMS.path,
                                   request_time=epoch_ms_request_time())
    valid, failed, line = verdict(keys, headers, other_paths=("/alipay" + AMS.path, AMS.path))
    assert (valid, failed) == (False, "path")
    assert "verifies over /alipay/ams/notifyAuthorization" in line and "AUTHNOTIFY_NOTIFY_PATH_PREFIX" in line
    # Configured with the prefix, the same capture is valid.
    assert verdict(keys, headers, path="/alipay" + AMS.path)[0] is True


@pytest.mark.slow
def test_the_command_prints_one_line_and_exits_by_the_verdict(
    offline_settings: Callable[..., Settings], keys: Keys, tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_") or k.startswith("AUTHNOTIFY_TEST_")}
    env.update(AUTHNOTIFY_AMS_CLIENT_ID=AMS_CLIENT_ID, AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY=keys.alipay.public_pem)
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY)
    headers = notification_headers(keys.alipay.private_key, AMS, BODY)
    (tmp_path / "headers.txt").write_text("POST /ams/notifyAuthorization HTTP/1.1\n"
                                          + "".join(f"{k}: {v}\n" for k, v in headers.items()))

    def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "authnotify", "verify-signature", "--provider", "ams", *args],
                              env=env, cwd=tmp_path, input=stdin, capture_output=True, timeout=60)

    good = run("--headers", "headers.txt", "--body", "-", stdin=BODY)
    assert (good.returncode, good.stdout, good.stderr) == (0, b"valid\n", b"")

    body_file.write_bytes(BODY + b"\n")
    bad = run("--headers", "headers.txt", "--body", "body.json", "--json")
    assert bad.returncode == 1 and bad.stderr == b""
    answer = json.loads(bad.stdout)
    assert answer["valid"] is False and answer["failed"] == "signature over the body"

    missing = run("--headers", "nope.txt", "--body", "body.json")
    assert missing.returncode == 2 and missing.stdout == b""
    assert missing.stderr.decode().count("\n") == 1 and "cannot read the headers from nope.txt" in missing.stderr.decode()

    no_aps = subprocess.run([sys.executable, "-m", "authnotify", "verify-signature", "--provider", "aps",
                             "--headers", "headers.txt", "--body", "body.json"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert no_aps.returncode == 2 and "AUTHNOTIFY_APS_CLIENT_ID" in no_aps.stderr and no_aps.stderr.count("\n") == 1
