#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite under a virtual X server.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not gui"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_QPA_PLATFORM=xcb
set +e
xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
