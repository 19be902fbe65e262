"""Structured logging: structlog, one JSON object a line by default, secrets redacted.

Our own lines and every library's (asyncio, aiohttp, aio-pika, SQLAlchemy: whatever uses the standard
``logging`` module) go through the same processors and the same renderer, so a line is JSON whoever wrote it
and nothing escapes the redaction: fields named like secrets are replaced, free text (a library's message,
an exception's traceback) has secret-looking values masked, and so have the secret values of the message
being handled (see :func:`handling_body`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import orjson
import structlog

from authnotify.observability import tracing
from authnotify.observability.redaction import (
    REDACTED,
    is_secret_field,
    longest_first,
    mask_secret_text,
    mask_values,
    redact,
    secret_values,
)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}



class _HandledBody:
    """The raw body of the message a task is handling; its secret values, found on the first line that
    needs them and kept for the others (a message's every line would otherwise parse its JSON again)."""

    __slots__ = ("body", "_secrets")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._secrets: list[str] | None = None

    def mask(self, text: str) -> str:
        if self._secrets is None:
            self._secrets = longest_first(secret_values(self.body))
        return mask_values(text, self._secrets)


# The message this task is handling: its secret values are masked in tracebacks and in any line logged
# meanwhile. Bytes are kept, not parsed, until a line with free text needs them.
_handled_body: ContextVar[_HandledBody | None] = ContextVar("authnotify_handled_body", default=None)

# Libraries that narrate what our own lines already say (every reconnect attempt of aio-pika is an ERROR
# of aiormq while the broker is down: `broker_unreachable` says it once): silent unless the level is debug,
# and even then never below INFO: their DEBUG lines dump whole AMQP frames, message bodies (tokens) included.
_NARRATORS = ("aiormq", "aio_pika")

# Fields holding free text that a library or an exception wrote: the ones redact_text looks into.
_FREE_TEXT_FIELDS = ("event", "exception", "error", "detail", "reason")


@contextmanager
def handling_body(body: bytes) -> Iterator[None]:
    """While handling a message: mask its secret values in every line logged meanwhile."""
    token = _handled_body.set(_HandledBody(body))
    try:
        yield
    finally:
        _handled_body.reset(token)


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if is_secret_field(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact(event_dict[key])
    return event_dict


def redact_text(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Masks secrets inside free text: ``accessToken=...`` and the like, and the handled message's secrets.

    Runs after the traceback is rendered, on the few fields that carry text nobody here wrote.
    """
    body = _handled_body.get()
    for key in _FREE_TEXT_FIELDS:
        value = event_dict.get(key)
        if isinstance(value, str) and value:
            value = mask_secret_text(value)
            if body is not None:
                value = body.mask(value)
            event_dict[key] = value
    return event_dict


def _json_dumps(value: Any, **kwargs: Any) -> str:
    """orjson is several times faster than json.dumps, and the ingress writes a line per request."""
    try:
        return orjson.dumps(value, default=kwargs.get("default", str), option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # e.g. an int beyond 64 bits: the standard library copes
        return json.dumps(value, **kwargs)


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is now, not the stream it was when configured
    (test runners and daemons swap it, and a closed captured stream must not break a request)."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        try:
            stream.write(message + "\n")
            stream.flush()
        except (ValueError, OSError):  # closed or broken stream: losing a log line beats failing work
            pass

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


class _StderrHandler(logging.Handler):
    """The standard library's records, formatted by structlog, written like our own lines."""

    def __init__(self) -> None:
        super().__init__()
        self._out = _StderrLogger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:  # a record that cannot be formatted must not break the code that logged it
            self.handleError(record)


def _renderer(log_format: str) -> Any:
    if log_format == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.JSONRenderer(serializer=_json_dumps)


def configure_logging(log_format: str = "json", level: int | str = logging.INFO, *,
                      library_level: int | None = None) -> None:
    """Our lines at ``level`` and above; the libraries' at ``library_level`` (default: ``level``, but never
    below WARNING unless ``level`` is DEBUG: their INFO chatter is not ours to show)."""
    if isinstance(level, str):
        level = LEVELS[level]
    if library_level is None:
        library_level = level if level <= logging.DEBUG else max(level, logging.WARNING)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer = _renderer(log_format)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        tracing.add_trace_id,
        structlog.processors.add_log_level,
        timestamper,
        redact_secrets,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact_text, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_text,
            renderer,
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(library_level)
    for name in _NARRATORS:
        logging.getLogger(name).setLevel(logging.INFO if level <= logging.DEBUG else logging.CRITICAL + 1)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)


def annotate(**fields: Any) -> None:
    """Adds fields to the one log line the consumer runtime writes for the message being handled.

    A handler calls this instead of logging a line of its own: one structured line per message, with the
    message id, the outcome and what the handler found (a line costs ~0.1 ms of a worker's ~2 ms budget).
    """
    structlog.contextvars.bind_contextvars(**fields)
    tracing.annotate_span(fields)  # its identifiers go on the message's span too
