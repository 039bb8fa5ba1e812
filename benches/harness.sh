# Shared set-up of the benchmark scripts (sourced, not run): the release binary in $bin (built
# here, or $KVGATE_BIN as it is, to compare two builds), a
# scratch folder in $dir removed at exit with every background process, `port` for a free
# loopback port, `need_wrk`, `find_envoy` (sets $envoy: deploy/envoy/find-envoy.sh), and
# `proxy_config` / `wait_ready` for a kvgate proxy over local simulators.
cd "$(dirname "$0")/.."
if [ -n "${KVGATE_BIN:-}" ]; then
  bin=$(realpath "$KVGATE_BIN")
else
  cargo build --release --quiet
  bin=$PWD/target/release/kvgate
fi
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
need_wrk() { command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }; }
find_envoy() { source deploy/envoy/find-envoy.sh; }
# `proxy_config EXTRA PORT...`: writes $dir/kvgate.yaml for kvgate's proxy (on $proxy, its admin
# on $admin, both picked here) over one pool `p` of model `m` with an endpoint at 127.0.0.1:PORT
# for each PORT, and the config lines EXTRA.
proxy_config() {
  local extra=$1 p eps=()
  shift
  for p in "$@"; do eps+=("{address: '127.0.0.1:$p'}"); done
  proxy=$(port)
  admin=$(port)
  printf 'grpc_addr: 127.0.0.1:0\nadmin_addr: 127.0.0.1:%s\nproxy_addr: 127.0.0.1:%s\n%s\npools: [{name: p, models: [m], endpoints: [%s]}]\n' \
    "$admin" "$proxy" "$extra" "$(IFS=,; echo "${eps[*]}")" >"$dir/kvgate.yaml"
}
# `wait_ready`: waits (10 s at most) for kvgate's admin listener to answer /readyz.
wait_ready() {
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && return; sleep 0.1; done
}
