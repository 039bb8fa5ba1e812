#!/usr/bin/env bash
# Abuse: kvgate (proxy, admin and gRPC listeners) over 2 simulated replicas, put through one
# attack at a time while normal traffic is measured. Each attack runs SECONDS (default 15, at
# most 20; the whole run stays under 5 minutes), from 127.0.0.2 where the source address
# matters, bounded in count; meanwhile 20 small chat completions a second go through the proxy
# (2 s budget each, fresh connections), and /healthz on the admin listener and a gRPC health
# check every 200 ms. One row per attack: normal requests, their success %, p99 latency,
# /healthz and gRPC health success %, and kvgate's highest RSS, open fds and threads, with the
# WARN lines it logged; under each row, what the attack managed. The goal is 100% in every row;
# a row below it is reported, not fatal (the script fails only if it cannot run).
#   tcp-proxy        idle TCP connections to the proxy, past max_connections (5,000)
#   h2-preface       the HTTP/2 preface and SETTINGS, then nothing: to the proxy and the admin
#   half-http1-admin request headers never finished (a header line every 2 s) to the admin
#   tcp-grpc         idle TCP connections to the gRPC listener (20,000, or what ulimit -n allows)
#   h2-flood         SETTINGS and PING frames, never reading an ACK, on one gRPC connection
#   trickle-proxy    12 proxy uploads: 10 MiB at once (most of max_buffered_bytes), then 1 byte/10 s
#   extproc-partial  12 ext_proc streams: a chat's headers and 10 MiB of body, never ended
#   sim-sigstop      one replica SIGSTOPped for the whole window, then continued
#   endpoints-file   the pool's endpoints file: a symlink to /dev/zero, then a FIFO, then restored
#   picker-unreported  Picks never reported (pool `p` has admission max_in_flight 64; pool `q`,
#                    without limits, takes Picks that fill the pending decisions) and 1,000
#                    WatchEndpoints streams that are never read, all from one client; last, as
#                    its unreported decisions hold admission for start_timeout_ms (1 min)
# Defaults are kept for what the attacks test (4096 connections per listener, 128 MiB of
# bodies, body timeouts, picker timeouts) except connections.header_read_timeout_ms: 5 s (not
# 30 s), so idle HTTP/1 connections are seen reaped within a window; attackers open again what
# kvgate closes. A kvgate that dies or stops answering is reported (with whether SIGTERM ends
# it) and replaced for the next rows; it runs with its address space capped at 4 GiB, so a
# runaway allocation ends it, not the machine. Rows that would end past 5 minutes are skipped.
# Usage: benches/abuse.sh [seconds per attack, default 15]
set -euo pipefail
source "$(dirname "$0")/harness.sh"
secs=${1:-15}
export PYTHONDONTWRITEBYTECODE=1 # abuse.py imports h2c.py: no __pycache__ in benches/
[ "$secs" -ge 5 ] && [ "$secs" -le 20 ] || { echo "seconds per attack: 5 to 20" >&2; exit 2; }

# The attacker holds thousands of sockets; kvgate, started below, gets the same limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
[ "$nofile" = unlimited ] && nofile=1048576
room=$((nofile - 500))
most() { echo $(($1 < room ? $1 : room)); }

sim_pids=()
sims=()
for k in 0 1; do
  p=$(port)
  "$bin" sim --port "$p" --time-scale 0 --served-model-name m m2 --seed "$k" >/dev/null 2>&1 &
  sim_pids+=($!)
  sims+=("$p")
done
# At exit: a stopped replica is continued first (it would not die), and what SIGTERM does not
# end within 2 s is killed.
cleanup() {
  local left
  set +e
  kill -CONT "${sim_pids[@]}" 2>/dev/null
  left=$(jobs -p)
  [ -n "$left" ] && kill $left 2>/dev/null
  for _ in $(seq 20); do kill -0 $left 2>/dev/null || break; sleep 0.1; done
  [ -n "$left" ] && kill -9 $left 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

proxy=$(port)
admin=$(port)
grpc=$(port)
printf 'endpoints:\n  - {address: 127.0.0.1:%s}\n  - {address: 127.0.0.1:%s}\n' "${sims[@]}" >"$dir/endpoints.yaml"
cat >"$dir/kvgate.yaml" <<EOF
grpc_addr: 127.0.0.1:$grpc
admin_addr: 127.0.0.1:$admin
proxy_addr: 127.0.0.1:$proxy
connections: {header_read_timeout_ms: 5000}
pools:
  - {name: p, models: [m], endpoints_file: endpoints.yaml, admission: {max_in_flight: 64}}
  - {name: q, models: [m2], endpoints: [{address: '127.0.0.1:${sims[0]}'}, {address: '127.0.0.1:${sims[1]}'}]}
EOF
# `healthy`: every endpoint of every pool is in rotation and freshly scraped.
healthy() {
  curl -s --max-time 1 "http://127.0.0.1:$admin/debug/endpoints" 2>/dev/null | python3 -c \
    'import json,sys; e=[x for p in json.load(sys.stdin)["pools"] for x in p["endpoints"]]; sys.exit(0 if len(e)==4 and all(x["health"]=="healthy" and not x["stale"] for x in e) else 1)' \
    2>/dev/null
}
# `start_kvgate`: a kvgate in $kv, ready. Its address space is capped (4 GiB; under these
# attacks it stays below 1 GiB), so a runaway allocation ends kvgate, not the machine.
start_kvgate() {
  (ulimit -v 4194304 && exec "$bin" serve --config "$dir/kvgate.yaml") >>"$dir/kvgate.log" 2>&1 &
  kv=$!
  for _ in $(seq 100); do healthy && return; sleep 0.1; done
  echo "kvgate did not come up" >&2
  tail -5 "$dir/kvgate.log" >&2
  exit 1
}
# `stop_kvgate`: SIGTERM, then SIGKILL if kvgate is still there 5 s later; says which.
stop_kvgate() {
  local t0=$SECONDS
  kill "$kv" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$kv" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$kv" 2>/dev/null; then
    echo "    ! kvgate did not exit within 5 s of SIGTERM; killed"
    kill -9 "$kv"
  else
    echo "    kvgate exited on SIGTERM within $((SECONDS - t0 + 1)) s"
  fi
  wait "$kv" 2>/dev/null || true
}
start_kvgate

rss() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$kv/status" 2>/dev/null || echo 0; }
nfds() { ls "/proc/$kv/fd" 2>/dev/null | wc -l; }
warns() { grep -c ' WARN ' "$dir/kvgate.log" || true; }
base_fds=$(nfds)
# `settle`: before the next row, up to 10 s for kvgate's fds to come back and every endpoint
# to be in rotation again.
settle() {
  for _ in $(seq 50); do
    [ "$(nfds)" -le $((base_fds + 32)) ] && healthy && return
    sleep 0.2
  done
}

ports=(--proxy "$proxy" --admin "$admin" --grpc "$grpc")
out=$dir/abuse.tsv
header=$(printf '%-18s %6s %7s %8s %8s %7s %7s %6s %8s %6s' attack sent ok_pct p99_ms healthz grpc rss_MB fds threads warns)
echo "kvgate: $bin; ulimit -n $nofile (kvgate's too); attacks of ${secs} s from 127.0.0.2"
echo "kvgate RSS before: $(rss) MB, $(nfds) fds"
echo "$header"
# `row NAME [ATTACK ARGS...]`: normal traffic for $secs seconds beside the attack (none without
# ARGS); prints and records its row and the attack's note.
row() {
  local name=$1 w0 a= load note st
  shift
  if [ $((SECONDS + secs + 15)) -gt 285 ]; then
    echo "$name: skipped (the run would pass 5 minutes)"
    return
  fi
  w0=$(warns)
  : >"$dir/note"
  if [ $# -gt 0 ]; then
    python3 benches/abuse.py attack "$@" "${ports[@]}" --seconds "$((secs + 1))" >"$dir/note" 2>&1 &
    a=$!
  fi
  load=$(python3 benches/abuse.py load "${ports[@]}" --seconds "$secs" --pid "$kv") || true
  if [ -n "$a" ]; then wait "$a" || true; fi
  note=$(tail -c 600 "$dir/note")
  read -r sent ok p99 hz gr rssmax fdmax thmax <<<"$load"
  printf '%-18s %6s %7s %8s %8s %7s %7s %6s %8s %6s\n' "$name" "$sent" "$ok" "$p99" "$hz" "$gr" "$rssmax" "$fdmax" \
    "$thmax" "$(($(warns) - w0))" | tee -a "$out"
  [ -n "$note" ] && echo "    $note"
  # A kvgate that died or stopped answering is reported, and a fresh one runs the next rows.
  if ! kill -0 "$kv" 2>/dev/null; then
    wait "$kv" && st=0 || st=$?
    echo "    ! kvgate exited (status $st) during $name; its last log line: $(tail -1 "$dir/kvgate.log" | cut -c1-160)"
    restarted+=("$name")
    start_kvgate
    return
  fi
  settle
  if ! curl -sf --max-time 2 "http://127.0.0.1:$admin/healthz" >/dev/null; then
    echo "    ! kvgate stopped answering /healthz after $name (its threads wait in: $(for t in /proc/"$kv"/task/*; do printf '%s ' "$(cat "$t/wchan" 2>/dev/null)"; done))"
    stop_kvgate
    restarted+=("$name")
    start_kvgate
  fi
}

restarted=()
row none
row tcp-proxy tcp --port "$proxy" --count "$(most 5000)"
row h2-preface h2-preface --count "$(most 9000)"
row half-http1-admin half-http1 --port "$admin" --count "$(most 5000)"
# As many as this shell's limit lets the attacker hold: kvgate has the same limit.
row tcp-grpc tcp --port "$grpc" --count "$((nofile - 20 < 20000 ? nofile - 20 : 20000))"
row h2-flood h2-flood
row trickle-proxy trickle --count 12
row extproc-partial extproc --count 12
row sim-sigstop sigstop --sim-pid "${sim_pids[1]}"
row endpoints-file file --file "$dir/endpoints.yaml"
row picker-unreported picker
fresh=${restarted[*]:+ (a fresh kvgate since: ${restarted[*]})}
echo "kvgate RSS after the attacks: $(rss) MB, $(nfds) fds$fresh"
sleep 10
echo "kvgate RSS after 10 s idle: $(rss) MB, $(nfds) fds"
secs=5
row after-10s-idle
stop_kvgate
echo
echo "$header"
cat "$out"
echo "kvgate WARN log lines: $(warns), ERROR: $(grep -c ' ERROR ' "$dir/kvgate.log" || true); the most frequent:"
grep -E ' (WARN|ERROR) ' "$dir/kvgate.log" | sed -E 's/^[^ ]+ +//; s/[0-9]+/N/g' | cut -c1-110 | sort | uniq -c |
  sort -rn | head -8 || true
