"""OpenAI-style error objects: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["APIError", "error_body", "error_response", "validation_message"]


class APIError(Exception):
    """An error answered to the client with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @classmethod
    def bad_request(cls, message: str, *, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, param=param, code=code or "invalid_value")  # every 400 names a code


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param), "code": code}}


def _printable(text: str | None) -> str | None:
    # a message may quote client text; lone surrogates cannot be encoded as UTF-8, so escape them
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, type=err.type, param=err.param, code=err.code),
        status_code=err.status,
        headers=err.headers,
    )


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) from pydantic/FastAPI validation errors: the first error, made readable."""
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    kind = str(first.get("type", ""))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # drop the union-branch names pydantic inserts (e.g. 'str', 'list[str]', 'function-after[...]')
    loc = [
        p for p in loc if not any(ch in p for ch in "[]") and p not in ("str", "list", "dict", "int", "float")
    ]
    param = ".".join(loc) or None
    if kind in ("json_invalid", "json_type"):
        ctx = first.get("ctx") or {}
        detail = ctx.get("error") if isinstance(ctx, Mapping) else None
        return (f"request body is not valid JSON{f': {detail}' if detail else ''}", None, "invalid_json")
    if kind == "missing" and param is None:  # the body itself is absent
        return "request body is empty; expected a JSON object", None, "invalid_json"
    if kind == "missing":
        return f"missing required parameter '{param}'", param, "missing_required_parameter"
    if param == "input" and len(loc) == 1:
        return (
            "invalid value for 'input': expected a string, a list of strings, or a list of "
            "{'type': 'text', 'text': ...} / {'type': 'image_url', 'image_url': {'url': ...}} parts",
            param,
            "invalid_value",
        )
    msg = str(first.get("msg", "invalid value"))
    extra = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    where = f"'{param}'" if param else "request body"
    return f"invalid value for {where}: {msg}{extra}", param, "invalid_value"
