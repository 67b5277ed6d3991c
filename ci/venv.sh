#!/usr/bin/env bash
# Creates .venv (if missing) and installs corehost with the extras named in $1
# (default: test). Prints nothing but errors when already up to date.
set -eu -o pipefail
cd "$(dirname "$0")/.."
extras=${1:-test}
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.corehost-$extras.stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[$extras]"
  touch "$stamp"
fi
