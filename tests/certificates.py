"""Test certificates made with the openssl command: a CA, a server certificate it signs, an unrelated CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestCertificates:
    ca: Path  # signed server.pem
    other_ca: Path  # signed nothing here: a client trusting it must refuse the server
    server_certificate: Path  # for localhost and 127.0.0.1
    server_key: Path


def make_test_certificates(directory: Path) -> TestCertificates:
    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr[-2000:]}"

    for name in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=authnotify test {name}",
                "-keyout", f"{name}.key", "-out", f"{name}.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "san.ext", "-out", "server.pem")
    return TestCertificates(directory / "ca.pem", directory / "other-ca.pem", directory / "server.pem",
                            directory / "server.key")
