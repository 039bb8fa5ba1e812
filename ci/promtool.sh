#!/usr/bin/env bash
# Prints the path of promtool (from Debian's `prometheus` package) for `promtool check metrics`
# on kvgate's exposition, fetching it once if it is not cached yet: the package is downloaded
# and unpacked, not installed (no service is set up, no root needed when the package lists are
# current). Idempotent: a second run only prints the path. `promtool` on PATH is used as it is.
# The cache is $KVGATE_CACHE (default ~/.cache/kvgate). Logs go to stderr; stdout is the path.
set -euo pipefail
cache=${KVGATE_CACHE:-$HOME/.cache/kvgate}
bin=$cache/promtool
log() { echo "ci/promtool.sh: $*" >&2; }

if command -v promtool >/dev/null; then
  command -v promtool
  exit 0
fi
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
command -v apt-get >/dev/null || { log "apt-get is needed to fetch Debian's prometheus package"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "downloading Debian's prometheus package"
if ! (cd "$work" && apt-get download prometheus >&2); then
  # Package lists not fetched yet (a fresh container): fetch them, as root or through sudo.
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2
  (cd "$work" && apt-get download prometheus >&2)
fi
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
"$work/root/usr/bin/promtool" --version >&2
mkdir -p "$cache"
cp "$work/root/usr/bin/promtool" "$bin.partial"
mv "$bin.partial" "$bin"
log "cached $bin"
echo "$bin"
