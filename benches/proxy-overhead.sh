#!/usr/bin/env bash
# What the proxy adds: the same wrk client against a simulator directly and through
# `kvgate serve`'s proxy, back to back.
#   1. latency at concurrency 1, small and 220 KB chat bodies, simulator at --time-scale 0
#      (so the simulator's own time is tiny and what differs is kvgate);
#   2. throughput at concurrency 16 and 64, four simulators with the real-time latency model;
#   3. kvgate's CPU time per request, from /proc, over the concurrency-64 run.
# Needs wrk (Debian package `wrk`). Usage: benches/proxy-overhead.sh [seconds per run]
set -euo pipefail
secs=${1:-10}
source "$(dirname "$0")/harness.sh"
need_wrk

python3 - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
small = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}
big = {"model": "m", "messages": [{"role": "system", "content": ("You are a careful assistant. " * 7600)[:220000]},
                                  {"role": "user", "content": "Summarize."}], "max_tokens": 8}
for name, body in (("small", small), ("big", big)):
    open(f"{d}/{name}.json", "w").write(json.dumps(body))
    open(f"{d}/{name}.lua", "w").write(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{d}/{name}.json", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
PY

start_sims() { # count time-scale -> fills $dir/sims
  : > "$dir/sims"
  for _ in $(seq "$1"); do
    p=$(port)
    "$bin" sim --port "$p" --served-model-name m --time-scale "$2" --max-num-seqs 256 >/dev/null 2>&1 &
    echo "127.0.0.1:$p" >> "$dir/sims"
  done
  sleep 1
}
start_kvgate() { # -> $proxy $kpid
  proxy=127.0.0.1:$(port)
  eps=$(sed "s/.*/{address: '&'}/" "$dir/sims" | paste -sd, -)
  printf "admin_addr: 127.0.0.1:0\nproxy_addr: %s\npools: [{name: p, models: [m], endpoints: [%s]}]\n" "$proxy" "$eps" > "$dir/kvgate.yaml"
  "$bin" serve --config "$dir/kvgate.yaml" >/dev/null 2>&1 &
  kpid=$!
  sleep 1.5
}
lat() { # url body conns -> "p50 p99 rps"
  wrk -t1 -c"$3" -d"${secs}s" --latency -s "$dir/$2.lua" "$1" | awk '
    /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /^Requests\/sec/ {rps=$2}
    END {print p50, p99, rps}'
}
ms() { python3 -c "import sys; v=sys.argv[1]; u={'us':1e-3,'ms':1,'s':1e3}; n=v.rstrip('usm'); print(round(float(n)*u[v[len(n):]],3))" "$1"; }

echo "== latency at concurrency 1 (simulator at --time-scale 0) =="
start_sims 1 0
start_kvgate
sim=$(head -1 "$dir/sims")
printf "%-6s %10s %10s %10s %10s %10s %10s\n" body direct_p50 proxy_p50 added_p50 direct_p99 proxy_p99 added_p99
for b in small big; do
  read -r dp50 dp99 _ < <(lat "http://$sim/v1/chat/completions" $b 1)
  read -r pp50 pp99 _ < <(lat "http://$proxy/v1/chat/completions" $b 1)
  python3 -c "
d50,d99,p50,p99=[float(x) for x in '$(ms $dp50) $(ms $dp99) $(ms $pp50) $(ms $pp99)'.split()]
print(f'%-6s %8.3fms %8.3fms %8.3fms %8.3fms %8.3fms %8.3fms' % ('$b', d50, p50, p50-d50, d99, p99, p99-d99))"
done
kill $(jobs -p) 2>/dev/null || true
sleep 0.5

echo "== throughput, four simulators in real time (8B-on-H100 latency model) =="
start_sims 4 1
start_kvgate
printf "%-5s %12s %12s %8s\n" conns direct_rps proxy_rps ratio
for c in 16 64; do
  # "Direct" spreads the same connections over the four simulators, as a plain L4 balancer would.
  pids=()
  for s in $(cat "$dir/sims"); do
    ( lat "http://$s/v1/chat/completions" small $((c / 4)) > "$dir/direct.$s" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  drps=$(cat "$dir"/direct.* | awk '{s+=$3} END {print s}')
  a=$(awk '{print $14+$15}' "/proc/$kpid/stat")
  read -r _ _ prps < <(lat "http://$proxy/v1/chat/completions" small $c)
  b=$(awk '{print $14+$15}' "/proc/$kpid/stat")
  python3 -c "print('%-5s %12.1f %12.1f %7.1f%%' % ($c, $drps, $prps, 100*$prps/$drps))"
  cpu_us=$(python3 -c "print(round(($b-$a)/$(getconf CLK_TCK)*1e6/($prps*$secs),1))")
done
echo "kvgate CPU per proxied request (concurrency 64 run): ${cpu_us} us"
