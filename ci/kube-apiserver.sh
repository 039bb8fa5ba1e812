#!/usr/bin/env bash
# Prints the path of a real kube-apiserver (v1.20.2) for the Kubernetes tests, building it once
# from Debian bookworm's `kubernetes` source package if it is not cached yet, and makes sure
# etcd (Debian's etcd-server) is installed. Idempotent: a second run only prints the path.
# The cache is $KVGATE_CACHE (default ~/.cache/kvgate); the build takes 5-7 min on 2 cores.
# Logs go to stderr; stdout is the binary's path alone.
set -euo pipefail
cache=${KVGATE_CACHE:-$HOME/.cache/kvgate}
bin=$cache/kube-apiserver-v1.20.2
log() { echo "ci/kube-apiserver.sh: $*" >&2; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v etcd >/dev/null; then
  log "installing etcd-server"
  sudo_ apt-get install -y --no-install-recommends etcd-server >&2 ||
    { sudo_ apt-get update >&2 && sudo_ apt-get install -y --no-install-recommends etcd-server >&2; }
fi
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

# Debian's sources for bookworm, beside the binary entries (same mirror and keyring).
src_list=/etc/apt/sources.list.d/kvgate-bookworm-src.sources
if [ ! -f "$src_list" ]; then
  log "adding $src_list"
  sudo_ tee "$src_list" >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
log "installing the build tools"
sudo_ apt-get update >&2
sudo_ apt-get install -y --no-install-recommends dpkg-dev golang-go golang-github-modern-go-reflect2-dev jq rsync make >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
log "fetching the kubernetes source package into $work"
apt-get source --download-only kubernetes/bookworm >&2
dpkg-source --no-check -x ./kubernetes_*.dsc src >&2
cd src
# The vendored reflect2 v1.0.1 crashes under Go >= 1.18 as soon as a map is marshalled (every
# object with labels); Debian's 1.0.2 does not.
rm -f vendor/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/ 2>/dev/null || true
log "building kube-apiserver (5-7 min)"
mkdir -p "$work/home"
# In an environment of its own: whatever the caller exported (a cargo build's OUT_DIR, TARGET
# or MAKEFLAGS, a GOFLAGS, another Go on PATH) would change what Kubernetes' make does.
env -i HOME="$work/home" PATH=/usr/lib/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  GOCACHE="$work/gocache" GOPATH="$work/gopath" GOTOOLCHAIN=local CGO_ENABLED=0 LANG=C.UTF-8 \
  make WHAT=cmd/kube-apiserver >&2
mkdir -p "$cache"
cp _output/bin/kube-apiserver "$bin.partial"
mv "$bin.partial" "$bin"
log "cached $bin"
echo "$bin"
