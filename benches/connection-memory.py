#!/usr/bin/env python3
"""Memory after a burst of connections: kvgate's RSS at rest, with 3,000 idle HTTP/2
connections open (half to the proxy, half to the gRPC port), and 25 s after they close; twice.
What stays after the close is what the allocator kept. Loopback only, bounded (about 70 s).

Usage: benches/connection-memory.py [path to kvgate, default target/release/kvgate]
"""
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/kvgate"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proxy, admin, grpc, sim = (free_port() for _ in range(4))
    cfg = os.path.join(tempfile.mkdtemp(), "kvgate.yaml")
    with open(cfg, "w") as f:
        f.write(f"proxy_addr: 127.0.0.1:{proxy}\nadmin_addr: 127.0.0.1:{admin}\ngrpc_addr: 127.0.0.1:{grpc}\n"
                f"pools: [{{name: p, models: [m], endpoints: [{{address: '127.0.0.1:{sim}'}}]}}]\n")
    kv = subprocess.Popen([BIN, "serve", "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rss():
        with open(f"/proc/{kv.pid}/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))

    try:
        time.sleep(1.5)
        print(f"at rest: {rss()} MB")
        for rnd in (1, 2):
            socks = []
            for i in range(3000):
                try:
                    s = socket.create_connection(("127.0.0.1", proxy if i % 2 else grpc), timeout=2)
                    s.sendall(PREFACE)
                    socks.append(s)
                except OSError:
                    pass
            time.sleep(2)
            print(f"round {rnd}: {len(socks)} connections open, RSS {rss()} MB")
            for s in socks:
                s.close()
            time.sleep(25)
            print(f"round {rnd}: 25 s after they closed, RSS {rss()} MB")
    finally:
        kv.terminate()
        kv.wait(timeout=10)


if __name__ == "__main__":
    main()
