#!/usr/bin/env bash
# README command 2: installs what the tests need (apt packages, .venv) and runs the
# whole suite: lint, unit, integration (real QEMU under TCG), real image builds of
# profiles/ci.yaml and server-core.yaml, and the testinfra checks against every output
# booted in QEMU.
set -eu -o pipefail
cd "$(dirname "$0")/.."
bash ci/host-deps.sh
bash ci/venv.sh test
export PATH="$PWD/.venv/bin:$PATH"
ruff check builder hvagent tests bench
lint-imports  # the layers, as .importlinter states them
pytest tests --ignore=tests/image --ignore=tests/deploy
# Each profile is built once, with all its outputs.
corehost build profiles/ci.yaml
corehost build profiles/server-core.yaml
# The full image suite on one boot (the qcow2 under BIOS) ...
corehost test out/ci/ci.qcow2
# ... and every other output (USB under BIOS and UEFI, PXE diskless under both, VHD,
# VHDX, the default image) booted two at a time for the smoke and deployment checks.
pytest -n 2 tests/deploy
