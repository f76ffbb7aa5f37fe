"""``mypy --strict`` over the package, the tests and the benchmarks, as configured in
pyproject.toml.

CI runs only pytest, so the type check runs here: about 15 s from a cold cache.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_passes() -> None:
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict"],  # files: [tool.mypy] in pyproject.toml
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
