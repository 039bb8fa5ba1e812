#!/usr/bin/env bash
# What kvgate adds as Envoy's endpoint picker, side by side in one run with the same client (wrk):
#   Envoy -> simulator with a fixed destination (no picker)  vs  Envoy -> kvgate -> simulator.
#   1. latency at concurrency 1 for 4 KB and 220 KB chat bodies (simulator at --time-scale 0);
#   2. latency at a fixed rate below saturation (200 requests/s, open loop: benches/open_loop.py);
#   3. saturation throughput at concurrency 20 and 150 (4 KB bodies);
#   4. kvgate's CPU time per request (from /proc) for 4 KB, 220 KB and 400 KB (~100k-token) bodies.
# Needs wrk (Debian `wrk`) and Envoy (found or installed as in deploy/envoy/run-local.sh).
# Usage: benches/envoy-overhead.sh [seconds per run]
set -euo pipefail
secs=${1:-8}
source "$(dirname "$0")/harness.sh"
need_wrk
find_envoy

python3 - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
def chat(n):
    return {"model": "m", "max_tokens": 1, "messages": [
        {"role": "system", "content": ("You are a careful assistant. " * (n // 29 + 1))[:n]},
        {"role": "user", "content": "Summarize."}]}
for name, n in (("4k", 4000), ("220k", 220000), ("400k", 400000)):
    open(f"{d}/{name}.json", "w").write(json.dumps(chat(n)))
    open(f"{d}/{name}.lua", "w").write(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{d}/{name}.json", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
PY

sim=$(port); grpc=$(port); admin=$(port); via=$(port); direct=$(port)
"$bin" sim --port "$sim" --served-model-name m --time-scale 0 --max-num-seqs 512 >/dev/null 2>&1 &
printf "grpc_addr: 127.0.0.1:%s\nadmin_addr: 127.0.0.1:%s\npools: [{name: p, models: [m], endpoints: [{address: '127.0.0.1:%s'}]}]\n" \
  "$grpc" "$admin" "$sim" > "$dir/kvgate.yaml"
"$bin" serve --config "$dir/kvgate.yaml" >/dev/null 2>&1 &
kpid=$!
# Envoy through kvgate: the shipped ORIGINAL_DST config on our ports.
sed -e "s/port_value: 9002/port_value: $grpc/" -e "s/port_value: 8081/port_value: $via/" -e "s/port_value: 19901/port_value: $(port)/" \
  deploy/envoy/original-dst.yaml > "$dir/via.yaml"
# Envoy with a fixed destination: same listener settings, no picker.
cat > "$dir/direct.yaml" <<YAML
admin: { address: { socket_address: { address: 127.0.0.1, port_value: $(port) } } }
static_resources:
  listeners:
  - name: gateway
    address: { socket_address: { address: 127.0.0.1, port_value: $direct } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          route_config: { virtual_hosts: [{ name: all, domains: ["*"], routes: [{ match: { prefix: "/" }, route: { cluster: sim, timeout: 0s } }] }] }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: sim
    type: STATIC
    connect_timeout: 1s
    load_assignment: { cluster_name: sim, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $sim } } } }] }] }
YAML
"$envoy" -c "$dir/via.yaml" --disable-hot-restart --concurrency 1 --log-level error &
"$envoy" -c "$dir/direct.yaml" --disable-hot-restart --concurrency 1 --log-level error &
sleep 2

run() { # port body conns -> "p50 p99 rps requests"
  wrk -t1 -c"$3" -d"${secs}s" --latency -s "$dir/$2.lua" "http://127.0.0.1:$1/v1/chat/completions" | awk '
    /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /^Requests\/sec/ {rps=$2} / requests in / {n=$1}
    END {print p50, p99, rps, n}'
}
ms() { python3 -c "import sys; v=sys.argv[1]; u={'us':1e-3,'ms':1,'s':1e3}; n=v.rstrip('usm'); print(float(n)*u[v[len(n):]])" "$1"; }
cpu() { awk '{print $14+$15}' "/proc/$kpid/stat"; }
tck=$(getconf CLK_TCK)

echo "== concurrency 1: latency kvgate adds =="
printf "%-5s %11s %11s %9s %11s %11s %9s %12s\n" body fixed_p50 kvgate_p50 added fixed_p99 kvgate_p99 added kvgate_cpu/req
for b in 4k 220k 400k; do
  read -r dp50 dp99 _ _ < <(run "$direct" $b 1)
  a=$(cpu); read -r vp50 vp99 _ vn < <(run "$via" $b 1); z=$(cpu)
  python3 -c "
d50,d99,v50,v99=$(ms $dp50),$(ms $dp99),$(ms $vp50),$(ms $vp99)
us=($z-$a)/$tck*1e6/$vn
print('%-5s %9.3fms %9.3fms %7.3fms %9.3fms %9.3fms %7.3fms %10.0fus' % ('$b', d50, v50, v50-d50, d99, v99, v99-d99, us))"
done
echo "== fixed rate below saturation (200 requests/s, open loop, latency from scheduled start) =="
printf "%-5s %11s %11s %9s %11s %11s %9s\n" body fixed_p50 kvgate_p50 added fixed_p99 kvgate_p99 added
for b in 4k 220k; do
  read -r dp50 dp99 _ _ < <(python3 benches/open_loop.py "127.0.0.1:$direct" /v1/chat/completions "$dir/$b.json" 200 "$secs")
  read -r vp50 vp99 _ _ < <(python3 benches/open_loop.py "127.0.0.1:$via" /v1/chat/completions "$dir/$b.json" 200 "$secs")
  python3 -c "print('%-5s %9.3fms %9.3fms %7.3fms %9.3fms %9.3fms %7.3fms' % ('$b', $dp50, $vp50, $vp50-$dp50, $dp99, $vp99, $vp99-$dp99))"
done
echo "== saturation throughput (4 KB bodies) =="
printf "%-6s %12s %12s %8s\n" conns fixed_rps kvgate_rps ratio
for c in 20 150; do
  read -r _ _ drps _ < <(run "$direct" 4k $c)
  read -r _ _ vrps _ < <(run "$via" 4k $c)
  python3 -c "print('%-6s %12.0f %12.0f %7.1f%%' % ($c, $drps, $vrps, 100*$vrps/$drps))"
done
