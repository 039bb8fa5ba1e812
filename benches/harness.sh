# Shared set-up of the benchmark scripts (sourced, not run): the release binary in $bin, a
# scratch folder in $dir removed at exit with every background process, `port` for a free
# loopback port, `need_wrk`, and `find_envoy` (sets $envoy: deploy/envoy/find-envoy.sh).
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/kvgate
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
need_wrk() { command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }; }
find_envoy() { source deploy/envoy/find-envoy.sh; }
