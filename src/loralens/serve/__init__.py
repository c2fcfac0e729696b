"""The screening service (``loralens serve``): upload an adapter, see what it is and what the
trained runs predict about it. ``app`` holds the HTTP side, ``workers`` the processes that read
uploads, ``unpack`` and ``upload`` the rules for untrusted input."""

from loralens.serve.app import ServeConfig, Service, create_app
from loralens.serve.unpack import Limits

__all__ = ["Limits", "ServeConfig", "Service", "create_app"]
