# shellcheck shell=bash
# Sourced by run-local.sh and run-pattern.sh: starting, checking and stopping the processes they
# run, and finding the kvgate binary. Expects `wait_s` (seconds a process gets to come up) set;
# keeps the started processes in `pids`/`names` and their logs in `dir`, and stops them all on
# exit (EXIT, INT, TERM).
: "${wait_s:=15}"
pids=() names=() dir=
cleanup() {
  local rc=$? p k gone
  trap '' INT TERM
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
  for k in $(seq 50); do # up to 5 s to stop, then SIGKILL
    gone=1
    for p in ${pids[@]+"${pids[@]}"}; do kill -0 "$p" 2>/dev/null && gone=0; done
    [ "$gone" = 1 ] && break
    sleep 0.1
  done
  for p in ${pids[@]+"${pids[@]}"}; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -z "$dir" ] || rm -rf "$dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# die MSG [NAME]: MSG and the last lines of NAME's log on stderr, then exit 1 (and clean up).
die() {
  echo "error: $1" >&2
  if [ -n "${2:-}" ] && [ -s "$(log "$2")" ]; then
    echo "--- last lines of the $2 log:" >&2
    tail -n 20 "$(log "$2")" >&2
    echo "---" >&2
  elif [ -n "${2:-}" ]; then
    echo "(the $2 log is empty)" >&2
  fi
  exit 1
}
log() { echo "$dir/${1// /-}.log"; }
# free PORT: whether 127.0.0.1:PORT can be bound (SO_REUSEADDR, as kvgate and Envoy bind);
# without python3, whether nothing accepts connections on it.
free() {
  if ! command -v python3 >/dev/null; then if check "$1"; then return 1; fi; return 0; fi
  python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}
need_free() { # need_free PORT WHAT [VAR]
  free "$1" || die "port $1 ($2) is already in use, maybe by an earlier run still going; stop it${3:+ or set $3}"
}
# check CHECK: a port (something accepts a TCP connection on it) or an http:// URL (answers 2xx;
# without curl, just a connect to its port).
check() {
  case $1 in
    http://*)
      if command -v curl >/dev/null; then curl -sf -m 2 -o /dev/null "$1"; else
        local p=${1#http://*:}; check "${p%%/*}"
      fi ;;
    *) (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null ;;
  esac
}
# start NAME CMD…: runs CMD in the background, output in NAME's log; sets $pid.
start() {
  local name=$1; shift
  "$@" >"$(log "$name")" 2>&1 &
  pid=$!
  pids+=("$pid") names+=("$name")
}
# wait_up NAME PID CHECK…: waits until every CHECK passes while PID is alive, at most $wait_s s.
wait_up() {
  local name=$1 pid=$2 deadline=$((SECONDS + wait_s)) c on st; shift 2
  for c in "$@"; do
    case $c in http://*) on=$c ;; *) on=127.0.0.1:$c ;; esac
    until check "$c"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        st=0; wait "$pid" || st=$?
        die "$name (pid $pid) exited (status $st) before it was up on $on" "$name"
      fi
      [ "$SECONDS" -lt "$deadline" ] || die "$name (pid $pid) not up on $on after ${wait_s}s" "$name"
      sleep 0.1
    done
  done
  kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited right after starting" "$name"
}
# supervise [SECONDS]: returns after SECONDS (without: never); dies if a started process exits.
supervise() {
  local end=$((SECONDS + ${1:-0})) k
  while [ -z "${1:-}" ] || [ "$SECONDS" -lt "$end" ]; do
    for k in "${!pids[@]}"; do
      kill -0 "${pids[k]}" 2>/dev/null || die "${names[k]} (pid ${pids[k]}) exited unexpectedly" "${names[k]}"
    done
    sleep 1
  done
}
post() { # post URL JSON: prints the response body; fails on an error status
  if command -v curl >/dev/null; then curl -sS -f -m 30 -H 'content-type: application/json' -d "$2" "$1"; else
    python3 -c 'import sys, urllib.request as u
r = u.urlopen(u.Request(sys.argv[1], sys.argv[2].encode(), {"content-type": "application/json"}), timeout=30)
sys.stdout.write(r.read().decode())' "$1" "$2"
  fi
}
# kvgate_binary: sets $bin to $KVGATE_BIN, or builds target/release/kvgate when it is not given.
kvgate_binary() {
  if [ -n "${KVGATE_BIN:-}" ]; then
    bin=$KVGATE_BIN
  else
    cargo build --release --quiet
    bin=target/release/kvgate
  fi
  [ -x "$bin" ] || die "the kvgate binary $bin is not an executable file (set KVGATE_BIN?)"
}
