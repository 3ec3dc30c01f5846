"""Paths as they may be logged: a payment link's token is a secret, so it never reaches a log.

Shared by the request-log middleware and the payment page, so neither imports the other.
"""

from __future__ import annotations

import re

# /pay/<token>[/step]; the page's static assets carry no secret and stay readable.
_TOKEN_IN_PATH = re.compile(r"^/pay/(?!assets/)[^/]+")


def redact_path(path: str) -> str:
    """``/pay/<token>/code`` -> ``/pay/{token}/code``: the link token is a secret; keep it out of logs."""
    return _TOKEN_IN_PATH.sub("/pay/{token}", path)
