"""ARCHITECTURE.md stays true: every event and every field is in its catalogue."""

from __future__ import annotations

from pathlib import Path

from application.catalogue import event_catalogue

DOC = (Path(__file__).resolve().parents[2] / "ARCHITECTURE.md").read_text()


def test_the_event_catalogue_lists_every_event_with_its_fields() -> None:
    rows = {line.split("|")[1].strip().strip("`"): line for line in DOC.splitlines() if line.startswith("| `")}
    for _aggregate, event_type, fields in event_catalogue():
        assert event_type in rows, f"{event_type} is missing from ARCHITECTURE.md"
        cells = rows[event_type].split("|")[2]
        documented = {f.strip().strip("`") for f in cells.split(",") if f.strip() not in ("", "-")}
        assert documented == set(fields), f"{event_type}: documented {documented}, code has {fields}"


def test_the_folders_named_exist() -> None:
    root = Path(__file__).resolve().parents[2]
    for folder in ("domain", "application", "adapters", "projections", "api", "migrations", "tests"):
        assert f"`{folder}/`" in DOC and (root / folder).is_dir()


def test_the_readme_names_every_environment_variable() -> None:
    from api.settings import ENV_VARS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in ENV_VARS:
        short = "_" + name.rsplit("_", 1)[1]
        assert f"`{name}`" in readme or (name.startswith("ECHOTRANSACT_SMS_") and f"`{short}`" in readme), name
