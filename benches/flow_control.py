#!/usr/bin/env python3
"""The load driver of benches/flow-control.sh (standard library only: asyncio, raw HTTP/1.1).

Every request is a /v1/completions of a unique ~1000-token prompt (so no prefix-cache hit) and
`max_tokens` 32, streamed; TTFT runs from the request's scheduled start (open loop) or its send
(closed loop) to the first SSE `data:` chunk. What is still open when a run ends is abandoned
(its connection closed: kvgate drops it from its queue, the simulator aborts it) and counted as
unserved. Each subcommand writes its results as JSON; `report` prints the tables and verdicts.

  flow_control.py capacity --proxy H:P --secs S --workers N OUT.json
  flow_control.py flood --proxy H:P --admin H:P --sims H:P,H:P --capacity RPS
                        --unloaded S --flood S [--shed-rate RPS] --label L OUT.json
  flow_control.py fairness --proxy H:P --admin H:P --secs S --workers-a N --workers-b N
                        --label L OUT.json
  flow_control.py shed --proxy H:P --rate RPS --secs S OUT.json   (the sheddable probe)
  flow_control.py report DIR
"""
import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import sys
import time

PROMPT_TOKENS = 1000
MAX_TOKENS = 32
HIGH_RATE = 2.0
GRACE_S = 3.0
# The flood's first seconds, while a gate may still be learning the engines' bounds.
SETTLE_S = 5.0
QUEUE_HIST = "inference_extension_flow_control_request_queue_duration_seconds"
LETTERS = bytes(ord("a") + i % 26 for i in range(256))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def prompt(rng):
    # The simulator's tokenizer makes one token of a space and up to 4 letters.
    b = rng.randbytes(4 * PROMPT_TOKENS).translate(LETTERS).decode()
    return "".join(" " + b[i:i + 4] for i in range(0, len(b), 4))


def body(rng, stream=True):
    return json.dumps({"model": "m", "prompt": prompt(rng), "max_tokens": MAX_TOKENS, "stream": stream}).encode()


def head(hostport, n, headers, close=True):
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    conn = "connection: close\r\n" if close else ""
    return (f"POST /v1/completions HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\n"
            f"content-length: {n}\r\n{conn}{extra}\r\n").encode()


class Result:
    """One request: when it was due, its status, dropped reason, TTFT and end (perf_counter)."""
    __slots__ = ("cls", "due", "status", "reason", "first", "end")

    def __init__(self, cls, due):
        self.cls, self.due = cls, due
        self.status, self.reason, self.first, self.end = None, None, None, None

    def ttft(self):
        return None if self.first is None else self.first - self.due


async def request(hostport, headers, payload, res):
    """Sends one request on its own connection and reads the answer, filling `res`."""
    host, port = hostport.rsplit(":", 1)
    w = None
    try:
        r, w = await asyncio.open_connection(host, int(port))
        w.write(head(hostport, len(payload), headers) + payload)
        await w.drain()
        status = await r.readline()
        res.status = int(status.split()[1])
        length, chunked = None, False
        while True:
            line = await r.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            k, v = k.strip().lower(), v.strip()
            if k == "content-length":
                length = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif k == "x-llm-d-request-dropped-reason":
                res.reason = v
        ok = 200 <= res.status < 300
        if chunked:
            while True:
                size = int((await r.readline()).split(b";")[0].strip(), 16)
                data = await r.readexactly(size + 2)
                if size == 0:
                    break
                if ok and res.first is None and b"data:" in data:
                    res.first = time.perf_counter()
        elif length is not None:
            data = await r.readexactly(length)
            if ok and res.first is None:
                res.first = time.perf_counter()
        else:
            await r.read()
        res.end = time.perf_counter()
    except asyncio.CancelledError:
        raise
    except Exception:
        if res.status is None:
            res.status = -1
    finally:
        if w is not None:
            w.close()


class Load:
    """Requests in flight, each a task, abandoned together at the end."""

    def __init__(self, proxy):
        # Seeded afresh each run: a prompt sent before would be in the simulators' prefix cache.
        self.proxy, self.rng, self.tasks, self.results = proxy, random.Random(), set(), []

    def send(self, cls, headers, due):
        res = Result(cls, due)
        self.results.append(res)
        t = asyncio.ensure_future(request(self.proxy, headers, body(self.rng), res))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t, res

    async def open_loop(self, cls, headers, rate, start, stop, lag):
        i = 0
        while True:
            due = start + i / rate
            if due >= stop:
                return
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag[0] = max(lag[0], time.perf_counter() - due)
            self.send(cls, headers, due)
            i += 1

    async def closed_loop(self, cls, headers, stop):
        while time.perf_counter() < stop:
            t, res = self.send(cls, headers, time.perf_counter())
            try:
                await asyncio.wait_for(asyncio.shield(t), max(0.01, stop - time.perf_counter()))
            except asyncio.TimeoutError:
                return
            if res.status is None or not 200 <= res.status < 300:
                await asyncio.sleep(0.05)

    async def abandon(self, grace):
        """Waits `grace` seconds for what is in flight, then closes the rest."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)


async def aget(hostport, path):
    """A GET on its own connection, for samplers inside the event loop."""
    host, port = hostport.rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port))
    try:
        w.write(f"GET {path} HTTP/1.1\r\nhost: {hostport}\r\nconnection: close\r\n\r\n".encode())
        await w.drain()
        data = await r.read()
    finally:
        w.close()
    text = data.decode("utf-8", "replace")
    _, _, rest = text.partition("\r\n\r\n")
    if "transfer-encoding: chunked" in text[: len(text) - len(rest)].lower():
        out, b = [], rest.encode()
        while b:
            line, _, b = b.partition(b"\r\n")
            n = int(line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out.append(b[:n])
            b = b[n + 2:]
        rest = b"".join(out).decode("utf-8", "replace")
    return rest


def gauge(text, name, labels=None):
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        if labels and not all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            continue
        total += float(m.group(3))
    return total


def histogram(text, name):
    """{(priority, outcome): {"buckets": {le: count}, "sum": s, "count": n}}."""
    h = {}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\S+?)\{([^}]*)\}\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = (labels.get("priority"), labels.get("outcome"))
        e = h.setdefault(key, {"buckets": {}, "sum": 0.0, "count": 0.0})
        v = float(m.group(3))
        if m.group(1).endswith("_bucket"):
            e["buckets"][labels["le"]] = v
        elif m.group(1).endswith("_sum"):
            e["sum"] = v
        elif m.group(1).endswith("_count"):
            e["count"] = v
    return h


def hist_diff(before, after):
    """The queue-wait histogram's growth, per priority (every outcome together)."""
    out = {}
    for (prio, outcome), a in after.items():
        b = before.get((prio, outcome), {"buckets": {}, "sum": 0.0, "count": 0.0})
        e = out.setdefault(prio, {"buckets": {}, "sum": 0.0, "count": 0.0, "outcomes": {}})
        for le, v in a["buckets"].items():
            e["buckets"][le] = e["buckets"].get(le, 0.0) + v - b["buckets"].get(le, 0.0)
        e["sum"] += a["sum"] - b["sum"]
        e["count"] += a["count"] - b["count"]
        e["outcomes"][outcome] = a["count"] - b["count"]
    return out


def hist_quantile(e, q):
    """Quantile from cumulative buckets, linear within a bucket (as Prometheus does)."""
    if not e or e["count"] <= 0:
        return None
    bounds = sorted(((math.inf if le == "+Inf" else float(le)), v) for le, v in e["buckets"].items())
    rank, lo, prev = q * e["count"], 0.0, 0.0
    for le, v in bounds:
        if v >= rank:
            if math.isinf(le):
                return lo
            return lo + (le - lo) * ((rank - prev) / (v - prev) if v > prev else 1.0)
        lo, prev = le, v
    return lo


def pct(xs, q):
    """The q-quantile (nearest rank) of xs, where None counts as never (infinite)."""
    if not xs:
        return None
    s = sorted(math.inf if x is None else x for x in xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(results, since, until):
    """One class's figures over the requests due in [since, until)."""
    rs = [r for r in results if since <= r.due < until]
    ok = [r for r in rs if r.status is not None and 200 <= r.status < 300 and r.end is not None]
    refused, served = {}, []
    for r in rs:
        if r.status is not None and not 200 <= r.status < 300:
            k = "error" if r.status < 0 else f"{r.status}" + (f" {r.reason}" if r.reason else "")
            refused[k] = refused.get(k, 0) + 1
        else:
            served.append(r)
    ttft = [r.ttft() for r in served]
    done_in = len([r for r in rs if r.end is not None and r.status is not None and 200 <= r.status < 300
                   and r.end <= until])
    return {
        "sent": len(rs),
        "ok": len(ok),
        "refused": refused,
        "unserved": len([r for r in served if r.end is None]),
        "ttft": {q: pct(ttft, float(q)) for q in ("0.5", "0.9", "0.99")} if ttft else {},
        "goodput": done_in / max(1e-9, until - since),
    }


def jsonable(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [jsonable(v) for v in x]
    return x


def save(path, data):
    with open(path, "w") as f:
        json.dump(jsonable(data), f, indent=1)


# ---- subcommands ----------------------------------------------------------------------------

async def capacity(a):
    load = Load(a.proxy)
    t0 = time.perf_counter()
    warm, stop = t0 + 2.0, t0 + 2.0 + a.secs
    await asyncio.gather(*(load.closed_loop("cap", {}, stop) for _ in range(a.workers)))
    done = [r for r in load.results if r.end is not None and r.status == 200 and warm <= r.end < stop]
    await load.abandon(0)
    rps = len(done) / a.secs
    log(f"capacity: {rps:.1f} completions/s ({a.workers} closed-loop workers, {a.secs:.0f} s)")
    save(a.out, {"rps": rps, "workers": a.workers, "secs": a.secs})


async def sample_sims(sims, stop, every, out):
    """Each simulator's waiting and running requests every `every` seconds until `stop`."""
    while time.perf_counter() < stop:
        t = time.perf_counter()
        try:
            texts = await asyncio.gather(*(aget(s, "/metrics") for s in sims))
            out.append([(gauge(x, "vllm:num_requests_waiting"), gauge(x, "vllm:num_requests_running")) for x in texts])
        except Exception:
            pass
        await asyncio.sleep(max(0.0, every - (time.perf_counter() - t)))


async def drain(sims, bound=20.0):
    """Waits (`bound` s at most) until no simulator runs or queues anything."""
    stop = time.perf_counter() + bound
    while time.perf_counter() < stop:
        try:
            texts = await asyncio.gather(*(aget(s, "/metrics") for s in sims))
            if all(gauge(x, "vllm:num_requests_waiting") + gauge(x, "vllm:num_requests_running") == 0 for x in texts):
                return True
        except Exception:
            pass
        await asyncio.sleep(0.2)
    return False


async def flood(a):
    sims = a.sims.split(",")
    load = Load(a.proxy)
    high = {"x-llm-d-inference-objective": "critical"}
    low = {"x-llm-d-inference-objective": "bulk"}
    lag = [0.0]
    t0 = time.perf_counter() + 0.2
    t1 = t0 + a.unloaded
    t2 = t1 + a.flood
    log(f"[{a.label}] critical alone at {HIGH_RATE:g}/s for {a.unloaded:.0f} s, then with bulk at "
        f"{2 * a.capacity:.1f}/s for {a.flood:.0f} s")
    hi = asyncio.ensure_future(load.open_loop("critical", high, HIGH_RATE, t0, t2, lag))
    await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
    before = histogram(await aget(a.admin, "/metrics"), QUEUE_HIST)
    samples = []
    sampler = asyncio.ensure_future(sample_sims(sims, t2, 0.1, samples))
    lo = asyncio.ensure_future(load.open_loop("bulk", low, 2 * a.capacity, t1, t2, lag))
    shed = None
    if a.shed_rate > 0:
        # Sheddable requests from their own process (blocking sockets, no event loop to wait
        # on), from 5 s into the flood so that the pool is saturated.
        shed_out = a.out + ".shed"
        shed = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "shed", "--proxy", a.proxy, "--rate", str(a.shed_rate),
            "--delay", "5", "--secs", str(max(1.0, a.flood - 8)), shed_out)
        await asyncio.sleep(0)
    try:
        await asyncio.gather(hi, lo, sampler)
        after_flood = time.perf_counter()
        await load.abandon(GRACE_S)
        after = histogram(await aget(a.admin, "/metrics"), QUEUE_HIST)
        if shed is not None:
            try:
                await asyncio.wait_for(shed.wait(), 15)
            except asyncio.TimeoutError:
                pass
    finally:
        if shed is not None and shed.returncode is None:
            shed.kill()
            await shed.wait()
    drained = await drain(sims)
    log(f"[{a.label}] done; sender lag max {lag[0] * 1000:.0f} ms; simulators drained: {drained}")
    res = {
        "label": a.label,
        "capacity": a.capacity,
        "unloaded_s": a.unloaded,
        "flood_s": a.flood,
        "sender_lag_ms": lag[0] * 1000,
        "critical_unloaded": summarize([r for r in load.results if r.cls == "critical"], t0, t1),
        "critical_flood": summarize([r for r in load.results if r.cls == "critical"], t1, t2),
        "critical_settled": summarize([r for r in load.results if r.cls == "critical"], t1 + SETTLE_S, t2),
        "bulk_flood": summarize([r for r in load.results if r.cls == "bulk"], t1, t2),
        "queue": hist_diff(before, after),
        # Each critical request of the flood: (seconds into the flood, TTFT s or null).
        "critical_flood_detail": [(round(r.due - t1, 3), r.ttft()) for r in load.results
                                  if r.cls == "critical" and t1 <= r.due < t2],
        "sim_waiting": [sum(w for w, _ in s) for s in samples],
        "sim_waiting_max_one": [max(w for w, _ in s) for s in samples],
        "grace_s": GRACE_S,
        "abandon_s": time.perf_counter() - after_flood,
    }
    if shed is not None and os.path.exists(a.out + ".shed"):
        with open(a.out + ".shed") as f:
            res["shed"] = json.load(f)
    save(a.out, res)


def shed(a):
    """Sheddable requests (objective `scavenger`, priority -1) from blocking sockets, three per
    tick: one on a kept-alive connection (`server`: from its first byte written to the whole
    answer read), the same request for a model no pool serves on that connection (`baseline`:
    parsed and refused before any routing, the floor of what this machine measures), and one
    on a new connection (`client`: from before the connect)."""
    host, port = a.proxy.rsplit(":", 1)
    rng = random.Random()
    out = {"server_ms": [], "baseline_ms": [], "client_ms": [], "statuses": {}}
    kept = [None]

    def connect():
        s = socket.create_connection((host, int(port)), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def exchange(s, req):
        """Sends `req` and reads one answer: (status key, seconds, whether the server closes)."""
        t = time.perf_counter()
        s.sendall(req)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            hdr, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"content-length:\s*(\d+)", hdr, re.I)
                if m and len(rest) >= int(m.group(1)):
                    break
        elapsed = time.perf_counter() - t
        status = data.split(b" ", 2)[1].decode() if data else "none"
        reason = re.search(rb"x-llm-d-request-dropped-reason:\s*(\S+)", data, re.I)
        closes = not data or re.search(rb"connection:\s*close", data, re.I) is not None
        return status + (f" {reason.group(1).decode()}" if reason else ""), elapsed, closes

    def on_kept(req):
        try:
            if kept[0] is None:
                kept[0] = connect()
            key, elapsed, closes = exchange(kept[0], req)
        except OSError as e:
            key, elapsed, closes = f"error {type(e).__name__}", 0.0, True
        if closes and kept[0] is not None:
            kept[0].close()
            kept[0] = None
        return key, elapsed

    time.sleep(a.delay)
    start = time.perf_counter()
    for i in range(int(a.rate * a.secs)):
        delay = start + i / a.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        payload = body(rng, stream=False)
        shed_h = {"x-llm-d-inference-objective": "scavenger"}
        other = payload.replace(b'"model": "m"', b'"model": "no-such-model"')
        # In a random order, so that neither is always the first after the pause.
        for which in rng.sample(("shed", "baseline"), 2):
            if which == "shed":
                key, elapsed = on_kept(head(a.proxy, len(payload), shed_h, close=False) + payload)
                out["statuses"][key] = out["statuses"].get(key, 0) + 1
                if key.startswith("429"):
                    out["server_ms"].append(elapsed * 1000)
            else:
                key, elapsed = on_kept(head(a.proxy, len(other), {}, close=False) + other)
                if not key.startswith("error"):
                    out["baseline_ms"].append(elapsed * 1000)
        t0 = time.perf_counter()
        try:
            s = connect()
            key, _, _ = exchange(s, head(a.proxy, len(payload), {"x-llm-d-inference-objective": "scavenger"}) + payload)
            s.close()
        except OSError as e:
            key = f"error {type(e).__name__}"
        out["statuses"][key] = out["statuses"].get(key, 0) + 1
        if key.startswith("429"):
            out["client_ms"].append((time.perf_counter() - t0) * 1000)
    save(a.out, out)


async def fairness(a):
    load = Load(a.proxy)
    t0 = time.perf_counter()
    warm, stop = t0 + 5.0, t0 + a.secs
    log(f"[{a.label}] tenants a ({a.workers_a} workers) and b ({a.workers_b} workers) for {a.secs:.0f} s")
    both, samples = [0], [0]

    async def backlog():
        # Whether both flows have requests waiting in kvgate's queue, every 200 ms.
        while time.perf_counter() < stop:
            await asyncio.sleep(0.2)
            if time.perf_counter() < warm:
                continue
            try:
                text = await aget(a.admin, "/metrics")
            except Exception:
                continue
            qa = gauge(text, "inference_extension_flow_control_queue_size", {"fairness_id": "a"})
            qb = gauge(text, "inference_extension_flow_control_queue_size", {"fairness_id": "b"})
            samples[0] += 1
            both[0] += qa > 0 and qb > 0

    ha = {"x-llm-d-inference-fairness-id": "a"}
    hb = {"x-llm-d-inference-fairness-id": "b"}
    await asyncio.gather(backlog(), *(load.closed_loop("a", ha, stop) for _ in range(a.workers_a)),
                         *(load.closed_loop("b", hb, stop) for _ in range(a.workers_b)))
    done = {c: len([r for r in load.results if r.cls == c and r.status == 200 and r.end is not None
                    and warm <= r.end < stop]) for c in ("a", "b")}
    refused = len([r for r in load.results if r.status is not None and r.status != 200 and r.status >= 0])
    await load.abandon(0)
    save(a.out, {"label": a.label, "secs": a.secs - 5.0, "done": done, "refused": refused,
                 "both_backlogged": both[0] / samples[0] if samples[0] else None,
                 "workers": {"a": a.workers_a, "b": a.workers_b}})


# ---- report -----------------------------------------------------------------------------------

def ms(x):
    if x is None:
        return "—"
    if x == "inf" or (isinstance(x, float) and math.isinf(x)):
        return "unserved"
    return f"{x * 1000:.0f}"


def load_json(d, name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def num(x):
    return math.inf if x == "inf" else x


def report(a):
    d = a.dir
    cap = load_json(d, "capacity.json")
    runs = [(lbl, load_json(d, f"flood-{key}.json")) for key, lbl in
            (("on", "flow control on"), ("off", "flow control off"), ("scrape", "on, gate: scrape"))]
    runs = [(lbl, r) for lbl, r in runs if r]
    verdicts = []
    if cap:
        print(f"Pool capacity: **{cap['rps']:.1f} completions/s** (2 simulators, --max-num-seqs 4; "
              f"{PROMPT_TOKENS}-token prompts, max_tokens {MAX_TOKENS}; {cap['workers']} closed-loop workers "
              f"for {cap['secs']:.0f} s)\n")

    print("### 1. Priority under a flood\n")
    if runs:
        r0 = runs[0][1]
        print(f"`critical` (priority 10) at {HIGH_RATE:g} req/s open loop, alone for {r0['unloaded_s']:.0f} s, "
              f"then with `bulk` (priority 0) at {2 * r0['capacity']:.1f} req/s (2x capacity) for "
              f"{r0['flood_s']:.0f} s. TTFT from the scheduled send to the first SSE `data:` chunk; "
              f"requests still open {GRACE_S:g} s after the flood are abandoned (unserved, TTFT infinite). "
              f"Queue wait from kvgate's `{QUEUE_HIST}`, which counts every request of the pool (0 for one let through at once; "
              f"`waited`: those that queued), mean; p50/p99 from its buckets. Goodput: 2xx completed within the window, per second.\n")
    print("| run | class | sent | 2xx | refused | unserved | TTFT p50 ms | p90 ms | p99 ms | queue wait mean / p50 / p99 ms | goodput /s |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|")
    for lbl, r in runs:
        for cls, key, prio in (("critical, unloaded", "critical_unloaded", None),
                               ("critical, flood", "critical_flood", "10"),
                               (f"critical, flood from {SETTLE_S:g} s", "critical_settled", None),
                               ("bulk, flood", "bulk_flood", "0")):
            s = r[key]
            t = s["ttft"]
            q = r["queue"].get(prio) if prio else None
            if q and q["count"] > 0:
                waited = q["count"] - q["buckets"].get("0", 0.0)
                qs = (f"{q['count']:.0f} ({waited:.0f} waited): {q['sum'] / q['count'] * 1000:.0f} / {ms(hist_quantile(q, 0.5))} / "
                      f"{ms(hist_quantile(q, 0.99))}")
            elif key == "critical_settled":
                qs = "(in the row above)"
            elif prio and lbl != "flow control off":
                qs = "none queued"
            else:
                qs = "—"
            ref = ", ".join(f"{v}× {k}" for k, v in s["refused"].items()) or "0"
            print(f"| {lbl} | {cls} | {s['sent']} | {s['ok']} | {ref} | {s['unserved']} | {ms(num(t.get('0.5')))} | "
                  f"{ms(num(t.get('0.9')))} | {ms(num(t.get('0.99')))} | {qs} | {s['goodput']:.2f} |")
    print()
    for lbl, r in runs:
        if lbl not in ("flow control on", "flow control off"):
            continue
        base = num(r["critical_unloaded"]["ttft"].get("0.99"))
        loaded = num(r["critical_flood"]["ttft"].get("0.99"))
        refused = sum(r["critical_flood"]["refused"].values()) + r["critical_flood"]["unserved"]
        if base is None or loaded is None:
            continue
        ratio = loaded / base if base else math.inf
        met = ratio <= 1.5 and refused == 0
        sent = r["critical_flood"]["sent"]
        fig = (f"TTFT p99 {ms(loaded)} ms vs {ms(base)} ms unloaded = {ratio:.2f}x" if not math.isinf(ratio)
               else f"TTFT p99 unserved vs {ms(base)} ms unloaded")
        settled = num(r["critical_settled"]["ttft"].get("0.99"))
        if lbl == "flow control on":
            verdicts.append(f"critical TTFT p99 within 1.5x unloaded and none refused, flow control on: "
                            f"{'met' if met else 'NOT met'} ({fig}; {refused} of {sent} refused or unserved; "
                            f"from {SETTLE_S:g} s into the flood: p99 {ms(settled)} ms = {settled / base:.2f}x)")
        else:
            verdicts.append(f"without flow control the critical stream degrades: "
                            f"{'yes' if not met else 'no'} ({fig}; {refused} of {sent} refused or unserved)")

    print("\n### 2. Fairness\n")
    fair = [(lbl, load_json(d, f"fairness-{key}.json")) for key, lbl in
            (("on", "flow control on"), ("off", "flow control off"))]
    fair = [(lbl, f) for lbl, f in fair if f]
    if fair:
        f0 = fair[0][1]
        print(f"Tenants `a` and `b` at the same priority, closed loop: a with {f0['workers']['a']} workers, "
              f"b with {f0['workers']['b']} (10x the requests outstanding), for {f0['secs']:.0f} s after a 5 s "
              f"warm-up. Completions in that window; `both backlogged` is the share of 200 ms samples of "
              f"kvgate's queue-size gauge in which both tenants had requests waiting.\n")
    print("| run | a done | b done | a share | b share | both backlogged | refused |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for lbl, f in fair:
        da, db = f["done"]["a"], f["done"]["b"]
        tot = max(1, da + db)
        bb = "—" if f["both_backlogged"] is None or lbl.endswith("off") else f"{100 * f['both_backlogged']:.0f}%"
        print(f"| {lbl} | {da} | {db} | {100 * da / tot:.1f}% | {100 * db / tot:.1f}% | {bb} | {f['refused']} |")
        if lbl == "flow control on":
            lo = min(da, db) / tot
            verdicts.append(f"each tenant >= 40% of completions while backlogged: {'met' if lo >= 0.4 else 'NOT met'} "
                            f"(a {100 * da / tot:.1f}%, b {100 * db / tot:.1f}%)")

    print("\n### 3. Sheddable requests under saturation\n")
    on = dict(runs).get("flow control on")
    sh = on.get("shed") if on else None
    if sh:
        print("Objective `scavenger` (priority -1), 5 req/s from 5 s into the flow-control-on flood, from a "
              "blocking client. `server`: on a kept-alive connection, from the request's first byte written to "
              "the whole 429 read; `baseline`: the same request naming a model no pool serves, on the same "
              "connection (parsed and refused before routing: what this machine's loopback and scheduling "
              "add); `client`: on a new connection, from before the connect.\n")
        print("| statuses | 429 server p50 ms | p99 ms | max ms | baseline p50 ms | p99 ms | 429 client p50 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        st = ", ".join(f"{v}× {k}" for k, v in sh["statuses"].items())
        sv, bl, cl = sh["server_ms"], sh.get("baseline_ms", []), sh["client_ms"]
        f3 = lambda x: "—" if x is None else f"{x:.3f}"
        print(f"| {st} | {f3(pct(sv, 0.5))} | {f3(pct(sv, 0.99))} | {f3(max(sv) if sv else None)} | "
              f"{f3(pct(bl, 0.5))} | {f3(pct(bl, 0.99))} | {f3(pct(cl, 0.5))} | {f3(pct(cl, 0.99))} |")
        p99 = pct(sv, 0.99)
        total = sum(sh["statuses"].values())
        n429 = len(sv)
        verdicts.append(f"sheddable 429 within 1 ms at the server: {'met' if p99 is not None and p99 <= 1.0 else 'NOT met'} "
                        f"(p50 {f3(pct(sv, 0.5))} ms, p99 {f3(p99)} ms over {n429} 429s on a kept-alive "
                        f"connection, {total} sent; baseline p99 {f3(pct(bl, 0.99))} ms)")

    print("\n### 4. Overshoot: requests waiting in the engines\n")
    print("Both simulators' `vllm:num_requests_waiting`, summed, every 100 ms during the flood of each run "
          "(same load as phase 1), over the whole flood and split at the first 5 s. The scrape gate scrapes "
          "every 50 ms.\n")
    print(f"| run | engine waiting mean | p99 | max | max on one engine | mean / max in the first {SETTLE_S:g} s | "
          f"mean / max after | critical TTFT p99 ms | bulk TTFT p99 ms | bulk goodput /s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    over = {}
    for lbl, r in runs:
        w = r["sim_waiting"]
        if not w:
            continue
        over[lbl] = statistics.mean(w)
        k = int(SETTLE_S * 10)
        early, late = w[:k] or [0], w[k:] or [0]
        print(f"| {lbl} | {statistics.mean(w):.2f} | {pct(w, 0.99):.0f} | {max(w):.0f} | {max(r['sim_waiting_max_one']):.0f} | "
              f"{statistics.mean(early):.2f} / {max(early):.0f} | {statistics.mean(late):.2f} / {max(late):.0f} | "
              f"{ms(num(r['critical_flood']['ttft'].get('0.99')))} | {ms(num(r['bulk_flood']['ttft'].get('0.99')))} | "
              f"{r['bulk_flood']['goodput']:.2f} |")
    if "flow control on" in over and "on, gate: scrape" in over:
        acc, scr = over["flow control on"], over["on, gate: scrape"]
        verdicts.append(f"accounting gate overshoots less than the scrape gate: {'met' if acc < scr else 'NOT met'} "
                        f"(engine waiting mean {acc:.2f} vs {scr:.2f}; off: {over.get('flow control off', math.nan):.1f})")

    lags = [r["sender_lag_ms"] for _, r in runs]
    if lags:
        print(f"\nLoad generator: largest send lag behind schedule {max(lags):.0f} ms.")
    print("\n### Verdicts\n")
    for v in verdicts:
        print(f"- {v}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capacity")
    c.add_argument("--proxy", required=True)
    c.add_argument("--secs", type=float, default=10)
    c.add_argument("--workers", type=int, default=16)
    c.add_argument("out")
    f = sub.add_parser("flood")
    for k in ("--proxy", "--admin", "--sims", "--label"):
        f.add_argument(k, required=True)
    f.add_argument("--capacity", type=float, required=True)
    f.add_argument("--unloaded", type=float, default=30)
    f.add_argument("--flood", type=float, default=40)
    f.add_argument("--shed-rate", type=float, default=0)
    f.add_argument("out")
    g = sub.add_parser("fairness")
    for k in ("--proxy", "--admin", "--label"):
        g.add_argument(k, required=True)
    g.add_argument("--secs", type=float, default=30)
    g.add_argument("--workers-a", type=int, default=100)
    g.add_argument("--workers-b", type=int, default=10)
    g.add_argument("out")
    s = sub.add_parser("shed")
    s.add_argument("--proxy", required=True)
    s.add_argument("--rate", type=float, default=5)
    s.add_argument("--secs", type=float, default=20)
    s.add_argument("--delay", type=float, default=0)
    s.add_argument("out")
    r = sub.add_parser("report")
    r.add_argument("dir")
    a = p.parse_args()
    # A `timeout` ending the run still runs the clean-ups (the sheddable probe's process).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.cmd == "capacity":
        asyncio.run(capacity(a))
    elif a.cmd == "flood":
        asyncio.run(flood(a))
    elif a.cmd == "fairness":
        asyncio.run(fairness(a))
    elif a.cmd == "shed":
        shed(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
