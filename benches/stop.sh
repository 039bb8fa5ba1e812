#!/usr/bin/env bash
# A stopped endpoint (SIGSTOP: its kernel still accepts connections, nothing answers) with
# kvgate's default scrape and silence timings and no traffic at all: how long until
# /debug/endpoints shows it out of rotation, stopped at a random moment of the scrape cycle, and
# how long after SIGCONT it is back. Prints each stop, then min / median / max. The bound with
# the defaults: 2.4 s until the next scrape goes out + `health.unresponsive_ms` (2 s) = 4.4 s.
# `health.max_backoff_ms` is 2 s here, so that stops in quick succession (a flapping endpoint to
# kvgate, held out twice as long each time) are not held out for up to 30 s.
# Usage: benches/stop.sh [stops, default 20]
set -euo pipefail
source "$(dirname "$0")/harness.sh"
n=${1:-20}

a=$(port)
b=$(port)
"$bin" sim --port "$a" --time-scale 0 --served-model-name m >/dev/null 2>&1 &
stoppable=$!
"$bin" sim --port "$b" --time-scale 0 --served-model-name m >/dev/null 2>&1 &
# A stopped process does not act on SIGTERM: let it go on first.
trap 'kill -CONT $stoppable 2>/dev/null; kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
proxy_config "health: {max_backoff_ms: 2000}" "$a" "$b"
"$bin" serve --config "$dir/kvgate.yaml" >"$dir/kvgate.log" 2>&1 &
wait_ready

python3 - "$admin" "127.0.0.1:$a" "$stoppable" "$n" <<'EOF'
import json, os, random, signal, statistics, sys, time, urllib.request

admin, addr, pid, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def health():
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/debug/endpoints", timeout=5) as r:
        endpoints = json.load(r)["pools"][0]["endpoints"]
    return next((e["health"] for e in endpoints if e["address"] == addr), "")

def until(healthy, bound):
    start = time.monotonic()
    while time.monotonic() - start < bound:
        if (health() == "healthy") == healthy:
            return time.monotonic() - start
        time.sleep(0.01)
    sys.exit(f"not {'back' if healthy else 'out'} within {bound} s")

until(True, 10)
outs, backs = [], []
for k in range(n):
    time.sleep(random.uniform(0, 2.4))
    os.kill(pid, signal.SIGSTOP)
    try:
        outs.append(until(False, 30))
    finally:
        os.kill(pid, signal.SIGCONT)
    backs.append(until(True, 30))
    print(f"stop {k + 1:2}: out of rotation after {outs[-1] * 1000:5.0f} ms, back {backs[-1] * 1000:5.0f} ms after SIGCONT")
for name, xs in (("out after SIGSTOP", outs), ("back after SIGCONT", backs)):
    ms = sorted(x * 1000 for x in xs)
    print(f"{name}: min {ms[0]:.0f} ms, median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms")
EOF
