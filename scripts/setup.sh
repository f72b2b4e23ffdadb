#!/usr/bin/env bash
# Set up a development environment in .venv: system packages for a virtual X server (napari's
# canvas needs one, even in tests), then the project with its test extras and a CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."

X_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1
  libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 libxcb-image0 libxcb-shape0 libfontconfig1 libdbus-1-3"
if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-cursor; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $X_PACKAGES >/dev/null
  else
    echo "warning: no apt-get; install Xvfb and the xcb libraries yourself for the GUI tests" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch pinned here, in the same pip call as the project, so pip takes the local CPU build; the
# project itself only asks for torch>=2.1.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[testing]"
