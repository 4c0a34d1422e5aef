"""Request bodies and fields, for both routers: one JSON parser, one set of field checks, one error.

Everything here raises ``FieldError`` (a message, the field it is about, and an HTTP status
meant for the web app: 400 unreadable body, 415 not JSON, 422 bad field). The app maps it
to each router's shape: OpenAI's ``{"error": {...}}`` (status 400, ``param`` = the field)
under ``/v1``, the web app's ``{"error", "field"}`` elsewhere (see ``app.field_error_handler``).

Bodies must be sent as ``application/json``. For the web app that closes form-based CSRF
(a cross-site HTML form cannot send that type); for ``/v1`` it makes a cross-site ``fetch``
need a CORS preflight, which this server never grants, so a web page the user visits
cannot drive the API. Nesting deeper than ``MAX_JSON_DEPTH`` is refused with a 400 that
says so, instead of a ``RecursionError`` and a 500.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from chatforge.io import MAX_JSON_DEPTH, JSONTooDeep, parse_json

__all__ = ["FieldError", "MAX_JSON_DEPTH", "get_bool", "get_float", "get_int", "get_str", "get_str_list",
           "parse_object", "read_object", "require_json"]

_MISSING = object()


class FieldError(Exception):
    """A request body or field that cannot be used; ``field`` names it (None: the whole body)."""

    def __init__(self, message: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON for an error message, cut short (a 1 MB string must not come back whole)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- bodies


def require_json(request: Request) -> None:
    """415 unless the request says ``Content-Type: application/json``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise FieldError(f"request bodies must be JSON (Content-Type: application/json), got {ctype or 'none'!r}",
                         status=415)


def parse_object(raw: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """The JSON object in ``raw``; 400 for bad UTF-8, malformed JSON, too deep nesting or a non-object."""
    if empty_ok and not raw.strip():
        return {}
    try:
        body = parse_json(raw, MAX_JSON_DEPTH)
    except JSONTooDeep:
        raise FieldError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep; "
                         "flatten it", status=400) from None
    except UnicodeDecodeError as e:
        raise FieldError(f"the request body is not valid JSON: not UTF-8 at byte {e.start}", status=400) from None
    except json.JSONDecodeError as e:
        raise FieldError(f"the request body is not valid JSON: {e}", status=400) from None
    if not isinstance(body, dict):
        raise FieldError(f"the request body must be a JSON object, got {type(body).__name__}", status=400)
    return body


async def read_object(request: Request, *, empty_ok: bool = False) -> dict[str, Any]:
    """The request's JSON object body (``require_json`` + ``parse_object``)."""
    require_json(request)
    return parse_object(await request.body(), empty_ok=empty_ok)


# --------------------------------------------------------------------------- fields


def get_str(body: dict[str, Any], name: str, *, required: bool = True, default: str | None = None,
            max_len: int | None = None, allow_empty: bool = False) -> str | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise FieldError(f"field {name!r} is required", name)
        return default
    if not isinstance(value, str):
        raise FieldError(f"field {name!r} must be a string, got {_show(value)}", name)
    if not allow_empty and not value.strip():
        raise FieldError(f"field {name!r} must not be empty", name)
    if max_len is not None and len(value) > max_len:
        raise FieldError(f"field {name!r} is too long: {len(value)} characters, at most {max_len}", name)
    return value


def get_int(body: dict[str, Any], name: str, *, required: bool = True, default: int | None = None,
            lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise FieldError(f"field {name!r} is required", name)
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        rng = "" if lo is None and hi is None else f" >= {lo}" if hi is None else \
            f" <= {hi}" if lo is None else f" in [{lo}, {hi}]"
        raise FieldError(f"field {name!r} must be an integer{rng}, got {_show(value)}", name)
    return value


def get_float(body: dict[str, Any], name: str, *, lo: float, hi: float, default: float | None = None,
              lo_open: bool = False) -> float | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (lo < value if lo_open else lo <= value) or value > hi:
        raise FieldError(f"field {name!r} must be a number in {'(' if lo_open else '['}{lo}, {hi}], "
                         f"got {_show(value)}", name)
    return float(value)


def get_bool(body: dict[str, Any], name: str, *, default: bool = False) -> bool:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(f"field {name!r} must be true or false, got {_show(value)}", name)
    return value


def get_str_list(body: dict[str, Any], name: str, *, required: bool = True) -> list[str]:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise FieldError(f"field {name!r} is required", name)
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FieldError(f"field {name!r} must be a list of strings", name)
    return value
