"""Development keys for ``authnotify dev`` and ``authnotify simulate``, kept under ``.authnotify/``.

Created on the first run and reused afterwards, every file mode 0600 in a 0700 directory:

* ``our-private-key.pem`` / ``our-public-key.pem``: authnotify's RSA key (signs answers and applyToken);
* ``alipay-private-key.pem`` / ``alipay-public-key.pem``: the simulated Alipay's RSA key (signs
  notifications and gateway responses; the ingress verifies with the public half);
* ``token-keys``: the Fernet key that encrypts stored tokens;
* ``merchant-secret``: the Standard Webhooks secret of the local merchant endpoint;
* ``gateway-secret``: what the simulated gateway derives tokens from, so ``simulate`` knows which access
  token an auth code became and can cancel it;
* ``api-key``: the key of the internal API that ``authnotify dev`` serves (every scope), and
  ``api-keys.toml``: the API's keys file holding its hash;
* ``merchants.toml``: the merchant registry pointing ``default`` at the local merchant endpoint;
* ``dev.json``: client ids, ports and URLs of the running dev process (no secrets), read by ``simulate``;
* ``dev.env``: the same configuration as ``AUTHNOTIFY_*`` variables, to run the pieces separately.

``merchants.toml``, ``api-keys.toml``, ``dev.json`` and ``dev.env`` are rewritten on every run (ports may change); the keys
and secrets never are. These are development keys: never configure them in production.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from authnotify.config import DevSettings
from authnotify.config.keys import InvalidKeyError, load_private_key, private_key_pem, public_key_pem
from authnotify.domain.merchants import SECRET_PREFIX, generate_secret
from authnotify.errors import ConfigError

DEFAULT_DEV_DIR: Path = DevSettings.model_fields["dev_dir"].default
DEV_AMS_CLIENT_ID = "SANDBOX_DEV_AMS"
DEV_APS_CLIENT_ID = "2188000000000000"
DEV_CUSTOMER_BELONGS_TO = "ALIPAY_CN"

OUR_PRIVATE_KEY = "our-private-key.pem"
OUR_PUBLIC_KEY = "our-public-key.pem"
ALIPAY_PRIVATE_KEY = "alipay-private-key.pem"
ALIPAY_PUBLIC_KEY = "alipay-public-key.pem"
TOKEN_KEYS = "token-keys"
MERCHANT_SECRET = "merchant-secret"
GATEWAY_SECRET = "gateway-secret"
API_KEY = "api-key"
API_KEYS_FILE = "api-keys.toml"
DEV_API_KEY_NAME = "dev"
MERCHANTS_FILE = "merchants.toml"
DEV_JSON = "dev.json"
DEV_ENV = "dev.env"

FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class DevKeys:
    directory: Path
    our_private_key: RSAPrivateKey
    alipay_private_key: RSAPrivateKey
    token_key: str
    merchant_secret: str
    gateway_secret: bytes
    api_key: str
    created: tuple[str, ...]  # file names made on this run (empty when everything was reused)

    @property
    def our_public_key(self) -> RSAPublicKey:
        return self.our_private_key.public_key()

    @property
    def alipay_public_key(self) -> RSAPublicKey:
        return self.alipay_private_key.public_key()

    def path(self, name: str) -> Path:
        return self.directory / name

    def __repr__(self) -> str:
        return f"DevKeys(directory={str(self.directory)!r}, <redacted>)"


def _problem(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}: {what} (delete it to have a new one created)")


def write_private_file(path: Path, text: str) -> None:
    """Writes ``text`` readable by the owner only, replacing the file atomically."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, FILE_MODE)  # a umask or an earlier file cannot widen it
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise _problem(path, f"cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    os.chmod(path, FILE_MODE)  # tighten a file someone loosened
    return text


def _key_pair(directory: Path, private_name: str, public_name: str, created: list[str]) -> RSAPrivateKey:
    private_path = directory / private_name
    text = _read(private_path)
    if text is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_private_file(private_path, private_key_pem(key))
        created.append(private_name)
    else:
        try:
            key = load_private_key(text)
        except InvalidKeyError as exc:
            raise _problem(private_path, f"not a usable RSA private key ({exc})") from None
    public_path = directory / public_name
    public_text = public_key_pem(key.public_key())
    if _read(public_path) != public_text:  # missing or out of step with its private half
        write_private_file(public_path, public_text)
        created.append(public_name)
    return key


def _token_key(directory: Path, created: list[str]) -> str:
    path = directory / TOKEN_KEYS
    text = _read(path)
    if text is None:
        key = Fernet.generate_key().decode("ascii")
        write_private_file(path, key + "\n")
        created.append(TOKEN_KEYS)
        return key
    key = text.strip()
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise _problem(path, "not a Fernet key") from None
    return key


def _merchant_secret(directory: Path, created: list[str]) -> str:
    path = directory / MERCHANT_SECRET
    text = _read(path)
    if text is None:
        secret = generate_secret(32)
        write_private_file(path, secret + "\n")
        created.append(MERCHANT_SECRET)
        return secret
    secret = text.strip()
    try:
        valid = secret.startswith(SECRET_PREFIX) and len(base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)) >= 24
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise _problem(path, "not a whsec_ Standard Webhooks secret")
    return secret


def _gateway_secret(directory: Path, created: list[str]) -> bytes:
    path = directory / GATEWAY_SECRET
    text = _read(path)
    if text is None:
        secret = secrets.token_hex(32)
        write_private_file(path, secret + "\n")
        created.append(GATEWAY_SECRET)
        return bytes.fromhex(secret)
    try:
        return bytes.fromhex(text.strip())
    except ValueError:
        raise _problem(path, "not hex") from None


def _api_key(directory: Path, created: list[str]) -> str:
    from authnotify.api.keys import KEY_PREFIX, SCOPES, new_api_key

    path = directory / API_KEY
    text = _read(path)
    if text is None:
        key = new_api_key(DEV_API_KEY_NAME, list(SCOPES)).key
        write_private_file(path, key + "\n")
        created.append(API_KEY)
        return key
    key = text.strip()
    if not key.startswith(KEY_PREFIX):
        raise _problem(path, "not an authnotify API key")
    return key


def ensure_dev_keys(directory: Path = DEFAULT_DEV_DIR) -> DevKeys:
    """Loads the development keys under ``directory``, creating what is missing; ConfigError on trouble."""
    directory = directory.expanduser()
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, DIR_MODE)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the development key directory ({exc.strerror})") from None
    created: list[str] = []
    try:
        ours = _key_pair(directory, OUR_PRIVATE_KEY, OUR_PUBLIC_KEY, created)
        alipay = _key_pair(directory, ALIPAY_PRIVATE_KEY, ALIPAY_PUBLIC_KEY, created)
        token_key = _token_key(directory, created)
        secret = _merchant_secret(directory, created)
        gateway_secret = _gateway_secret(directory, created)
        api_key = _api_key(directory, created)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot write development keys ({exc.strerror})") from None
    return DevKeys(directory.resolve(), ours, alipay, token_key, secret, gateway_secret, api_key, tuple(created))


def load_dev_keys(directory: Path = DEFAULT_DEV_DIR) -> DevKeys | None:
    """The development keys if ``authnotify dev`` made them here, else None; never creates anything."""
    directory = directory.expanduser()
    if not (directory / ALIPAY_PRIVATE_KEY).is_file():
        return None
    return ensure_dev_keys(directory)


def write_merchants_file(keys: DevKeys, merchant_url: str) -> Path:
    path = keys.path(MERCHANTS_FILE)
    write_private_file(
        path,
        "# Written by `authnotify dev` on every start: every event goes to the local merchant endpoint.\n"
        "[merchants.default]\n"
        f"url = {json.dumps(merchant_url)}\n"
        f"secret = {json.dumps(keys.merchant_secret)}\n",
    )
    return path


def write_api_keys_file(keys: DevKeys) -> Path:
    """The dev API's keys file: the dev key, with every scope."""
    from authnotify.api.keys import SCOPES, NewKey

    path = keys.path(API_KEYS_FILE)
    entry = NewKey(DEV_API_KEY_NAME, keys.api_key, SCOPES).toml_entry()
    write_private_file(path, "# Written by `authnotify dev` on every start: the key in api-key, every scope.\n" + entry)
    return path


def write_dev_description(keys: DevKeys, description: dict[str, Any], environment: dict[str, str]) -> None:
    """``dev.json`` (what simulate reads: ids, ports, URLs) and ``dev.env`` (AUTHNOTIFY_* lines)."""
    write_private_file(keys.path(DEV_JSON), json.dumps(description, indent=2, sort_keys=True) + "\n")
    lines = ["# Written by `authnotify dev`: the configuration it runs with (development keys only)."]
    lines += [f"{name}={value}" for name, value in environment.items()]
    write_private_file(keys.path(DEV_ENV), "\n".join(lines) + "\n")


def read_dev_description(directory: Path = DEFAULT_DEV_DIR) -> dict[str, Any] | None:
    path = directory.expanduser() / DEV_JSON
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{path}: not readable JSON (start `authnotify dev` again to rewrite it)") from None
    return document if isinstance(document, dict) else None
