#!/usr/bin/env bash
# Active-active replicas: the same workloads spread in turn over 1, 2 and 3 kvgate replicas in
# front of four simulators (a KV cache too small for the whole working set on one), with the
# replicas sharing what they learn (`cluster:`) and without; then a replica killed mid-run, and
# restarted.
#   1. hit rate and decision time per (workload, replicas, sync): shared-prefix and multi-turn,
#      RUN seconds each (default 30), fresh simulators for each run;
#   2. multi-turn over 3 replicas for KILL seconds (default 140), the third killed (SIGKILL)
#      halfway: hit rate in the minute before against the minute after, with sync and without;
#      how long the survivors kept the dead replica's in-flight counts; with sync, the killed
#      replica restarted at two thirds: how long until it was ready, and its index against a
#      survivor's then.
# Prints Markdown tables. About 11 minutes; loopback only.
# Usage: benches/replicas.sh       (KVGATE_BIN=target/release/kvgate to skip the build)
set -euo pipefail
source "$(dirname "$0")/harness.sh"
run_secs=${RUN:-30}
kill_secs=${KILL:-140}
drv=(python3 benches/replicas.py)
sim_flags=(--served-model-name m --time-scale 0.25 --num-gpu-blocks-override 1200 --max-num-seqs 64 --seed 1)
token=bench-cluster-token

sims=()
sim_pids=()
start_sims() {
  stop_sims
  sims=()
  for _ in 1 2 3 4; do
    local p
    p=$(port)
    "$bin" sim --port "$p" "${sim_flags[@]}" >/dev/null 2>&1 &
    sim_pids+=("$!")
    sims+=("127.0.0.1:$p")
  done
  for s in "${sims[@]}"; do
    for _ in $(seq 50); do curl -sf "http://$s/health" >/dev/null && break; sleep 0.1; done
  done
}
stop_sims() {
  [ ${#sim_pids[@]} -gt 0 ] && { kill "${sim_pids[@]}" 2>/dev/null || true; wait "${sim_pids[@]}" 2>/dev/null || true; }
  sim_pids=()
}

# Replica k's ports and process.
grpc=(); admin=(); proxy=(); pids=()
# `config K N SYNC`: replica K's config of N replicas, sharing when SYNC is on.
config() {
  local k=$1 n=$2 sync=$3 peers="" eps="" s i
  for i in $(seq 0 $((n - 1))); do peers+="'127.0.0.1:${grpc[$i]}', "; done
  for s in "${sims[@]}"; do eps+="{address: '$s'}, "; done
  {
    printf 'grpc_addr: 127.0.0.1:%s\nadmin_addr: 127.0.0.1:%s\nproxy_addr: 127.0.0.1:%s\n' "${grpc[$k]}" "${admin[$k]}" "${proxy[$k]}"
    [ "$sync" = on ] && printf 'cluster: {peers: [%s], token: %s}\n' "${peers%, }" "$token"
    printf 'pools: [{name: p, models: [m], endpoints: [%s]}]\n' "${eps%, }"
  } >"$dir/replica-$k.yaml"
}
# `start_replica K`: starts replica K from its config; waits (10 s at most) until it is ready.
start_replica() {
  "$bin" serve --config "$dir/replica-$1.yaml" >"$dir/replica-$1.log" 2>&1 &
  pids[$1]=$!
}
wait_replica() {
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:${admin[$1]}/readyz" >/dev/null && return; sleep 0.05; done
  echo "replica $1 not ready" >&2
}
# `start_tier N SYNC`: N replicas (fresh ports), started together.
start_tier() {
  local n=$1 sync=$2 k
  grpc=(); admin=(); proxy=(); pids=()
  for k in $(seq 0 $((n - 1))); do grpc[$k]=$(port); admin[$k]=$(port); proxy[$k]=$(port); done
  for k in $(seq 0 $((n - 1))); do config "$k" "$n" "$sync"; start_replica "$k"; done
  for k in $(seq 0 $((n - 1))); do wait_replica "$k"; done
  # Until each endpoint's first scrape is in.
  sleep 1
}
stop_tier() {
  [ ${#pids[@]} -gt 0 ] && { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
  pids=()
}
list() { local IFS=,; echo "$*"; }
addresses() { local out=() p; for p in "$@"; do out+=("127.0.0.1:$p"); done; list "${out[@]}"; }

started=$(date +%s)
for workload in shared-prefix multi-turn; do
  for spec in 1:off 2:on 2:off 3:on 3:off; do
    n=${spec%:*}; sync=${spec#*:}
    label=$n; [ "$n" -gt 1 ] && label="$n-$sync"
    start_sims
    start_tier "$n" "$sync"
    timeout --kill-after=5 $((run_secs + 30)) "${drv[@]}" run --proxies "$(addresses "${proxy[@]}")" \
      --admins "$(addresses "${admin[@]}")" --sims "$(list "${sims[@]}")" --workload "$workload" \
      --secs "$run_secs" --label "$label" "$dir/run-$workload-$label.json" || echo "run $workload $label failed" >&2
    stop_tier
  done
done

# `peer_gone A ID`: seconds (to 0.5) until replica A no longer lists peer ID, at most 20.
peer_gone() {
  local t=0
  while [ "$t" -lt 40 ]; do
    curl -s "http://127.0.0.1:$1/debug/cluster" | grep -q "\"$2\"" || { echo "$t" | awk '{print $1 / 2}'; return; }
    sleep 0.5; t=$((t + 1))
  done
  echo 20
}
blocks() { curl -s "http://127.0.0.1:$1/debug/endpoints" | python3 -c "import json,sys; print(sum(e['prefix_blocks'] for p in json.load(sys.stdin)['pools'] for e in p['endpoints']))"; }

echo "{" >"$dir/kill.json"
for sync in on off; do
  label=3-$sync-kill
  start_sims
  start_tier 3 "$sync"
  dead_id=$(curl -s "http://127.0.0.1:${admin[2]}/debug/cluster" | python3 -c "import json,sys; print(json.load(sys.stdin)['replica'])")
  t0=$(date +%s.%N)
  timeout --kill-after=5 $((kill_secs + 40)) "${drv[@]}" run --proxies "$(addresses "${proxy[@]}")" --admins "$(addresses "${admin[0]}" "${admin[1]}")" \
    --sims "$(list "${sims[@]}")" --workload multi-turn --secs "$kill_secs" --label "$label" "$dir/run-multi-turn-$label.json" &
  driver=$!
  sleep $((kill_secs / 2))
  kill -9 "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true
  killed_at=$(python3 -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(date +%s.%N)" "$t0")
  extra=""
  if [ "$sync" = on ]; then
    drained=$(peer_gone "${admin[0]}" "$dead_id")
    sleep_left=$(python3 -c "print(max(0.0, $kill_secs * 2 / 3 - $killed_at - $drained))")
    sleep "$sleep_left"
    r0=$(date +%s.%N)
    start_replica 2
    wait_replica 2
    ready=$(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 2))" "$(date +%s.%N)" "$r0")
    extra=", \"restart_ready_s\": $ready, \"restart_blocks\": $(blocks "${admin[2]}"), \"survivor_blocks\": $(blocks "${admin[0]}")"
  else
    drained="— (no peers)"
  fi
  wait "$driver" || echo "kill run $label failed" >&2
  sep=","; [ "$sync" = off ] && sep=""
  echo "\"$label\": {\"killed_at\": $killed_at, \"drained_s\": \"$drained\"$extra}$sep" >>"$dir/kill.json"
  stop_tier
done
echo "}" >>"$dir/kill.json"
stop_sims

"${drv[@]}" report "$dir"
echo
echo "Whole run: $(($(date +%s) - started)) s; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
