"""Errors in OpenAI's shape, and the contract's error codes as HTTP statuses.

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "adapter_not_found"}}

`code` keeps the contract's code (docs/contract.md), so a client sees the same reason on either
path; the status is what OpenAI clients act on (retry on 429 / 5xx, not on 4xx).
"""

from __future__ import annotations

from lorafleet.common.contract import ErrorCode

# The contract's codes (and the extensions') -> HTTP status. Anything else is a 500.
STATUS_OF_CODE = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.PROMPT_TOO_LONG: 400,
    ErrorCode.INVALID_ADAPTER: 400,  # the adapter the model field names cannot be served
    ErrorCode.ADAPTER_NOT_FOUND: 404,
    ErrorCode.CANCELLED: 409,  # cancelled by another client (SET lorafleet:cancel:<id>)
    ErrorCode.OVERLOADED: 429,  # shed by the engines: send it again later
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.ADAPTER_UNAVAILABLE: 503,  # the adapter's storage is unreachable for now
    ErrorCode.DEADLINE_EXCEEDED: 504,
}

_TYPE_OF_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   409: "conflict_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An answer with an HTTP error status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def from_reply(cls, code: str, message: str) -> "ApiError":
        """An `error` reply entry of the contract as the HTTP answer."""
        return cls(STATUS_OF_CODE.get(code, 500), message, code=code)

    def body(self) -> dict:
        kind = _TYPE_OF_STATUS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
