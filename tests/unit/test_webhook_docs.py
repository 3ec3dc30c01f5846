"""The README's webhook verification snippet accepts what the dispatcher signs, and refuses
tampered bodies, other secrets and old timestamps (receivers copy it, so it must be right)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

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


def readme_shell_verify(secret: str, header: str, body: bytes, tmp_path: Path) -> bool:
    section = README.read_text().split("## Webhooks", 1)[1]
    code = re.search(r"```sh\n(.*?)```", section, re.S)
    assert code is not None, "the README's webhook section has a shell snippet"
    (tmp_path / "body.json").write_bytes(body)
    done = subprocess.run(["bash", "-c", code.group(1)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "SIG": header, "SECRET": secret}, timeout=30, check=False)
    return done.stdout.strip() == "valid"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the shell snippet needs openssl")
def test_the_readme_shell_snippet_verifies_our_signatures_and_nothing_else(tmp_path: Path) -> None:
    body, now = b'{"event_type":"payment.captured","note":"a \\"quoted\\" word"}', int(time.time())
    header = sign("whsec", body, now)
    assert readme_shell_verify("whsec", header, body, tmp_path)
    assert readme_shell_verify("whsec", f"{header},v1={'0' * 64}", body, tmp_path)  # a rotation's second v1
    assert not readme_shell_verify("whsec", header, body + b" ", tmp_path)
    assert not readme_shell_verify("other", header, body, tmp_path)
    assert not readme_shell_verify("whsec", sign("whsec", body, now - 301), body, tmp_path)
    assert not readme_shell_verify("whsec", "v1=abc", body, tmp_path)
