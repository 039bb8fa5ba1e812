#!/usr/bin/env bash
# The routing benchmark: the same seeded workloads through kvgate's proxy with four scheduling
# policies, over simulated replicas with a realistic latency model and a KV cache too small for
# the whole working set on one replica.
#   policies:  round-robin, load-only (queue + KV + in-flight), prefix-only, default, and
#              precise (the default profile fed by the replicas' KV events)
#   workloads: shared-prefix (Poisson arrivals), multi-turn, bursty (shared-prefix, all at once)
# Prints one table (hit rate, TTFT p50/p90/p99, throughput, hot-spot factor) and writes reports and
# TTFT plots (SVG) to the output folder.
# Usage: benches/routing.sh [output-dir]      (about 2 minutes here)
#   WORKLOADS="bursty" POLICIES="round-robin default" narrow the run; RATE sets the Poisson rate.
#   With `precise` among the policies, every policy's replicas tokenize with the model's
#   tokenizer (tests/data/tiny-llama-tokenizer, or TOKENIZER=DIR) and publish KV events, each on
#   its own loopback address (127.0.0.1..4) so that they share the events port, as pods do.
set -euo pipefail
out=$(realpath -m "${1:-target/routing-bench}")
source "$(dirname "$0")/harness.sh"
mkdir -p "$out"
replicas=4
# 8B-on-H100 latency at 4x speed; 1,200 blocks x 16 = 19,200 tokens of KV per replica.
sim_flags=(--served-model-name m --time-scale 0.25 --num-gpu-blocks-override 1200 --max-num-seqs 64 --seed 1)

tokenizer=$(realpath -m "${TOKENIZER:-tests/data/tiny-llama-tokenizer}")
events_port=$(port)
precise=false
case " ${POLICIES:-} " in *" precise "*) precise=true ;; esac
if $precise; then
  sim_flags+=(--tokenizer "$tokenizer" --kv-events-config
    "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$events_port\"}")
fi

policy_yaml() {
  case "$1" in
    precise) echo "tokenizer: '$tokenizer', kv_events: {port: $events_port}" ;;
    round-robin) echo "scheduler: {plugins: [{type: round-robin-picker}]}" ;;
    load-only) echo "scheduler: {plugins: [{type: active-request-scorer}, {type: queue-scorer}, {type: kv-cache-utilization-scorer}, {type: max-score-picker}]}" ;;
    prefix-only) echo "scheduler: {plugins: [{type: prefix-cache-scorer}, {type: max-score-picker}]}" ;;
    default) echo "" ;;
  esac
}
workload_flags() {
  case "$1" in
    shared-prefix) echo "--workload shared-prefix --groups 12 --prompts-per-group 16 --system-prompt-len 2500 --question-len 100 --output-len 32 --request-rate ${RATE:-24} --max-concurrency 256" ;;
    multi-turn) echo "--workload multi-turn --groups 10 --prompts-per-group 12 --system-prompt-len 2500 --question-len 100 --output-len 32 --request-rate ${RATE:-24} --max-concurrency 256" ;;
    bursty) echo "--workload shared-prefix --groups 12 --prompts-per-group 16 --system-prompt-len 2500 --question-len 100 --output-len 32 --max-concurrency 128 --seed 3" ;;
  esac
}

workloads=${WORKLOADS:-shared-prefix multi-turn bursty}
policies=${POLICIES:-round-robin load-only prefix-only default}
for workload in $workloads; do
  for policy in $policies; do
    sims=(); metrics=()
    for k in $(seq $replicas); do
      p=$(port)
      host=127.0.0.1
      $precise && host=127.0.0.$k
      "$bin" sim --host "$host" --port "$p" "${sim_flags[@]}" >/dev/null 2>&1 &
      sims+=("$!"); metrics+=(--metrics-url "http://$host:$p/metrics")
      eps+="{address: '$host:$p'}, "
    done
    proxy=$(port)
    printf "admin_addr: 127.0.0.1:0\ngrpc_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:%s\npools: [{name: p, models: [m], endpoints: [%s] %s}]\n" \
      "$proxy" "${eps%, }" "$( [ -n "$(policy_yaml $policy)" ] && echo ", $(policy_yaml $policy)" )" > "$dir/kvgate.yaml"
    eps=""
    "$bin" serve --config "$dir/kvgate.yaml" >/dev/null 2>&1 &
    kv=$!
    sleep 1.5
    # shellcheck disable=SC2046
    "$bin" bench --base-url "http://127.0.0.1:$proxy" --model m $(workload_flags $workload) "${metrics[@]}" \
      --output "$out/$workload-$policy.json" >/dev/null
    kill "$kv" "${sims[@]}" 2>/dev/null || true
    wait "$kv" "${sims[@]}" 2>/dev/null || true
  done
  # shellcheck disable=SC2086
  "$bin" bench compare $(printf "$out/$workload-%s.json " $policies) --plot "$out/$workload-ttft.svg" > "$out/$workload.txt"
done

python3 - "$out" "$workloads" "$policies" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'workload':<14} {'policy':<12} {'hit rate':>8} {'ttft p50':>9} {'ttft p90':>9} {'ttft p99':>9} {'req/s':>7} {'hotspot':>8} {'errors':>6}")
for w in sys.argv[2].split():
    for p in sys.argv[3].split():
        r = json.load(open(f"{out}/{w}-{p}.json"))
        hit = r["prefix_cache_hit_rate"]
        print(f"{w:<14} {p:<12} {hit*100 if hit is not None else float('nan'):>7.1f}% {r['ttft_ms']['p50']:>8.0f}ms {r['ttft_ms']['p90']:>8.0f}ms "
              f"{r['ttft_ms']['p99']:>8.0f}ms {r['throughput_rps']:>7.1f} {r['hot_spot_factor'] or 0:>8.2f} {r['failed']:>6}")
PY
echo "reports and TTFT plots: $out"
