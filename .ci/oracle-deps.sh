#!/usr/bin/env bash
# System libraries the test oracle needs: FFmpeg's shared libraries for torchcodec, through which
# qwen-vl-utils 0.0.14 reads video files. Idempotent; CI runs as root.
set -euo pipefail
pkgs="libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8"
# a headless browser for the chat page test (tests/test_web.py), driven by playwright from the test extras
pkgs="$pkgs chromium chromium-driver"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs
fi
