#!/usr/bin/env bash
# The fault matrix: the proxy over 4 simulated replicas, with failures injected on one or on
# every replica (rates 0.3/0.4/0.5; kinds 503, 500, abort, hang), streaming and not, 1 and 10
# requests in flight. Prints the requests clients saw fail against what arithmetic expects:
#   - a failure before the first byte (503, 500, hang past the first-byte timeout) is retried on
#     the decision's next candidates, up to `proxy.attempts` (3) endpoints: on every replica at
#     rate p, p^3 of requests fail; on one replica, almost none (its retries go elsewhere);
#   - an abort cuts a response that has started, which nothing retries: on every replica, p of
#     requests fail; on one, p times its share of the traffic (less once it is ejected).
# Usage: benches/faults.sh [requests per cell, default 200] [output.tsv]
set -euo pipefail
source "$(dirname "$0")/harness.sh"
n=${1:-200}
out=${2:-$dir/faults.tsv}

sims=()
for k in 0 1 2 3; do
  p=$(port)
  "$bin" sim --port "$p" --time-scale 0 --served-model-name m --seed "$k" >/dev/null 2>&1 &
  sims+=("$p")
done
proxy_config "proxy: {first_byte_timeout_ms: 300}" "${sims[@]}"
# A new kvgate for each cell, so no cell inherits another's ejections (a flapping endpoint is
# held out for up to 30 s).
kv=
start_kvgate() {
  [ -n "$kv" ] && { kill "$kv" 2>/dev/null; wait "$kv" 2>/dev/null || true; }
  "$bin" serve --config "$dir/kvgate.yaml" >>"$dir/kvgate.log" 2>&1 &
  kv=$!
  for _ in $(seq 100); do
    curl -s "http://127.0.0.1:$admin/debug/endpoints" 2>/dev/null | python3 -c \
      'import json,sys; e=json.load(sys.stdin)["pools"][0]["endpoints"]; sys.exit(0 if len(e)==4 and all(x["health"]=="healthy" and not x["stale"] for x in e) else 1)' \
      2>/dev/null && return
    sleep 0.1
  done
  echo "kvgate did not come up" >&2; exit 1
}

faults() { # rate kinds ports...
  local rate=$1 kinds=$2; shift 2
  for p in "$@"; do
    curl -sf "http://127.0.0.1:$p/admin/faults" \
      -d "{\"failure_rate\": $rate, \"failure_types\": [$kinds]}" >/dev/null
  done
}
printf 'scope\tkind\trate\tstream\tconcurrency\trequests\tfailed\tfailed_pct\texpected_pct\tkinds\n' >"$out"
for scope in one all; do
  for kind in 503 500 abort hang; do
    for rate in 0.3 0.4 0.5; do
      for stream in no yes; do
        for conc in 1 10; do
          faults 0 '"500"' "${sims[@]}"
          start_kvgate
          if [ "$scope" = one ]; then faults "$rate" "\"$kind\"" "${sims[0]}"; else faults "$rate" "\"$kind\"" "${sims[@]}"; fi
          flags=(--base-url "http://127.0.0.1:$proxy" --model m --workload random --num-prompts "$n"
            --max-concurrency "$conc" --system-prompt-len 50 --question-len 20 --output-len 8
            --groups "$n" --prompts-per-group 1 --output "$dir/r.json")
          [ "$stream" = no ] && flags+=(--no-stream)
          "$bin" bench "${flags[@]}" >/dev/null 2>&1 || true
          python3 - "$dir/r.json" "$scope" "$kind" "$rate" "$stream" "$conc" "$n" >>"$out" <<'PY'
import json, sys
path, scope, kind, rate, stream, conc, n = sys.argv[1:]
r = json.load(open(path))
rate = float(rate)
retried = kind in ("503", "500", "hang")
if scope == "all":
    expected = rate ** 3 if retried else rate
else:
    expected = 0.0 if retried else rate / 4
failed = r["failed"]
total = r["requests"] if "requests" in r else int(n)
kinds = ",".join(f"{k}:{v}" for k, v in sorted(r.get("errors_by_kind", {}).items()))
print(f"{scope}\t{kind}\t{rate}\t{stream}\t{conc}\t{total}\t{failed}\t{100*failed/max(total,1):.1f}\t{100*expected:.1f}\t{kinds or '-'}")
PY
        done
      done
    done
  done
done
faults 0 '"500"' "${sims[@]}"
column -t -s $'\t' "$out"
echo "(table: $out)"
