"""The OpenAPI 3.1 document of the internal API, made from the same route table as the router.

Schemas are the pydantic models' JSON Schemas (2020-12, which OpenAPI 3.1 uses as it is).
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from authnotify.api.models import Problem
from authnotify.api.problems import PROBLEM_CONTENT_TYPE
from authnotify.api.routes import HEALTH_ROUTES, ROUTES

_ERROR_TEXT = {400: "bad request (a problem says which parameter or field)", 401: "no key, or an unknown key",
               403: "the key lacks the route's scope", 404: "no such authorization", 409: "not active",
               503: "refresh pending, or the database or the broker unavailable (retry)"}
_DESCRIPTION = ("Authorizations, their access tokens and revocations for the payment services; dead letters and "
                "queues for operators (the console at / uses the same operations). Keys carry scopes; errors are "
                "RFC 9457 problems.")


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _version() -> str:
    try:
        return metadata.version("authnotify")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
        return "0"


@functools.cache
def openapi_document() -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    problem = {"content": {PROBLEM_CONTENT_TYPE: {"schema": _schema(Problem, components)}}}
    for route in ROUTES:
        operation: dict[str, Any] = {"summary": route.summary, "operationId": route.handler}
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in ("key", "command_id") if "{" + name + "}" in route.path]
        parameters += [{"name": name, "in": "query", "required": False, "description": text,
                        "schema": {"type": "string"}} for name, text in route.query]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {"required": route.body_required,
                                        "content": {"application/json": {"schema": _schema(route.body, components)}}}
        answer: dict[str, Any] = {"description": route.summary}
        if route.answer is not None:
            answer["content"] = {"application/json": {"schema": _schema(route.answer, components)}}
        else:
            answer["content"] = {"application/json": {"schema": {"type": "object"}}}
        operation["responses"] = {str(route.status): answer,
                                  **{str(code): {"description": _ERROR_TEXT[code], **problem} for code in route.errors}}
        if route.scope is not None:
            operation["security"] = [{"apiKey": [route.scope.value]}]
            operation["x-scope"] = route.scope.value
        else:
            operation["security"] = []
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    for method, path, summary in HEALTH_ROUTES:
        paths.setdefault(path, {})[method.lower()] = {
            "summary": summary, "operationId": path.strip("/"), "security": [],
            "responses": {"200": {"description": summary}},
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "authnotify internal API", "version": _version(),
                 "description": _DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "an API key of AUTHNOTIFY_API_KEYS_FILE"}},
        },
    }
