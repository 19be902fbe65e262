"""The signature scheme and key loading, checked against answers the openssl CLI computes on its own."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from authnotify.alipay.signature import (
    format_signature_header,
    parse_signature_header,
    sign_content,
    sign_request_headers,
    signature_time,
    signed_content,
    verify_signature_header,
)
from authnotify.config.keys import InvalidKeyError, load_private_key, load_public_key, load_public_key_ring

PATH = "/aps/api/v1/authorizations/authNotify"
CLIENT_ID = "2188120123456789"
REQUEST_TIME = "2026-11-23T10:00:00+08:00"
BODY = b'{"authorizationNotifyType":"TOKEN_CANCELED","accessToken":"x", "reason":"\xe7\x94\xa8\xe6\x88\xb7"}'


def openssl(*args: str, input: bytes | None = None) -> bytes:
    result = subprocess.run(["openssl", *args], input=input, capture_output=True, check=True, timeout=30)
    return result.stdout


class OpensslKeys:
    """One RSA key pair made by ``openssl genpkey``, in every shape the Alipay portals and tools produce."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.private_pem_path = directory / "private.pem"
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(self.private_pem_path))
        self.private_pem = self.private_pem_path.read_text()  # PKCS#8 PEM
        self.public_pem_path = directory / "public.pem"
        openssl("pkey", "-in", str(self.private_pem_path), "-pubout", "-out", str(self.public_pem_path))
        self.public_pem = self.public_pem_path.read_text()  # SubjectPublicKeyInfo PEM
        self.pkcs1_pem = openssl("pkey", "-in", str(self.private_pem_path), "-traditional").decode()
        self.pkcs8_der_b64 = base64.b64encode(
            openssl("pkey", "-in", str(self.private_pem_path), "-outform", "DER")).decode()
        self.pkcs1_der_b64 = base64.b64encode(
            openssl("pkey", "-in", str(self.private_pem_path), "-outform", "DER", "-traditional")).decode()
        self.spki_der_b64 = base64.b64encode(
            openssl("pkey", "-in", str(self.private_pem_path), "-pubout", "-outform", "DER")).decode()

    def sign(self, content: bytes) -> bytes:
        data = self.dir / "content.bin"
        data.write_bytes(content)
        return openssl("dgst", "-sha256", "-sign", str(self.private_pem_path), str(data))

    def verifies(self, content: bytes, signature: bytes) -> bool:
        data, sig = self.dir / "content.bin", self.dir / "signature.bin"
        data.write_bytes(content)
        sig.write_bytes(signature)
        result = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", str(self.public_pem_path), "-signature", str(sig), str(data)],
            capture_output=True, timeout=30,
        )
        return result.returncode == 0 and b"Verified OK" in result.stdout


@pytest.fixture(scope="module")
def ossl(tmp_path_factory: pytest.TempPathFactory) -> OpensslKeys:
    return OpensslKeys(tmp_path_factory.mktemp("openssl"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> OpensslKeys:
    return OpensslKeys(tmp_path_factory.mktemp("openssl-other"))


def test_signed_content_is_the_documented_byte_string() -> None:
    assert signed_content("POST", PATH, CLIENT_ID, REQUEST_TIME, BODY) == (
        b"POST /aps/api/v1/authorizations/authNotify\n2188120123456789.2026-11-23T10:00:00+08:00." + BODY
    )


def test_our_signature_equals_the_one_openssl_computes(ossl: OpensslKeys) -> None:
    content = signed_content("POST", PATH, CLIENT_ID, REQUEST_TIME, BODY)
    expected_raw = ossl.sign(content)  # known answer, computed by openssl alone
    ours = sign_content(load_private_key(ossl.private_pem), content)
    assert ours == quote(base64.b64encode(expected_raw).decode(), safe="")
    assert "%" in ours  # URL-encoded: '=' padding at least is always there
    assert ossl.verifies(content, base64.b64decode(unquote(ours)))


def test_an_openssl_signature_verifies_in_every_form_alipay_sends(ossl: OpensslKeys) -> None:
    content = signed_content("POST", PATH, CLIENT_ID, REQUEST_TIME, BODY)
    raw_b64 = base64.b64encode(ossl.sign(content)).decode()
    keys = load_public_key_ring(ossl.spki_der_b64)
    headers = [
        f"algorithm=RSA256,keyVersion=1,signature={quote(raw_b64, safe='')}",
        f"algorithm=RSA256, keyVersion=0, signature={quote(raw_b64, safe='')}",
        f"algorithm=RSA256,keyVersion=1,signature={raw_b64}",  # not URL-encoded
        f"  algorithm=RSA256 ,  signature={raw_b64} , keyVersion=2 ",
        f"Algorithm=rsa256,KEYVERSION=1,Signature={quote(raw_b64, safe='')}",
    ]
    for header in headers:
        assert verify_signature_header(keys, header, method="POST", path=PATH, client_id=CLIENT_ID,
                                       time=REQUEST_TIME, body=BODY), header


def test_the_canonical_header_parses_like_its_lenient_spellings(ossl: OpensslKeys) -> None:
    """Alipay's exact form takes a fast path through the parser; it must read the same as every other form."""
    raw = ossl.sign(signed_content("POST", PATH, CLIENT_ID, REQUEST_TIME, BODY))
    raw_b64 = base64.b64encode(raw).decode()
    canonical = parse_signature_header(f"algorithm=RSA256,keyVersion=7,signature={quote(raw_b64, safe='')}")
    assert (canonical.algorithm, canonical.key_version, canonical.signature) == ("RSA256", "7", raw)
    for spelling in (f"algorithm=RSA256, keyVersion=7, signature={quote(raw_b64, safe='')}",
                     f"Algorithm=rsa256,KEYVERSION=7,signature={raw_b64}",
                     f" signature={quote(raw_b64, safe='')} ,keyVersion=7,algorithm=RSA256 "):
        assert parse_signature_header(spelling) == canonical, spelling
    # What looks canonical but is not (a non-numeric version, a stray escape) goes the general way.
    assert parse_signature_header(f"algorithm=RSA256,keyVersion=x,signature={raw_b64}").key_version == "x"
    with pytest.raises(ValueError):
        parse_signature_header(f"algorithm=RSA256,keyVersion=1,signature={raw_b64[:-4]}%21%21")


@pytest.mark.parametrize("change", ["body", "path", "client_id", "time", "method"])
def test_a_signature_over_anything_else_does_not_verify(ossl: OpensslKeys, change: str) -> None:
    raw_b64 = base64.b64encode(ossl.sign(signed_content("POST", PATH, CLIENT_ID, REQUEST_TIME, BODY))).decode()
    header = format_signature_header(quote(raw_b64, safe=""))
    request = {"method": "POST", "path": PATH, "client_id": CLIENT_ID, "time": REQUEST_TIME, "body": BODY}
    request[change] = {"body": BODY + b" ", "path": "/ams/notifyAuthorization", "client_id": CLIENT_ID + "0",
                       "time": "1795413600000", "method": "GET"}[change]
    assert not verify_signature_header(load_public_key_ring(ossl.public_pem), header, **request)  # type: ignore[arg-type]


def test_a_signature_by_another_key_does_not_verify(ossl: OpensslKeys, other: OpensslKeys) -> None:
    content = signed_content("POST", PATH, CLIENT_ID, REQUEST_TIME, BODY)
    header = format_signature_header(quote(base64.b64encode(other.sign(content)).decode(), safe=""))
    assert not verify_signature_header(load_public_key_ring(ossl.public_pem), header, method="POST", path=PATH,
                                       client_id=CLIENT_ID, time=REQUEST_TIME, body=BODY)


@pytest.mark.parametrize("header", [
    None, "", "signature", "algorithm=RSA256,keyVersion=1", "algorithm=RSA,keyVersion=1,signature=AAAA",
    "algorithm=RSA256,keyVersion=1,signature=not*base64", "algorithm=RSA256,keyVersion=1,signature=QUJD",
])
def test_malformed_signature_headers_do_not_verify(ossl: OpensslKeys, header: str | None) -> None:
    assert not verify_signature_header(load_public_key_ring(ossl.public_pem), header, method="POST", path=PATH,
                                       client_id=CLIENT_ID, time=REQUEST_TIME, body=BODY)


def test_request_headers_we_sign_verify_with_openssl(ossl: OpensslKeys) -> None:
    headers = sign_request_headers(load_private_key(ossl.pkcs8_der_b64), method="POST",
                                   path="/ams/api/v1/authorizations/applyToken", client_id="C1", body=BODY)
    assert set(headers) == {"Client-Id", "Request-Time", "Signature"}
    parsed = parse_signature_header(headers["Signature"])
    assert headers["Signature"].startswith("algorithm=RSA256,keyVersion=1,signature=")
    content = f"POST /ams/api/v1/authorizations/applyToken\nC1.{headers['Request-Time']}.".encode() + BODY
    assert ossl.verifies(content, parsed.signature)


def test_signature_time_is_iso_8601_with_an_offset() -> None:
    value = signature_time()
    assert len(value) == 25 and value[10] == "T" and value.endswith("+00:00")


def test_every_private_key_format_loads_to_the_same_key(ossl: OpensslKeys) -> None:
    content = b"known content"
    expected = quote(base64.b64encode(ossl.sign(content)).decode(), safe="")
    for name, value in {
        "PKCS#8 PEM": ossl.private_pem,
        "PKCS#1 PEM": ossl.pkcs1_pem,
        "bare base64 PKCS#8": ossl.pkcs8_der_b64,
        "bare base64 PKCS#1": ossl.pkcs1_der_b64,
        "bare base64 with line breaks": "\n".join(ossl.pkcs8_der_b64[i:i + 64]
                                                   for i in range(0, len(ossl.pkcs8_der_b64), 64)),
        "@file": f"@{ossl.private_pem_path}",
    }.items():
        assert sign_content(load_private_key(value), content) == expected, name


def test_every_public_key_format_loads_to_the_same_key(ossl: OpensslKeys, tmp_path: Path) -> None:
    bare = tmp_path / "alipay_public_key.txt"
    bare.write_text(ossl.spki_der_b64 + "\n")
    expected = load_public_key(ossl.public_pem).public_numbers()
    for name, value in {
        "SPKI PEM": ossl.public_pem,
        "bare base64 SPKI": ossl.spki_der_b64,
        "@file with bare base64": f"@{bare}",
        "@file with PEM": f"@{ossl.public_pem_path}",
    }.items():
        assert load_public_key(value).public_numbers() == expected, name
        assert load_public_key_ring(value).for_version("7").public_numbers() == expected, name  # type: ignore[union-attr]


def test_a_key_version_map_picks_the_key_by_version(ossl: OpensslKeys, other: OpensslKeys, tmp_path: Path) -> None:
    mapping = json.dumps({"1": ossl.spki_der_b64, "2": other.public_pem})
    map_file = tmp_path / "keys.json"
    map_file.write_text(mapping)
    content = signed_content("POST", PATH, CLIENT_ID, REQUEST_TIME, BODY)
    by_other = quote(base64.b64encode(other.sign(content)).decode(), safe="")
    for value in (mapping, f"@{map_file}"):
        ring = load_public_key_ring(value)
        assert ring.for_version("3") is None
        for version, expected in (("2", True), ("1", False), ("3", False)):
            header = format_signature_header(by_other, version)
            assert verify_signature_header(ring, header, method="POST", path=PATH, client_id=CLIENT_ID,
                                           time=REQUEST_TIME, body=BODY) is expected, version


def test_bad_keys_are_rejected_without_showing_the_value(ossl: OpensslKeys, tmp_path: Path) -> None:
    ec_pem = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256").decode()
    secret_looking = "MIIEvSECRETSECRETSECRET"
    private_cases = {
        "empty": "",
        "not base64": "not a key at all!",
        "base64 but not a key": base64.b64encode(b"hello world, not DER").decode(),
        "truncated": ossl.pkcs8_der_b64[:200],
        "a public key": ossl.public_pem,
        "an EC key": ec_pem,
        "secret-looking garbage": secret_looking,
        "missing file": f"@{tmp_path}/nope.pem",
    }
    for name, value in private_cases.items():
        with pytest.raises(InvalidKeyError) as error:
            load_private_key(value)
        assert secret_looking not in str(error.value), name
    public_cases = {
        "empty": "",
        "a private key": ossl.private_pem,
        "not base64": "%%%",
        "bad JSON map": '{"1": ',
        "empty map": "{}",
        "map with a non-string": '{"1": 5}',
        "map with a bad key": json.dumps({"1": ossl.spki_der_b64, "2": "garbage"}),
        "missing file": f"@{tmp_path}/nope.pem",
    }
    for value in public_cases.values():
        with pytest.raises(InvalidKeyError):
            load_public_key_ring(value)
