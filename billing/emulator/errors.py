"""Stripe's error body `{"error": {"type", "code", "message", "param"}}` and its status codes."""

from __future__ import annotations

import json
from typing import Any

RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. You can learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
LOCK_TIMEOUT_MESSAGE = (
    "This object cannot be accessed right now because another API request or Stripe process is "
    "currently accessing it. If you see this error intermittently, retry the request. If you see "
    "this error frequently and are making multiple concurrent requests to a single object, make "
    "your requests serially or at a lower rate."
)


class StripeError(Exception):
    """Raised by handlers; rendered as Stripe renders errors."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        err: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code:
            err["code"] = self.code
            err["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            err["param"] = self.param
        return json.dumps({"error": err}).encode()


def invalid(message: str, param: str | None = None, code: str | None = None) -> StripeError:
    return StripeError(400, message, param=param, code=code)


def missing(kind: str, ident: str, param: str = "id") -> StripeError:
    return StripeError(404, f"No such {kind}: '{ident}'", code="resource_missing", param=param)


def rate_limited() -> StripeError:
    # Stripe's rate-limit 429 is an invalid_request_error with code rate_limit and no
    # Stripe-Should-Retry header, so stripe-python never retries it on its own.
    return StripeError(429, RATE_LIMIT_MESSAGE, code="rate_limit")


def lock_timeout() -> StripeError:
    # Contention is transient; Stripe tells clients to retry it.
    return StripeError(
        429, LOCK_TIMEOUT_MESSAGE, code="lock_timeout", headers=[("Stripe-Should-Retry", "true")]
    )


def api_error(status: int = 500) -> StripeError:
    return StripeError(
        status,
        "An unknown error occurred while processing your request (emulated fault).",
        type="api_error",
    )
