#!/usr/bin/env bash
# A bounded soak: the proxy over 4 simulated replicas (real-time latency model) takes mixed
# streaming traffic at a steady rate for WINDOWS windows of 30 s (default 10: five minutes; at
# most 20, ten minutes), while each window brings its own trouble — injected 503s, aborts and
# hangs, a replica killed and restarted, a paused one, every replica failing a little. Prints,
# per window: what clients saw (requests, errors by kind, TTFT p50/p99) and kvgate's RSS, open
# file descriptors and requests in flight; then the same after the load, to show what is given
# back. Usage: benches/soak.sh [windows] [rate req/s, default 20]
set -euo pipefail
source "$(dirname "$0")/harness.sh"
windows=${1:-10}
rate=${2:-20}
[ "$windows" -ge 1 ] && [ "$windows" -le 20 ] || { echo "windows: 1 to 20 (30 s each)" >&2; exit 2; }
per_window=$((rate * 30))

sim_ports=()
sim_pids=()
start_sim() { # k
  "$bin" sim --port "${sim_ports[$1]}" --time-scale 1 --served-model-name m --seed "$1" \
    --max-num-seqs 64 >/dev/null 2>&1 &
  sim_pids[$1]=$!
}
for k in 0 1 2 3; do
  sim_ports[$k]=$(port)
  start_sim "$k"
done
proxy_config "proxy: {first_byte_timeout_ms: 5000}" "${sim_ports[@]}"
"$bin" serve --config "$dir/kvgate.yaml" >"$dir/kvgate.log" 2>&1 &
kv=$!
wait_ready

faults() { # k json
  curl -sf "http://127.0.0.1:${sim_ports[$1]}/admin/faults" -d "$2" >/dev/null || true
}
clear_all() {
  for k in 0 1 2 3; do faults "$k" '{"failure_rate": 0, "paused": false}'; done
}
# What window w brings (applied 5 s into it; it ends with the window), named in $what. It runs
# in this shell, not a subshell, so the replicas it restarts are this shell's to stop at exit.
trouble() {
  case $(($1 % 10)) in
    0) what="none" ;;
    1) faults 0 '{"failure_rate": 0.3, "failure_types": ["503"]}'; what="replica 0: 30% 503" ;;
    2) faults 1 '{"failure_rate": 0.2, "failure_types": ["abort"]}'; what="replica 1: 20% aborted mid-stream" ;;
    3) kill "${sim_pids[2]}"; what="replica 2 killed (back at the window's end)" ;;
    4) faults 3 '{"failure_rate": 0.2, "failure_types": ["hang"]}'; what="replica 3: 20% hang" ;;
    5) what="none" ;;
    6) for k in 0 1 2 3; do faults "$k" '{"failure_rate": 0.2, "failure_types": ["503", "500"]}'; done
       what="every replica: 20% 5xx" ;;
    7) kill "${sim_pids[0]}"; sleep 2; start_sim 0; what="replica 0 killed, restarted 2 s later" ;;
    8) faults 1 '{"paused": true}'; what="replica 1 paused" ;;
    9) what="none" ;;
  esac
}
sample() { # prints "rss_mb fds in_flight"
  local rss fds inflight
  rss=$(awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$kv/status")
  fds=$(ls "/proc/$kv/fd" | wc -l)
  inflight=$(curl -s "http://127.0.0.1:$admin/debug/endpoints" | python3 -c \
    'import json,sys; print(sum(e.get("in_flight_requests",0) for p in json.load(sys.stdin)["pools"] for e in p["endpoints"]))')
  echo "$rss $fds $inflight"
}

printf '%-4s %-44s %8s %7s %-34s %9s %9s %7s %5s %9s\n' win trouble requests errors kinds "ttft p50" "ttft p99" rss_MB fds in_flight
for w in $(seq 0 $((windows - 1))); do
  "$bin" bench --base-url "http://127.0.0.1:$proxy" --model m --workload shared-prefix \
    --groups 30 --prompts-per-group $((per_window / 30 + 1)) --system-prompt-len 1500 --question-len 100 \
    --output-len 64 --num-prompts "$per_window" --request-rate "$rate" --max-concurrency 256 \
    --seed "$w" --output "$dir/w$w.json" >/dev/null 2>&1 &
  load=$!
  sleep 5
  trouble "$w"
  wait "$load" || true
  read -r rss fds inflight < <(sample)
  python3 - "$dir/w$w.json" "$w" "$what" "$rss" "$fds" "$inflight" <<'PY'
import json, sys
path, w, what, rss, fds, inflight = sys.argv[1:]
r = json.load(open(path))
kinds = ",".join(f"{k}:{v}" for k, v in sorted(r.get("errors_by_kind", {}).items())) or "-"
t = r.get("ttft_ms", {})
print(f"{w:<4} {what[:44]:<44} {r['requests']:>8} {r['failed']:>7} {kinds[:34]:<34} {t.get('p50', 0):>7.0f}ms {t.get('p99', 0):>7.0f}ms {rss:>7} {fds:>5} {inflight:>9}")
PY
  clear_all
  kill -0 "${sim_pids[2]}" 2>/dev/null || start_sim 2
done
sleep 10
read -r rss fds inflight < <(sample)
echo "10 s after the load: rss ${rss} MB, ${fds} fds, ${inflight} requests in flight"
grep -c ' ERROR ' "$dir/kvgate.log" | xargs echo "kvgate ERROR log lines:"
