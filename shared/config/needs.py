"""What each process needs of the configuration, checked once at its start.

Settings are read the same way everywhere (:mod:`authnotify.config.settings`); what a process must have
depends on its job. Each process declares a set of :class:`Need` and calls :func:`check_needs` first thing:
the first missing or unreadable variable stops it with one line naming that variable (exit 2), and nothing it
does not need is ever read, so the merchant deliverer starts without RSA keys and the ingress without token
keys or a database. Who declares what:

* ``authnotify ingress``: :data:`authnotify.ingress.server.INGRESS_NEEDS`;
* ``authnotify worker NAME``: each consumer's line in :mod:`authnotify.workers.registry`;
* the operator commands: :data:`authnotify.cli.main.COMMAND_NEEDS`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from authnotify.config.settings import ENV_PREFIX, Settings
from authnotify.errors import ConfigError


class Need(enum.Enum):
    """One thing a process uses; the value says what it is, for messages and the docs."""

    BROKER = "the broker (AUTHNOTIFY_RABBITMQ_URL)"
    DATABASE = "the database (AUTHNOTIFY_DATABASE_URL)"
    TOKEN_KEYS = "the token keys (AUTHNOTIFY_TOKEN_KEYS)"
    # At least one provider's client id, and for every configured provider our private key and Alipay's
    # public key (the notify endpoints verify with the one and sign answers with the other).
    ALIPAY_KEYS = "each configured provider's private key and Alipay public key"
    # applyToken for AMS sends customerBelongsTo; needed only where AMS is configured.
    AMS_CUSTOMER_BELONGS_TO = "AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO where AMS is configured"
    MERCHANTS_FILE = "the merchant registry (AUTHNOTIFY_MERCHANTS_FILE)"


def _check(settings: Settings, need: Need) -> None:
    if need is Need.TOKEN_KEYS:
        settings.require_token_keys()
    elif need is Need.ALIPAY_KEYS:
        if not settings.configured_providers():
            raise ConfigError(
                f"{ENV_PREFIX}AMS_CLIENT_ID or {ENV_PREFIX}APS_CLIENT_ID: no provider configured (set at least one)"
            )
        settings.providers()  # reads and parses every configured provider's keys
    elif need is Need.AMS_CUSTOMER_BELONGS_TO:
        if "ams" in settings.configured_providers() and not settings.ams_customer_belongs_to:
            raise ConfigError(
                f"{ENV_PREFIX}AMS_CUSTOMER_BELONGS_TO is required when {ENV_PREFIX}AMS_CLIENT_ID is set"
            )
    elif need is Need.MERCHANTS_FILE:
        if settings.merchants_file is None:
            raise ConfigError(f"{ENV_PREFIX}MERCHANTS_FILE: required by the merchant-events worker "
                              "(a TOML merchant registry)")
    # BROKER and DATABASE have defaults (the local broker, a SQLite file): declared, nothing more to check.


def check_needs(settings: Settings, needs: Iterable[Need]) -> None:
    """Raises :class:`ConfigError` (one line naming the variable) for the first need that is not met."""
    wanted = set(needs)
    for need in Need:  # a fixed order, so the same configuration always names the same variable
        if need in wanted:
            _check(settings, need)
