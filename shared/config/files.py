"""Configuration files operators write (the merchant registry, the API keys): read the one way.

Both are TOML documents with one top-level table of named entries; a document that is not that is refused with
one line naming the file's variable and what to add.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from authnotify.errors import ConfigError


def read_config_file(path: Path | str, variable: str) -> tuple[str, str]:
    """The text of the file ``variable`` names, and the ``variable=path`` every error about it starts with."""
    source = f"{variable}={path}"
    try:
        return Path(path).read_text(encoding="utf-8"), source
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read ({exc.strerror or type(exc).__name__})") from None


def named_tables(text: str, source: str, table: str, example: str) -> dict[str, Any]:
    """The entries of ``[table.<name>]`` in ``text``; :class:`ConfigError` when there are none or others."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({str(exc).splitlines()[0]})") from None
    unknown = sorted(set(document) - {table})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r} (only [{table}.*] tables)")
    entries = document.get(table)
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{source}: defines no {table} (add {example})")
    return entries
