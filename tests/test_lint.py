"""Habits CI keeps: `ruff check` clean and `ruff format` applied over the repository, with the pyproject
settings (mypy on qwen2vl/model and qwen2vl/engine runs as its own .ci/run step: it takes longer than the fast suite
should)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency (pyproject [test] extra)"
    run = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_ruff_format_is_applied():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency (pyproject [test] extra)"
    run = subprocess.run([ruff, "format", "--check", "--no-cache", str(ROOT)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, "run `ruff format` (files listed below)\n" + run.stdout[-4000:] + run.stderr[-2000:]
