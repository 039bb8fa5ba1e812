#!/usr/bin/env bash
# kvgate against its peers: the same seeded workloads through kvgate (its default configuration:
# a pool without a `scheduler`), smg 1.13.0 and sglang-router 0.3.2 (`--policy cache_aware`), and
# round robin as the floor, each in front of four fresh simulators (restarted per run, so every
# run starts with empty caches) whose KV caches hold about 40% of the trace's working set.
#   workloads: shared-prefix (Poisson), multi-turn (interleaved sessions), bursty (all at once),
#              trace (benches/gen_trace.py: shared system prompts, multi-turn sessions with think
#              time, a heavy tail of one-off prompts)
#   loads:     light, medium, heavy (heavy: round robin queues)
#   seeds:     two per cell
# Prints one table: hit rate, TTFT p50/p90/p99, requests per endpoint (max / mean), errors.
# Usage: benches/peers.sh [output-dir]
#   ROUTERS="kvgate smg sglang round-robin" WORKLOADS=... LOADS=... SEEDS="1 2" narrow the run;
#   BACKEND=plain runs simulators that expose no vllm:cache_config_info and report no
#   prompt_tokens_details; REQUESTS sets requests per run (default 240).
# The peers are installed from PyPI into target/peers-venv on first use (PEERS_VENV overrides).
# Everything listens on 127.0.0.1; each run is bounded by `timeout`.
set -euo pipefail
out=$(realpath -m "${1:-target/peers-bench}")
source "$(dirname "$0")/harness.sh"
mkdir -p "$out"
venv=$(realpath -m "${PEERS_VENV:-target/peers-venv}")
if ! "$venv/bin/python" -c 'import smg, sglang_router' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q smg==1.13.0 sglang-router==0.3.2
  # sglang-router also installs a `smg` script; the routers run as `python -m`, so either order works.
  "$venv/bin/pip" install -q --force-reinstall --no-deps smg==1.13.0
fi
# A tokenizer download (sglang-router tries one for the workers' model) fails at once, on loopback.
export HF_ENDPOINT=http://127.0.0.1:9

replicas=4
requests=${REQUESTS:-240}
# An 8B model on one H100 (the simulator's latency model at time scale 1): prefill about 16k
# tokens/s, so four replicas round-robin a 2,600-token shared-prefix stream at ~30 requests/s
# before they queue. 1,200 blocks x 16 = 19,200 tokens of KV per replica for the synthetic
# workloads; trace replays size the caches to hold 40% of the trace's working set in all.
sim_flags=(--model m --served-model-name m --time-scale 1 --max-num-seqs 64 --seed 1)
[ "${BACKEND:-sim}" = plain ] && sim_flags+=(--no-cache-config-info --no-prompt-tokens-details)

rate_of() { case "$1" in light) echo 8 ;; medium) echo 16 ;; heavy) echo 28 ;; esac; }
burst_of() { case "$1" in light) echo 16 ;; medium) echo 48 ;; heavy) echo 128 ;; esac; }
# The trace is generated at about 15 requests/s; heavier loads replay it faster.
scale_of() { case "$1" in light) echo 2.0 ;; medium) echo 1.2 ;; heavy) echo 0.8 ;; esac; }
# `blocks_for WORKLOAD SEED`: each replica's KV blocks.
blocks_for() {
  if [ "$1" = trace ]; then
    python3 -c "import re,sys; n=int(re.search(r'working set (\d+) blocks', open(sys.argv[1]).read()).group(1)); print(max(64, int(n * 0.4 / $replicas)))" "$dir/trace-$2.txt"
  else
    echo 1200
  fi
}

workload_flags() { # workload load seed
  local groups=$((requests / 16))
  case "$1" in
    shared-prefix) echo "--workload shared-prefix --groups $groups --prompts-per-group 16 --system-prompt-len 2500 --question-len 100 --output-len 32 --request-rate $(rate_of "$2") --max-concurrency 256 --seed $3" ;;
    multi-turn) echo "--workload multi-turn --groups $((requests / 12)) --prompts-per-group 12 --system-prompt-len 2500 --question-len 100 --output-len 32 --request-rate $(rate_of "$2") --max-concurrency 256 --seed $3" ;;
    bursty) echo "--workload shared-prefix --groups $groups --prompts-per-group 16 --system-prompt-len 2500 --question-len 100 --output-len 32 --max-concurrency $(burst_of "$2") --seed $3" ;;
    trace) echo "--workload trace --trace $dir/trace-$3.jsonl --block-size 16 --trace-time-scale $(scale_of "$2") --max-concurrency 256 --seed $3" ;;
  esac
}

# `start_router NAME PORT SIM_PORTS...`: starts the router in the background; sets $router_pid.
start_router() {
  local name=$1 p=$2 urls=() eps=()
  shift 2
  for s in "$@"; do urls+=("http://127.0.0.1:$s"); eps+=("{address: '127.0.0.1:$s'}"); done
  case "$name" in
    kvgate|kvgate:*)
      # `kvgate:FILE` runs kvgate with the scheduler in FILE (YAML, for comparing settings).
      printf 'admin_addr: 127.0.0.1:%s\ngrpc_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:%s\npools:\n  - name: p\n    models: [m]\n    endpoints: [%s]\n' \
        "$(port)" "$p" "$(IFS=,; echo "${eps[*]}")" >"$dir/kvgate.yaml"
      if [ "$name" != kvgate ]; then
        { echo "    scheduler:"; sed 's/^/      /' "${name#kvgate:}"; } >>"$dir/kvgate.yaml"
      fi
      "$bin" serve --config "$dir/kvgate.yaml" >"$dir/router.log" 2>&1 & ;;
    round-robin)
      printf 'admin_addr: 127.0.0.1:%s\ngrpc_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:%s\npools: [{name: p, models: [m], endpoints: [%s], scheduler: {plugins: [{type: round-robin-picker}]}}]\n' \
        "$(port)" "$p" "$(IFS=,; echo "${eps[*]}")" >"$dir/kvgate.yaml"
      "$bin" serve --config "$dir/kvgate.yaml" >"$dir/router.log" 2>&1 & ;;
    smg)
      "$venv/bin/python" -m smg launch --host 127.0.0.1 --port "$p" --worker-urls "${urls[@]}" \
        --policy cache_aware --disable-tokenizer-autoload --worker-startup-check-interval 1 \
        --prometheus-host 127.0.0.1 --prometheus-port "$(port)" --log-level error >"$dir/router.log" 2>&1 & ;;
    sglang)
      "$venv/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port "$p" --worker-urls "${urls[@]}" \
        --policy cache_aware --worker-startup-check-interval 1 \
        --prometheus-host 127.0.0.1 --prometheus-port "$(port)" --log-level error >"$dir/router.log" 2>&1 & ;;
  esac
  router_pid=$!
}

# `wait_router NAME PORT`: until the router routes to every simulator (30 s at most).
wait_router() {
  for _ in $(seq 300); do
    case "$1" in
      kvgate*|round-robin) curl -sf "127.0.0.1:$2/v1/models" >/dev/null && sleep 0.3 && return ;;
      *) curl -s "127.0.0.1:$2/readiness" 2>/dev/null | grep -q "\"healthy_workers\":$replicas" && return ;;
    esac
    sleep 0.1
  done
  echo "router $1 did not become ready" >&2
  cat "$dir/router.log" >&2
  return 1
}

seeds=${SEEDS:-1 2}
for seed in $seeds; do
  python3 benches/gen_trace.py --seed "$seed" --requests "$((requests * 2))" --rate 8 >"$dir/trace-$seed.jsonl" 2>"$dir/trace-$seed.txt"
done
workloads=${WORKLOADS:-shared-prefix multi-turn bursty trace}
loads=${LOADS:-light medium heavy}
routers=${ROUTERS:-kvgate smg sglang round-robin}
for workload in $workloads; do
  for load in $loads; do
    for seed in $seeds; do
      for router in $routers; do
        sims=(); ports=(); metrics=()
        for _ in $(seq $replicas); do
          p=$(port)
          "$bin" sim --host 127.0.0.1 --port "$p" "${sim_flags[@]}" --num-gpu-blocks-override "$(blocks_for "$workload" "$seed")" >/dev/null 2>&1 &
          sims+=("$!"); ports+=("$p"); metrics+=(--metrics-url "http://127.0.0.1:$p/metrics")
        done
        for p in "${ports[@]}"; do
          for _ in $(seq 100); do curl -sf "127.0.0.1:$p/health" >/dev/null && break; sleep 0.05; done
        done
        rp=$(port)
        start_router "$router" "$rp" "${ports[@]}"
        if wait_router "$router" "$rp"; then
          # shellcheck disable=SC2046
          timeout 300 "$bin" bench --base-url "http://127.0.0.1:$rp" --model m $(workload_flags "$workload" "$load" "$seed") \
            "${metrics[@]}" --output "$out/$workload-$load-$seed-$(basename "$router").json" >/dev/null 2>&1 || true
        fi
        # (smg takes seconds to drain on SIGTERM; the run is over, so no grace is needed.)
        kill -KILL "$router_pid" "${sims[@]}" 2>/dev/null || true
        wait "$router_pid" "${sims[@]}" 2>/dev/null || true
      done
    done
  done
done

python3 - "$out" "$workloads" "$loads" "$seeds" "$routers" <<'PY'
import json, os, sys
out, workloads, loads, seeds, routers = sys.argv[1], *[a.split() for a in sys.argv[2:]]
print(f"{'workload':<14}{'load':<8}{'router':<16}{'hit':>6}{'p50':>8}{'p90':>8}{'p99':>8}{'max/mean':>10}{'errors':>8}  (means over seeds {' '.join(seeds)}; TTFT ms)")
for w in workloads:
    for l in loads:
        for r in routers:
            rows = []
            for s in seeds:
                path = os.path.join(out, f"{w}-{l}-{s}-{os.path.basename(r)}.json")
                if os.path.exists(path):
                    rows.append(json.load(open(path)))
            if not rows:
                print(f"{w:<14}{l:<8}{os.path.basename(r):<16}   (no result)")
                continue
            mean = lambda f: sum(f(x) for x in rows) / len(rows)
            def spread(x):
                counts = list(x.get("per_endpoint", {}).values())
                return max(counts) / (sum(counts) / len(counts)) if counts else float("nan")
            hit = mean(lambda x: x.get("prefix_cache_hit_rate") or 0.0)
            print(f"{w:<14}{l:<8}{os.path.basename(r):<16}{hit:>6.3f}{mean(lambda x: x['ttft_ms']['p50']):>8.0f}{mean(lambda x: x['ttft_ms']['p90']):>8.0f}"
                  f"{mean(lambda x: x['ttft_ms']['p99']):>8.0f}{mean(spread):>10.2f}{sum(x['failed'] for x in rows):>8}")
PY
