"""The two halves of benches/abuse.sh, on loopback only, Python's standard library only.

`load`: the normal traffic measured while an attack runs: small chat completions through the
proxy at a steady rate (each with a 2 s budget, on a fresh connection), `/healthz` on the admin
listener and a gRPC health check on the gRPC listener every 200 ms, and kvgate's RSS, open file
descriptors and threads sampled every 200 ms. Prints one tab-separated line: requests, success
%, p99 ms (failures counted at the time they took), /healthz %, gRPC health %, max RSS MB, max
fds, max threads.

`attack NAME`: one attack, bounded in count and in time (`--seconds`), from 127.0.0.2 where the
source address matters. Prints one line saying what it managed (connections held, frames sent,
picks answered...). Its sockets close with a reset when it ends, so nothing lingers.

gRPC is spoken as raw HTTP/2 frames (`h2c.py`).
"""

import argparse
import errno
import http.client
import json
import os
import selectors
import signal
import socket
import struct
import threading
import time

from h2c import H2, PING, PREFACE, SETTINGS, frame, grpc_message, pb_bytes, pb_varint, read_varint

ATTACKER = "127.0.0.2"
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect, per destination
stopping = threading.Event()


def on_term(*_):
    stopping.set()


def attack_socket(blocking=True):
    """A TCP socket bound to the attacker's address that resets (no TIME_WAIT) when closed."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.bind((ATTACKER, 0))
    s.setblocking(blocking)
    return s


# ---- the normal traffic ----

def load(a):
    lat, healthz, grpc, samples = [], [], [], []
    lock = threading.Lock()
    body = lambda i: json.dumps({"model": "m", "max_tokens": 4,
                                 "messages": [{"role": "user", "content": f"hello {i}"}]})

    def answered(port, method, path, payload=None):
        """Whether a fresh connection to `port` gets 200 within 2 s."""
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
            r = c.getresponse()
            r.read()
            c.close()
            return r.status == 200
        except (OSError, http.client.HTTPException):
            return False

    def chat(i):
        t0 = time.monotonic()
        ok = answered(a.proxy, "POST", "/v1/chat/completions", body(i))
        t = time.monotonic() - t0
        with lock:
            lat.append((ok and t <= 2.0, t))

    def health():
        ok = answered(a.admin, "GET", "/healthz")
        with lock:
            healthz.append(ok)

    def grpc_health():
        ok = False
        h = None
        try:
            h = H2(a.grpc, timeout=2)
            ok = h.call("/grpc.health.v1.Health/Check", b"", timeout=2) == b"\x08\x01"
        except (OSError, ConnectionError, TimeoutError):
            pass
        finally:
            if h:
                h.close()
        with lock:
            grpc.append(ok)

    def sample():
        while not done.is_set():
            try:
                status = open(f"/proc/{a.pid}/status").read()
                rss = int(status.split("VmRSS:")[1].split()[0]) // 1024
                threads = int(status.split("Threads:")[1].split()[0])
                samples.append((rss, len(os.listdir(f"/proc/{a.pid}/fd")), threads))
            except (OSError, IndexError, ValueError):
                pass
            done.wait(0.2)

    done = threading.Event()
    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = []
    start = time.monotonic()
    step = 1.0 / a.rate
    i = 0
    while True:
        due = start + i * step
        if due - start >= a.seconds:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        workers.append(threading.Thread(target=chat, args=(i,)))
        workers[-1].start()
        if i % max(1, round(a.rate / 5)) == 0:
            workers.append(threading.Thread(target=health))
            workers.append(threading.Thread(target=grpc_health))
            workers[-2].start()
            workers[-1].start()
        i += 1
    for w in workers:
        w.join()
    done.set()
    sampler.join()
    times = sorted(t for _, t in lat)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000 if times else 0
    pct = lambda xs: 100.0 * sum(xs) / max(1, len(xs))
    rss, fds, threads = (max(s[k] for s in samples) if samples else 0 for k in range(3))
    print(f"{len(lat)}\t{pct([ok for ok, _ in lat]):.1f}\t{p99:.0f}\t{pct(healthz):.1f}\t{pct(grpc):.1f}"
          f"\t{rss}\t{fds}\t{threads}")


# ---- the attacks ----

class Gauge:
    """The highest value of one of kvgate's gauges on `/metrics`, read every second (from
    127.0.0.1) while the attack runs."""

    def __init__(self, admin, name):
        self.admin, self.name, self.top = admin, name, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(1.0):
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=2)
                c.request("GET", "/metrics")
                text = c.getresponse().read().decode()
                c.close()
            except (OSError, http.client.HTTPException):
                continue
            for line in text.splitlines():
                if line.startswith(self.name + " ") or line.startswith(self.name + "{"):
                    v = float(line.rsplit(" ", 1)[1])
                    self.top = v if self.top is None else max(self.top, v)

    def stop(self):
        self.done.set()
        self.thread.join()
        return "unread" if self.top is None else f"{self.top:.0f}"


def together(threads):
    """Starts `threads`, then waits for every one of them."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def hold(port, count, seconds, payload=b"", drip=b"", every=0.0, max_opens=None):
    """Holds `count` connections to `port` open, each sending `payload` once connected (and
    `drip` every `every` s), reading and discarding what comes back; a connection kvgate
    closes is opened again, `max_opens` in all (10 x count). Connections open 32 at a time
    every 5 ms: faster, the listener's accept queue overflows and the kernel drops connections
    the attacker believes open."""
    max_opens = max_opens or 10 * count
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + seconds
    opens = connected = refused = reaped = failed = 0
    since = {}
    last_drip = next_batch = time.monotonic()
    live = set()
    limit_note = ""

    def open_one():
        nonlocal opens, failed, limit_note
        try:
            s = attack_socket(blocking=False)
        except OSError as e:
            limit_note = f" (own limit: {os.strerror(e.errno)})"
            return False
        opens += 1
        rc = s.connect_ex(("127.0.0.1", port))
        if rc not in (0, errno.EINPROGRESS):
            failed += 1
            s.close()
            return True
        sel.register(s, selectors.EVENT_WRITE)
        return True

    while not stopping.is_set() and time.monotonic() < deadline:
        if time.monotonic() >= next_batch:
            next_batch = time.monotonic() + 0.005
            batch = 0
            while len(sel.get_map()) < count and opens < max_opens and batch < 32:
                if not open_one():
                    break
                batch += 1
        for key, ev in sel.select(timeout=0.005):
            s = key.fileobj
            if ev & selectors.EVENT_WRITE and s not in live:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                    sel.unregister(s)
                    s.close()
                    continue
                live.add(s)
                since[s] = time.monotonic()
                connected += 1
                try:
                    if payload:
                        s.send(payload)
                except OSError:
                    pass
                sel.modify(s, selectors.EVENT_READ)
            elif ev & selectors.EVENT_READ:
                try:
                    gone = not s.recv(65536)
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    # Closed at once: refused; later: timed out (reaped).
                    if time.monotonic() - since.pop(s, 0) < 1.0:
                        refused += 1
                    else:
                        reaped += 1
                    live.discard(s)
                    sel.unregister(s)
                    s.close()
        if drip and time.monotonic() - last_drip >= every:
            last_drip = time.monotonic()
            for s in list(live):
                try:
                    s.send(drip)
                except OSError:
                    pass
    held = len(live)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return (f"held {held}/{count} at the end; {opens} opened, {connected} connected, closed by kvgate: "
            f"{refused} at once, {reaped} after 1 s or more; {failed} failed{limit_note}")


def h2_preface(a):
    h2 = PREFACE + frame(SETTINGS, 0, 0)
    per = a.count // 2
    notes = {}
    threads = [threading.Thread(target=lambda p, n: notes.__setitem__(n, hold(p, per, a.seconds, h2)),
                                args=(port, name)) for port, name in ((a.proxy, "proxy"), (a.admin, "admin"))]
    together(threads)
    return "; ".join(f"{n}: {v}" for n, v in notes.items())


def h2_flood(a):
    """SETTINGS and PING frames, interleaved, as fast as the connection takes them, never
    reading an ACK."""
    s = attack_socket()
    s.settimeout(5)
    s.connect(("127.0.0.1", a.grpc))
    s.sendall(PREFACE + frame(SETTINGS, 0, 0))
    s.settimeout(0.5)
    batch = (frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535)) + frame(PING, 0, 0, b"12345678")) * 500
    sent = stalls = 0
    deadline = time.monotonic() + a.seconds
    note = ""
    while not stopping.is_set() and time.monotonic() < deadline and sent < 50_000_000:
        try:
            s.sendall(batch)
            sent += 1000
        except socket.timeout:
            stalls += 1
        except OSError as e:
            note = f"; kvgate closed it ({e.strerror})"
            break
    s.close()
    return f"{sent} frames sent (half SETTINGS, half PING), {stalls} half-second stalls{note}"


def trickle(a):
    """`count` proxy uploads that send 10 MiB at once, then 1 byte every 10 s."""
    size = 10 << 20
    results = []

    def one(k):
        head = b'{"model":"m","messages":[{"role":"user","content":"'
        total = size + 4096
        s = attack_socket()
        try:
            s.settimeout(5)
            s.connect(("127.0.0.1", a.proxy))
            s.settimeout(10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % total + head + b"x" * (size - len(head)))
            s.settimeout(0.5)
            deadline = time.monotonic() + a.seconds
            last = time.monotonic()
            while not stopping.is_set() and time.monotonic() < deadline:
                if time.monotonic() - last >= 10:
                    s.send(b"x")
                    last = time.monotonic()
                try:
                    got = s.recv(4096)
                    results.append(got[9:12].decode(errors="replace") if got else "closed")
                    return
                except socket.timeout:
                    pass
            results.append("held")
        except OSError as e:
            results.append(e.strerror or "error")
        finally:
            s.close()

    held = Gauge(a.admin, "kvgate_buffered_request_bytes")
    threads = [threading.Thread(target=one, args=(k,)) for k in range(a.count)]
    together(threads)
    counts = {r: results.count(r) for r in sorted(set(results))}
    return (f"{a.count} x 10 MiB then 1 byte/10 s; at the end: {counts}; "
            f"kvgate_buffered_request_bytes at most {held.stop()}")


def extproc_partial(a):
    """`count` ext_proc streams on one connection: a chat's request headers, then 10 MiB of
    body in 256 KiB chunks without end_of_stream, then nothing."""
    h = H2(a.grpc, attack_socket(), stopping=stopping)
    size, chunk = 10 << 20, 256 << 10

    def headers_msg():
        pairs = [(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "kvgate"),
                 ("content-type", "application/json"), ("content-length", str(size + 4096))]
        hmap = b"".join(pb_bytes(1, pb_bytes(1, k) + pb_bytes(3, v)) for k, v in pairs)
        return pb_bytes(2, pb_bytes(1, hmap))

    def body_msg(data):
        return pb_bytes(4, pb_bytes(1, data))

    sent = [0] * a.count
    ended = [False] * a.count

    def one(k):
        try:
            sid = h.open("/envoy.service.ext_proc.v3.ExternalProcessor/Process")
            h.write(sid, grpc_message(headers_msg()))
            data = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * size
            for i in range(0, size, chunk):
                if not h.write(sid, grpc_message(body_msg(data[i:i + chunk])), timeout=a.seconds):
                    break
                sent[k] += min(chunk, size - i)
            deadline = time.monotonic() + a.seconds
            while not stopping.is_set() and time.monotonic() < deadline and not h.streams[sid].done:
                time.sleep(0.2)
            ended[k] = h.streams[sid].done
        except (OSError, ConnectionError, TimeoutError):
            ended[k] = True

    held = Gauge(a.admin, "kvgate_buffered_request_bytes")
    threads = [threading.Thread(target=one, args=(k,)) for k in range(a.count)]
    together(threads)
    h.close()
    return (f"{a.count} streams, {sum(sent) >> 20} MiB of body sent in all; "
            f"{sum(ended)} streams ended by kvgate before the end; "
            f"kvgate_buffered_request_bytes at most {held.stop()}")


def picker(a):
    """From one client: unreported Picks of model `m` (the admission-limited pool) and of
    `m2` (a pool without limits, to fill the pending decisions), and WatchEndpoints streams
    whose reader never reads."""
    counts = {}
    lock = threading.Lock()
    deadline = time.monotonic() + a.seconds

    def pick_body(model, i):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"attack {i}"}]})
        return pb_bytes(1, "/v1/chat/completions") + pb_bytes(3, body)

    def outcome(resp):
        if resp is None:
            return "grpc error"
        if resp[:1] == b"\x0a":
            return "decision"
        if resp[:1] == b"\x12":
            _, i = read_varint(resp, 1)
            status = read_varint(resp, i + 1)[0] if resp[i:i + 1] == b"\x08" else 0
            return f"refusal {status}"
        return "other"

    def picks(model, total, rate):
        h = H2(a.grpc, attack_socket(), stopping=stopping)
        done = []

        def one(i):
            try:
                r = outcome(h.call("/kvgate.v1.Picker/Pick", pick_body(model, i), timeout=5))
            except (OSError, ConnectionError, TimeoutError):
                r = "grpc error"
            with lock:
                key = f"{model} {r}"
                counts[key] = counts.get(key, 0) + 1

        start = time.monotonic()
        for i in range(total):
            if stopping.is_set() or time.monotonic() > deadline or h.closed:
                break
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            while sum(t.is_alive() for t in done[-200:]) >= 100:
                time.sleep(0.005)
            done.append(threading.Thread(target=one, args=(i,)))
            done[-1].start()
        for t in done:
            t.join()
        h.close()

    watches = []

    def watch(n):
        try:
            h = H2(a.grpc, attack_socket(), recv_window=1024, stopping=stopping)
            watches.append(h)
            msg = grpc_message(pb_varint(2, 100))
            for _ in range(n):
                sid = h.open("/kvgate.v1.Picker/WatchEndpoints", timeout=2)
                h.write(sid, msg, end=True)
        except (OSError, ConnectionError, TimeoutError):
            pass

    pending = Gauge(a.admin, "kvgate_picker_decisions_pending")
    threads = [threading.Thread(target=picks, args=("m", int(a.seconds * 50), 50)),
               threading.Thread(target=picks, args=("m2", 20_000, 1000))]
    threads += [threading.Thread(target=watch, args=(100,)) for _ in range(10)]
    together(threads)
    open_watches = sum(sum(not s.done for s in h.streams.values()) for h in watches)
    while not stopping.is_set() and time.monotonic() < deadline:
        time.sleep(0.2)
    for h in watches:
        h.close()
    return (f"picks: {dict(sorted(counts.items()))}; kvgate_picker_decisions_pending at most "
            f"{pending.stop()}; {open_watches}/1000 WatchEndpoints streams open")


def sigstop(a):
    os.kill(a.sim_pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + a.seconds
        while not stopping.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.kill(a.sim_pid, signal.SIGCONT)
    return f"simulator {a.sim_pid} stopped for {a.seconds:.0f} s, then continued"


def endpoints_file(a):
    """The endpoints file becomes a symlink to /dev/zero for half the time, then a FIFO no
    one writes; then the real file is put back."""
    path, saved = a.file, a.file + ".saved"
    os.rename(path, saved)
    try:
        os.symlink("/dev/zero", path + ".new")
        os.rename(path + ".new", path)
        half = time.monotonic() + a.seconds / 2
        while not stopping.is_set() and time.monotonic() < half:
            time.sleep(0.1)
        os.mkfifo(path + ".new")
        os.rename(path + ".new", path)
        end = time.monotonic() + a.seconds / 2
        while not stopping.is_set() and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        os.rename(saved, path)
    return "symlink to /dev/zero, then a FIFO, then the file restored"


def attack(a):
    signal.signal(signal.SIGTERM, on_term)
    kinds = {
        "tcp": lambda: hold(a.port, a.count, a.seconds),
        "h2-preface": lambda: h2_preface(a),
        "half-http1": lambda: hold(a.port, a.count, a.seconds, b"GET /healthz HTTP/1.1\r\nHost: kvgate\r\n",
                                   b"X-a: b\r\n", 2.0),
        "h2-flood": lambda: h2_flood(a),
        "trickle": lambda: trickle(a),
        "extproc": lambda: extproc_partial(a),
        "picker": lambda: picker(a),
        "sigstop": lambda: sigstop(a),
        "file": lambda: endpoints_file(a),
    }
    try:
        note = kinds[a.kind]()
    except (OSError, ConnectionError, TimeoutError) as e:
        note = f"attack failed: {e}"
    print(note, flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    l = sub.add_parser("load")
    a = sub.add_parser("attack")
    a.add_argument("kind")
    for q in (l, a):
        q.add_argument("--proxy", type=int)
        q.add_argument("--admin", type=int)
        q.add_argument("--grpc", type=int)
        q.add_argument("--seconds", type=float, default=15)
    l.add_argument("--pid", type=int, required=True)
    l.add_argument("--rate", type=float, default=20)
    a.add_argument("--port", type=int)
    a.add_argument("--count", type=int, default=0)
    a.add_argument("--sim-pid", type=int)
    a.add_argument("--file")
    args = p.parse_args()
    load(args) if args.cmd == "load" else attack(args)


if __name__ == "__main__":
    main()
