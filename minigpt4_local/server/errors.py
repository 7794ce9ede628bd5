"""OpenAI-shaped HTTP errors (no web framework imported here).

Contract: `APIError(status, message, type=..., param=None, code=None)` is raised anywhere while a request
is handled; the app answers it with `status` and the body `{"error": {"message", "type", "param",
"code"}}` (`body()`), the shape OpenAI's clients parse. Messages are one line and never carry a
traceback. Constructors for the common cases: `invalid_request` (400), `unauthorized` (401),
`not_found` (404), `too_large` (413), `rate_limited` (429), `unavailable` (503).
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        message = " ".join(str(message).split())
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str = "invalid or missing API key (send Authorization: Bearer KEY)") -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, param=param, code=code)


def too_large(message: str) -> APIError:
    return APIError(413, message, code="request_too_large")


def rate_limited(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full")


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code)
