#!/usr/bin/env bash
# README command 2: installs what the tests need (apt packages, .venv) and runs the
# whole suite: lint, unit, integration (real QEMU under TCG), a real image build of
# profiles/ci.yaml, and the testinfra checks against that image booted in QEMU.
set -eu -o pipefail
cd "$(dirname "$0")/.."
bash ci/host-deps.sh
bash ci/venv.sh test
export PATH="$PWD/.venv/bin:$PATH"
ruff check builder hvagent tests bench
lint-imports  # the layers, as .importlinter states them
pytest tests --ignore=tests/image
corehost build profiles/ci.yaml
corehost test out/ci/ci.qcow2
