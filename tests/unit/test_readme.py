"""The README's configuration table is the settings class, row by row."""

from __future__ import annotations

from pathlib import Path

from replica_router import RouterSettings

README = Path(__file__).parents[2] / "README.md"


def rows() -> list[str]:
    out = []
    for name, field in RouterSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is None or default == []:
            shown = "(empty)"
        elif isinstance(default, bool):
            shown = str(default).lower()
        else:
            shown = str(default)
        description = (field.description or "").replace("|", "/")
        out.append(f"| `REPLICA_ROUTER_{name.upper()}` | `{shown}` | {description} |")
    return out


def test_every_setting_has_its_row() -> None:
    text = README.read_text()
    missing = [row for row in rows() if row not in text]
    assert missing == []


def test_no_row_for_a_setting_that_does_not_exist() -> None:
    documented = {
        line.split("`")[1]
        for line in README.read_text().splitlines()
        if line.startswith("| `REPLICA_ROUTER_")
    }
    assert documented == {f"REPLICA_ROUTER_{name.upper()}" for name in RouterSettings.model_fields}


def test_quick_start_has_exactly_two_commands() -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert section.count("```bash") == 2
