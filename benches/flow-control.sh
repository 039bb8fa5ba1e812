#!/usr/bin/env bash
# Flow control under overload: kvgate's proxy over two real-time simulators with
# --max-num-seqs 4, flow control on with no bound set (the defaults learn each endpoint's
# saturation point from its scrapes), against the same with flow control off and with
# `gate: scrape` (a gate that sees only scraped metrics, scraping every 50 ms).
#   0. the pool's capacity: completions/s of 1000-token prompts, max_tokens 32, closed loop;
#   1. priority: a `critical` stream (priority 10, 2 req/s) alone, then under a `bulk` flood
#      (priority 0) at 2x capacity: TTFT, refusals, queue wait, goodput per class;
#   2. fairness: tenants a and b at the same priority, a with 10x b's requests outstanding;
#   3. sheddable requests (priority -1) during the flood: their 429 latency;
#   4. overshoot: requests waiting in the engines during the flood, per gate.
# Prints a Markdown table per phase and a verdict per target. About 5 minutes; loopback only.
# Usage: benches/flow-control.sh       (KVGATE_BIN=target/release/kvgate to skip the build)
#   UNLOADED, FLOOD, FAIR (seconds) shorten the phases (defaults 30, 40, 30).
set -euo pipefail
source "$(dirname "$0")/harness.sh"
unloaded=${UNLOADED:-30}
flood=${FLOOD:-40}
fair=${FAIR:-30}
drv=(python3 benches/flow_control.py)
started=$(date +%s)

sims=()
for _ in 1 2; do
  p=$(port)
  "$bin" sim --port "$p" --served-model-name m --max-num-seqs 4 >/dev/null 2>&1 &
  sims+=("$p")
done
sim_list=127.0.0.1:${sims[0]},127.0.0.1:${sims[1]}
objectives="objectives: [{name: critical, priority: 10}, {name: bulk, priority: 0}, {name: scavenger, priority: -1}]"

kvgate=""
# `start NAME EXTRA`: kvgate with the config lines EXTRA (stopping the previous one), ready.
start() {
  [ -n "$kvgate" ] && { kill "$kvgate" 2>/dev/null || true; wait "$kvgate" 2>/dev/null || true; }
  proxy_config "$objectives
$2" "${sims[@]}"
  "$bin" serve --config "$dir/kvgate.yaml" >"$dir/kvgate-$1.log" 2>&1 &
  kvgate=$!
  wait_ready
  # Until each endpoint's first scrape is in.
  sleep 1
}
# `run SECONDS SUBCOMMAND ARGS...`: one driver step, bounded; one that fails or overruns is
# reported and left out of the tables.
run() {
  local bound=$1
  shift
  timeout --kill-after=5 "$bound" "${drv[@]}" "$@" || echo "step \`$*\` failed or took over $bound s" >&2
}

start off ""
timeout --kill-after=5 40 "${drv[@]}" capacity --proxy "127.0.0.1:$proxy" --secs 10 --workers 16 "$dir/capacity.json"
cap=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['rps'])" "$dir/capacity.json")
phase=$((unloaded + flood + 45))
run $phase flood --proxy "127.0.0.1:$proxy" --admin "127.0.0.1:$admin" --sims "$sim_list" --capacity "$cap" \
  --unloaded "$unloaded" --flood "$flood" --label off "$dir/flood-off.json"
run $((fair + 20)) fairness --proxy "127.0.0.1:$proxy" --admin "127.0.0.1:$admin" --secs "$fair" \
  --label off "$dir/fairness-off.json"

start on "flow_control: {enabled: true}"
run $phase flood --proxy "127.0.0.1:$proxy" --admin "127.0.0.1:$admin" --sims "$sim_list" --capacity "$cap" \
  --unloaded "$unloaded" --flood "$flood" --shed-rate 5 --label on "$dir/flood-on.json"
run $((fair + 20)) fairness --proxy "127.0.0.1:$proxy" --admin "127.0.0.1:$admin" --secs "$fair" \
  --label on "$dir/fairness-on.json"
curl -s "http://127.0.0.1:$admin/debug/endpoints" >"$dir/debug-on.json" || true

start scrape "flow_control: {enabled: true, gate: scrape}
scrape: {interval_ms: 50, fast_interval_ms: 50}"
run $phase flood --proxy "127.0.0.1:$proxy" --admin "127.0.0.1:$admin" --sims "$sim_list" --capacity "$cap" \
  --unloaded "$unloaded" --flood "$flood" --label scrape "$dir/flood-scrape.json"

echo
"${drv[@]}" report "$dir"
learned=$(python3 -c "
import json, sys
try:
    pools = json.load(open(sys.argv[1]))['pools']
    print(', '.join(f'{k}: {v}' for p in pools for k, v in ((p.get('flow_control') or {}).get('learned_requests') or {}).items()))
except Exception:
    pass" "$dir/debug-on.json")
[ -n "$learned" ] && echo "Request bounds learned with flow control on (after the run): $learned"
echo "Whole run: $(( $(date +%s) - started )) s; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
