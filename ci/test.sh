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
ruff check builder hvagent ansible tests bench
lint-imports  # the layers, as .importlinter states them
# Two workers, one test file each at a time (module fixtures stay on one worker).
pytest -n 2 --dist loadfile tests --ignore=tests/image --ignore=tests/deploy --ignore=tests/builds
# Each profile is built once, with all its outputs.
corehost build profiles/ci.yaml
corehost build profiles/server-core.yaml
# Two at a time: the builder's own build tests, the whole image suite on one boot (the
# qcow2 under BIOS), and every other output (USB under BIOS and UEFI, PXE diskless under
# both, VHD, VHDX, the default image) booted for the smoke and deployment checks.
# The two longest boots (the whole suite; the data-disk pair) are collected first, so
# they start together on the two workers.
pytest -n 2 --dist loadgroup --durations=0 tests/deploy tests/builds
