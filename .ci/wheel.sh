#!/usr/bin/env bash
# CI: build the wheel, install it (not editable) into a fresh virtualenv, and run a bf16 tiny model on CPU through
# the compiled kernels from the installed package (.ci/wheel_smoke.py). Catches a wheel that lacks the kernel
# sources or anything else only an editable install provides.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip wheel -q --no-deps -w "$work/dist" .
python3 -m venv "$work/venv"
# --no-cache-dir: CI's disk already holds the test environment (a CUDA torch of several GB); a second copy of every
# download in pip's cache once filled it (errno 28 in this step)
"$work/venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
"$work/venv/bin/python" -m pip install -q --no-cache-dir torch==2.13.0  # the CPU wheel on local disk: small, no CUDA
"$work/venv/bin/python" -m pip install -q --no-cache-dir "$work"/dist/qwen2vl-*.whl
# run outside the source tree, with an empty kernel cache: the kernels must compile from the wheel's sources
(cd "$work" && XDG_CACHE_HOME="$work/cache" "$work/venv/bin/python" "$OLDPWD/.ci/wheel_smoke.py")
