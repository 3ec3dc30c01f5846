"""Progress and Ctrl-C of the operators' long commands: replay, replay --verify, audit verify and
audit export, as an operator runs them (the CLI's main, on real PostgreSQL)."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import projections.audit
from api.cli import main
from api.progress import Interrupted, ProgressLine
from tests.e2e.test_cli_tools import cli_env, projected

__all__ = ["cli_env", "projected"]  # fixtures, shared with the CLI tools' tests


UPDATE = ProgressLine.update


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_a_plain_line_every_few_seconds_with_rate_and_time_left() -> None:
    out, now = io.StringIO(), [0.0]
    line = ProgressLine("replay", 10_000, stream=out, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = step * 1.0
        line.update(step * 1_000, step * 1_000)
    line.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 1 s, at 6 s (every 5 s), and the end
    assert lines[0] == "replay: 1,000 events, position 1,000/10,000 (10%), 1,000 events/s, about 9s left, 1s elapsed"
    assert lines[-1].startswith("replay: 10,000 events, position 10,000/10,000 (100%)")
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    out, now = Tty(), [0.0]
    line = ProgressLine("audit verify", 0, unit="rows", stream=out, clock=lambda: now[0])
    for step in range(1, 4):
        now[0] = step * 0.5
        line.update(step, step * 100)
    line.finish()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "audit verify: 300 rows, 200 rows/s" in text and "left" not in text  # no end known, no time left


def test_a_stop_request_raises_between_pages() -> None:
    line = ProgressLine("replay", 10, stream=io.StringIO(), should_stop=lambda: True)
    with pytest.raises(Interrupted):
        line.update(5, 5)


def ctrl_c_at_first_page(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Press Ctrl-C (a real SIGINT to this process) when the first page reports."""
    pressed: list[int] = []
    update: Callable[..., None] = UPDATE

    def pressing(self: ProgressLine, position: int, done: int) -> None:
        if not pressed:
            pressed.append(position)
            os.kill(os.getpid(), signal.SIGINT)
        update(self, position, done)

    monkeypatch.setattr(ProgressLine, "update", pressing)
    return pressed


def scratch_schemas(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'verify\\_%'")]


def test_replay_shows_progress_on_stderr_when_piped(
    cli_env: None, projected: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay"]) == 0
    err = capsys.readouterr().err
    assert "replay: " in err and "events/s" in err and "(100%)" in err


def test_ctrl_c_stops_replay_verify_and_drops_its_scratch_schema(
    cli_env: None, projected: dict[str, Any], owner_database_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pressed = ctrl_c_at_first_page(monkeypatch)
    assert main(["replay", "--verify"]) == 130
    assert pressed and scratch_schemas(owner_database_url) == []
    assert "replay --verify interrupted: its scratch schema was dropped" in capsys.readouterr().err
    # Nothing changed: verify still finds the live read models clean.
    monkeypatch.setattr(ProgressLine, "update", UPDATE)
    assert main(["replay", "--verify"]) == 0


def test_ctrl_c_stops_replay_between_pages_with_what_it_committed(
    cli_env: None, projected: dict[str, Any], owner_database_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pressed = ctrl_c_at_first_page(monkeypatch)
    assert main(["replay", "--projection", "status"]) == 130
    err = capsys.readouterr().err
    assert f"replay interrupted at position {pressed[0]:,}" in err
    with psycopg.connect(owner_database_url) as conn:
        checkpoint = conn.execute("SELECT position FROM projection_checkpoints WHERE projection = 'status'").fetchone()
    assert checkpoint == (pressed[0],)  # the committed page, with its checkpoint


def test_ctrl_c_stops_audit_export_without_leaving_a_half_file(
    cli_env: None, projected: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(projections.audit, "PROGRESS_EVERY_ROWS", 2)
    target = tmp_path / "out" / "audit.jsonl"
    target.parent.mkdir()
    pressed = ctrl_c_at_first_page(monkeypatch)
    assert main(["audit", "export", "-o", str(target)]) == 130
    assert pressed and list(target.parent.iterdir()) == []
    assert f"audit export interrupted after 2 rows: {target} was not written" in capsys.readouterr().err
    # Uninterrupted, the file appears whole, and no partial file stays beside it.
    monkeypatch.setattr(ProgressLine, "update", UPDATE)
    assert main(["audit", "export", "-o", str(target)]) == 0
    assert [p.name for p in target.parent.iterdir()] == ["audit.jsonl"] and target.read_text().count("\n") > 2


def test_ctrl_c_stops_audit_verify(
    cli_env: None, projected: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(projections.audit, "PROGRESS_EVERY_ROWS", 2)
    ctrl_c_at_first_page(monkeypatch)
    assert main(["audit", "verify"]) == 130
    assert "audit verify interrupted after 2 rows: nothing was changed" in capsys.readouterr().err
