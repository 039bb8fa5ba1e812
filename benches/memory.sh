#!/usr/bin/env bash
# Memory under upload load, and what is given back after it: the proxy over one simulated
# replica takes ROUNDS rounds of CLIENTS concurrent uploads of SIZE_MB each, sent slowly (in
# 64 KiB pieces over about 2 s, so they are all held at once), then rests 10 s. Prints kvgate's
# RSS at rest before the load, at each round's peak and after each rest; the bound on bytes held
# (`max_buffered_bytes`, 128 MiB by default) caps the peak, the rest shows what the allocator
# keeps. Usage: benches/memory.sh [clients, default 40] [size MB, default 3] [rounds, default 3]
set -euo pipefail
source "$(dirname "$0")/harness.sh"
clients=${1:-40}
size_mb=${2:-3}
rounds=${3:-3}

sim=$(port)
"$bin" sim --port "$sim" --time-scale 0 --served-model-name m --max-model-len 100000000 >/dev/null 2>&1 &
proxy_config "max_body_bytes: 67108864" "$sim"
"$bin" serve --config "$dir/kvgate.yaml" >"$dir/kvgate.log" 2>&1 &
kv=$!
wait_ready
python3 - "$kv" "$proxy" "$clients" "$size_mb" "$rounds" <<'PY'
import socket, sys, threading, time
pid, port, clients, size_mb, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
statuses = []
def upload():
    prompt = b"x" * (size_mb << 20)
    body = b'{"model":"m","max_tokens":1,"prompt":"' + prompt + b'"}'
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    step = 64 << 10
    pause = 2.0 / max(1, len(body) // step)
    for i in range(0, len(body), step):
        s.sendall(body[i:i + step])
        time.sleep(pause)
    got = s.recv(64)
    statuses.append(got[9:12].decode(errors="replace"))
    s.close()
print(f"at rest before the load: {rss()} MB")
for r in range(rounds):
    threads = [threading.Thread(target=upload) for _ in range(clients)]
    peak = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss())
        time.sleep(0.05)
    time.sleep(10)
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    statuses.clear()
    print(f"round {r + 1}: {clients} x {size_mb} MB uploads, answers {counts}; peak {peak} MB, 10 s later {rss()} MB")
PY
