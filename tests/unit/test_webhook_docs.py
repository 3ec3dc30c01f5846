"""The README's webhook verification snippet accepts what the dispatcher signs, and refuses
tampered bodies, other secrets and old timestamps (receivers copy it, so it must be right)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from adapters.notifications.webhooks import sign

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_verify() -> Callable[..., bool]:
    section = README.read_text().split("## Webhooks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README's webhook section has a Python snippet"
    namespace: dict[str, object] = {}
    exec(code.group(1), namespace)
    verify = namespace["verify"]
    assert callable(verify)
    return verify


def test_the_readme_snippet_verifies_our_signatures_and_nothing_else() -> None:
    verify = readme_verify()
    body, now = b'{"event_type":"payment.captured"}', int(time.time())
    header = sign("whsec", body, now)
    assert verify("whsec", header, body)
    assert verify("whsec", f"{header},v1={'0' * 64}", body)  # several v1 while a secret rotates
    assert not verify("whsec", header, body + b" ")
    assert not verify("other", header, body)
    assert not verify("whsec", sign("whsec", body, now - 301), body)
    assert not verify("whsec", "v1=abc", body)
