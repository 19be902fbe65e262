"""RFC 9457 problem details: every error the API answers is one of these, as ``application/problem+json``."""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:authnotify:problem:"


class ApiProblem(Exception):
    """Raised by a handler (or the key check) to answer a problem."""

    def __init__(self, status: int, kind: str, detail: str | None = None, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or kind)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}


def problem_response(status: int, kind: str, detail: str | None = None, *,
                     headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": PROBLEM_TYPE_PREFIX + kind, "title": HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    return web.Response(body=orjson.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE,
                        headers=headers)
