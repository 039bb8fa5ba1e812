#!/usr/bin/env bash
# What scraping costs kvgate: 100 endpoints (one simulator process serving 100 ports, each with
# its own metrics), scraped every 50 ms; prints kvgate's CPU time as a share of one core.
# Usage: benches/scrape-cost.sh [seconds]   (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
cargo build --release --quiet
bin=target/release/kvgate
base=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(20000 + s.getsockname()[1] % 20000)')
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
taskset -c 1 "$bin" sim --port "$base" --time-scale 0 --data-parallel-size 100 --data-parallel-multi-port-external-lb >/dev/null 2>&1 &
sleep 1
# Some traffic first, so every exposition has populated histograms.
for i in $(seq 0 99); do
  curl -s "127.0.0.1:$((base + i))/v1/completions" -d '{"prompt":"hello world","max_tokens":4}' >/dev/null
done
python3 - "$base" > "$dir/kvgate.yaml" <<'PY'
import sys
base = int(sys.argv[1])
eps = ", ".join(f"{{address: '127.0.0.1:{base + i}'}}" for i in range(100))
print("admin_addr: 127.0.0.1:0\nscrape: {interval_ms: 50}")
print(f"pools: [{{name: p, models: ['meta-llama/Llama-3.1-8B-Instruct'], endpoints: [{eps}]}}]")
PY
"$bin" serve --config "$dir/kvgate.yaml" >/dev/null 2>&1 &
pid=$!
sleep 3
a=$(awk '{print $14+$15}' "/proc/$pid/stat")
sleep "$secs"
b=$(awk '{print $14+$15}' "/proc/$pid/stat")
python3 -c "t=($b-$a)/$(getconf CLK_TCK); print(f'kvgate CPU scraping 100 endpoints every 50 ms: {t:.2f} s in $secs s = {100*t/$secs:.2f}% of one core')"
