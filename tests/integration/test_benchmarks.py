"""The benchmarks still run: ``python -m benchmarks --quick`` writes every table and plot.

It checks that the scripts work, never their figures (targets live in the benchmarks).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = (
    ("overhead", "drivers", "faults", "strategies", "scale", "ryw", "otel")
    + (("pgpool",) if shutil.which("pgpool") or Path("/usr/sbin/pgpool").exists() else ())
    + (("instructions",) if shutil.which("valgrind") else ())
)


def test_quick_benchmarks_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,  # a hang guard: the run takes about 240 s, a slow machine more
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "results.md").read_text()
    for name in EXPECTED:
        png = out / f"{name}.png"
        assert png.is_file(), f"{name}.png missing"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name}.png)" in report
        assert f"![{name}]({name}.png)" in result.stdout
    assert report.count("\n|---") >= len(EXPECTED)
