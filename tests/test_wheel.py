"""The package as a user installs it: a wheel (not an editable install) carries the kernel sources, the LICENSE
and the one version, and a bf16 model runs on CPU through the kernels compiled from the installed files.
(.ci/wheel.sh does the same in a fresh virtualenv with its own torch.)"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import qwen2vl

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_and_runs_through_the_kernels(tmp_path):
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("qwen2vl-*.whl")
    assert wheel.name.startswith(f"qwen2vl-{qwen2vl.__version__}-")  # one version: qwen2vl.__version__
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in [*(ROOT / "qwen2vl" / "kernels").glob("*.c"), *(ROOT / "qwen2vl" / "kernels").glob("*.h")]:
        assert f"qwen2vl/kernels/{source.name}" in names
    assert f"qwen2vl-{qwen2vl.__version__}.dist-info/licenses/LICENSE" in names
    assert "Apache License" in (ROOT / "LICENSE").read_text()

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # fresh kernel build
    run = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "wheel_smoke.py")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"from {site / 'qwen2vl'}" in run.stderr
