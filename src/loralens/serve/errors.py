"""The one error the service answers with: an HTTP status and a message for the person."""

from __future__ import annotations


class Refused(Exception):
    """A request the service will not (or cannot) screen; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
