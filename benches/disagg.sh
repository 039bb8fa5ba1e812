#!/usr/bin/env bash
# Prefill/decode and data-parallel routing, measured with `kvgate bench` through kvgate's proxy
# over simulated vLLM servers (realistic latency model at 2x speed).
#  1. P/D vs all-both: four servers, long uncached prompts (6,000 tokens, 64 out, Poisson).
#     - pd:   2 prefill + 2 decode, decode-first P/D scheduler (nonCachedTokens 256); the proxy runs
#             the hand-off (prefill leg, then decode leg with kv_transfer_params);
#     - both: the same four servers all in role both, default scheduler.
#  2. DP-aware vs DP-blind: one server with 4 data-parallel ranks behind one port (vLLM's
#     internal balancing), limited KV per rank, shared-prefix work.
#     - dp-aware: `data_parallel_size: 4`, kvgate scores each rank and pins it by header;
#     - dp-blind: one endpoint; the server spreads requests over its ranks by load alone.
# Usage: benches/disagg.sh [output-dir]      (about 1.5 minutes here)
set -euo pipefail
out=$(realpath -m "${1:-target/disagg-bench}")
source "$(dirname "$0")/harness.sh"
mkdir -p "$out"
producer='{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
consumer='{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'
common=(--served-model-name m --time-scale 0.5 --seed 1)
pd_scheduler="{plugins: [{type: prefill-filter}, {type: decode-filter}, {type: prefix-cache-scorer}, {type: active-request-scorer}, {type: token-load-scorer}, {type: max-score-picker}, {type: disagg-profile-handler}, {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 256}}], schedulingProfiles: [{name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: token-load-scorer, weight: 2}, {pluginRef: max-score-picker}]}, {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer, weight: 2}, {pluginRef: max-score-picker}]}]}"

# run NAME POOL_YAML BENCH_FLAGS... : kvgate on the pool, the bench through its proxy.
run() {
  local name=$1 pool=$2; shift 2
  local proxy; proxy=$(port)
  printf "admin_addr: 127.0.0.1:0\ngrpc_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:%s\npools: [%s]\n" "$proxy" "$pool" > "$dir/kvgate.yaml"
  "$bin" serve --config "$dir/kvgate.yaml" >/dev/null 2>&1 &
  local kv=$!
  sleep 1.5
  "$bin" bench --base-url "http://127.0.0.1:$proxy" --model m "$@" --output "$out/$name.json" >/dev/null
  kill "$kv"; wait "$kv" 2>/dev/null || true
}
stop_sims() { kill "${sims[@]}" 2>/dev/null || true; wait "${sims[@]}" 2>/dev/null || true; }

long=(--workload random --num-prompts 60 --system-prompt-len 6000 --question-len 50 --output-len 64 --request-rate 6 --max-concurrency 64 --seed 7)
for mode in pd both; do
  sims=(); eps=(); metrics=()
  for k in 0 1 2 3; do
    p=$(port)
    if [ "$mode" = pd ]; then
      if [ "$k" -lt 2 ]; then role=prefill; kvc=$producer; else role=decode; kvc=$consumer; fi
    else
      role=both; kvc='{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
    fi
    "$bin" sim --port "$p" "${common[@]}" --kv-transfer-config "$kvc" >/dev/null 2>&1 &
    sims+=("$!"); metrics+=(--metrics-url "http://127.0.0.1:$p/metrics")
    eps+=("{address: '127.0.0.1:$p', labels: {llm-d.ai/role: $role}}")
  done
  joined=$(IFS=,; echo "${eps[*]}")
  sched=""; [ "$mode" = pd ] && sched=", scheduler: $pd_scheduler"
  run "long-$mode" "{name: p, models: [m], endpoints: [$joined]$sched}" "${long[@]}" "${metrics[@]}"
  stop_sims
done

shared=(--workload shared-prefix --groups 12 --prompts-per-group 16 --system-prompt-len 2500 --question-len 100 --output-len 32 --request-rate 24 --max-concurrency 256)
for mode in dp-aware dp-blind; do
  p=$(port)
  "$bin" sim --port "$p" "${common[@]}" --data-parallel-size 4 --num-gpu-blocks-override 1200 >/dev/null 2>&1 &
  sims=("$!")
  if [ "$mode" = dp-aware ]; then ep="{address: '127.0.0.1:$p', data_parallel_size: 4}"; else ep="{address: '127.0.0.1:$p'}"; fi
  run "$mode" "{name: p, models: [m], endpoints: [$ep]}" "${shared[@]}" --metrics-url "http://127.0.0.1:$p/metrics"
  stop_sims
done

"$bin" bench compare "$out"/long-{both,pd}.json --plot "$out/long-ttft.svg" > "$out/long.txt"
"$bin" bench compare "$out"/dp-{blind,aware}.json --plot "$out/dp-ttft.svg" > "$out/dp.txt"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'run':<14} {'hit rate':>8} {'ttft p50':>9} {'ttft p90':>9} {'tpot p50':>9} {'tpot p90':>9} {'e2e p90':>9} {'req/s':>6} {'errors':>6}")
for name in ("long-both", "long-pd", "dp-blind", "dp-aware"):
    r = json.load(open(f"{out}/{name}.json"))
    hit = r["prefix_cache_hit_rate"]
    print(f"{name:<14} {hit*100 if hit is not None else float('nan'):>7.1f}% {r['ttft_ms']['p50']:>7.0f}ms {r['ttft_ms']['p90']:>7.0f}ms "
          f"{r['tpot_ms']['p50']:>7.1f}ms {r['tpot_ms']['p90']:>7.1f}ms {r['e2e_ms']['p90']:>7.0f}ms {r['throughput_rps']:>6.1f} {r['failed']:>6}")
PY
echo "reports and TTFT plots: $out"
