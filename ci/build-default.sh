#!/usr/bin/env bash
# README command 1: installs what building needs (apt packages, .venv) and builds the
# default image, profiles/server-core.yaml, into out/server-core/.
set -eu -o pipefail
cd "$(dirname "$0")/.."
bash ci/host-deps.sh
bash ci/venv.sh build
exec .venv/bin/corehost build profiles/server-core.yaml "$@"
