#!/usr/bin/env python3
"""The load driver of benches/replicas.sh (standard library only: asyncio, raw HTTP/1.1).

Sends a workload to several kvgate replicas' proxies, one request to each in turn (as a
Service or a gateway spreads requests over a replicated tier), passing over a replica that
refuses the connection (killed, or not yet listening) to the next. Every request is a
non-streamed /v1/completions with `max_tokens` 32. Workloads, closed loop:
  shared-prefix  WORKERS workers, each request one of GROUPS 2,000-token system prompts and a
                 unique 100-token question;
  multi-turn     SESSIONS conversations, each turn its history (a 2,000-token system prompt, then
                 every question and a 32-token answer) and a new 100-token question, 0.2 s apart;
                 a conversation starts again, new, after 12 turns.
The simulators' prefix-cache counters are read every second (the hit rate of any stretch of
the run); each replica's decision-time histogram at the end.

  replicas.py run --proxies H:P,... --admins H:P,... --sims H:P,... --workload W --secs S OUT.json
  replicas.py report DIR
"""
import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time

SYSTEM_TOKENS = 2000
QUESTION_TOKENS = 100
ANSWER_TOKENS = 32
TURNS = 12
LETTERS = bytes(ord("a") + i % 26 for i in range(256))
DECISION = "inference_extension_scheduler_e2e_duration_seconds"
LAG = "kvgate_cluster_sync_lag_seconds"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def words(rng, n):
    # The simulator's tokenizer makes one token of a space and up to 4 letters.
    b = rng.randbytes(4 * n).translate(LETTERS).decode()
    return "".join(" " + b[i:i + 4] for i in range(0, len(b), 4))


async def http(hostport, method, path, body=b"", timeout=60.0):
    """One request on its own connection: (status, body); raises OSError if it cannot connect."""
    host, port = hostport.rsplit(":", 1)
    r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
    try:
        w.write((f"{method} {path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body)
        await w.drain()
        data = await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, rest


class Tier:
    """The replicas' proxies, one request each in turn; a replica that refuses a connection is
    passed over (and looked at again a second later)."""

    def __init__(self, proxies):
        self.proxies = proxies
        self.next = 0
        self.down_until = [0.0] * len(proxies)
        self.sent = [0] * len(proxies)
        self.ok = 0
        self.failed = 0

    async def complete(self, prompt):
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": ANSWER_TOKENS}).encode()
        for _ in range(2 * len(self.proxies)):
            k = self.next % len(self.proxies)
            self.next += 1
            if time.monotonic() < self.down_until[k]:
                continue
            try:
                status, _ = await http(self.proxies[k], "POST", "/v1/completions", body)
            except (OSError, asyncio.TimeoutError):
                self.down_until[k] = time.monotonic() + 1.0
                continue
            self.sent[k] += 1
            if status == 200:
                self.ok += 1
                return True
            break
        self.failed += 1
        return False


async def shared_prefix(tier, stop, seed, groups=12, workers=16):
    rng = random.Random(seed)
    systems = [words(rng, SYSTEM_TOKENS) for _ in range(groups)]

    async def worker(i):
        r = random.Random(seed * 1000 + i)
        while time.monotonic() < stop:
            await tier.complete(systems[r.randrange(groups)] + words(r, QUESTION_TOKENS))

    await asyncio.gather(*(worker(i) for i in range(workers)))


async def multi_turn(tier, stop, seed, sessions=16):
    async def session(i):
        r = random.Random(seed * 1000 + i)
        await asyncio.sleep(i * 0.1)
        while time.monotonic() < stop:
            history = words(r, SYSTEM_TOKENS)
            for _ in range(TURNS):
                if time.monotonic() >= stop:
                    return
                prompt = history + words(r, QUESTION_TOKENS)
                await tier.complete(prompt)
                history = prompt + words(r, ANSWER_TOKENS)
                await asyncio.sleep(0.2)

    await asyncio.gather(*(session(i) for i in range(sessions)))


def series_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in "{ "):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


async def scrape(hostport):
    try:
        status, body = await http(hostport, "GET", "/metrics", timeout=5.0)
        return body.decode(errors="replace") if status == 200 else ""
    except (OSError, asyncio.TimeoutError):
        return ""


async def cache_counters(sims):
    texts = await asyncio.gather(*(scrape(s) for s in sims))
    return (sum(series_sum(t, "vllm:prefix_cache_hits_total") for t in texts),
            sum(series_sum(t, "vllm:prefix_cache_queries_total") for t in texts))


def buckets(text, name):
    """A histogram's cumulative buckets summed over its series: {le: count}."""
    out = {}
    for m in re.finditer(rf'^{re.escape(name)}_bucket\{{([^}}]*)\}} (\S+)$', text, re.M):
        le = re.search(r'le="([^"]+)"', m.group(1)).group(1)
        out[float(le)] = out.get(float(le), 0.0) + float(m.group(2))
    return out


def quantile(cum, q):
    """The q-quantile of cumulative buckets, interpolated within its bucket (seconds)."""
    if not cum:
        return None
    les = sorted(cum)
    total = cum[les[-1]]
    if total <= 0:
        return None
    want, prev_le, prev_c = q * total, 0.0, 0.0
    for le in les:
        c = cum[le]
        if c >= want:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((want - prev_c) / max(c - prev_c, 1e-9))
        prev_le, prev_c = le, c
    return prev_le


async def run(a):
    tier = Tier(a.proxies.split(","))
    sims = a.sims.split(",")
    start = time.monotonic()
    stop = start + a.secs
    samples = []

    async def sampler():
        while time.monotonic() < stop + 1.0:
            hits, queries = await cache_counters(sims)
            samples.append((round(time.monotonic() - start, 2), hits, queries))
            await asyncio.sleep(1.0)

    load = multi_turn if a.workload == "multi-turn" else shared_prefix
    await asyncio.gather(sampler(), load(tier, stop, a.seed))
    cum, lag, sent = {}, {}, 0.0
    for admin in a.admins.split(","):
        text = await scrape(admin)
        for le, c in buckets(text, DECISION).items():
            cum[le] = cum.get(le, 0.0) + c
        for le, c in buckets(text, LAG).items():
            lag[le] = lag.get(le, 0.0) + c
        sent += series_sum(text, "kvgate_cluster_sent_bytes_total")
    peers = len(a.admins.split(",")) - 1
    out = {"workload": a.workload, "label": a.label, "secs": a.secs, "ok": tier.ok, "failed": tier.failed,
           "per_replica": tier.sent, "samples": samples,
           "decision_p50_us": (quantile(cum, 0.5) or 0) * 1e6, "decision_p99_us": (quantile(cum, 0.99) or 0) * 1e6,
           "lag_p50_ms": None if quantile(lag, 0.5) is None else quantile(lag, 0.5) * 1e3,
           "lag_p99_ms": None if quantile(lag, 0.99) is None else quantile(lag, 0.99) * 1e3,
           # Bytes each replica sent each of its followers, per second.
           "bytes_per_peer_s": sent / max(1, (peers + 1) * peers) / a.secs if peers else 0.0}
    json.dump(out, open(a.out, "w"))
    log(f"[{a.label}] {tier.ok} ok, {tier.failed} failed, per replica {tier.sent}")


def hit_rate(samples, t0, t1):
    """The prefix-cache hit rate between seconds t0 and t1 of a run (nearest samples)."""
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if len(inside) < 2:
        return None
    (_, h0, q0), (_, h1, q1) = inside[0], inside[-1]
    return (h1 - h0) / (q1 - q0) if q1 > q0 else None


def pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def report(d):
    runs = {}
    for f in sorted(os.listdir(d)):
        if f.startswith("run-") and f.endswith(".json"):
            r = json.load(open(os.path.join(d, f)))
            runs[(r["workload"], r["label"])] = r
    print("\n### Hit rate over 1, 2 and 3 replicas, requests spread in turn\n")
    print("Prefix-cache hit rate of the simulators over the run's last two thirds (after the caches "
          "warm), decision time p50/p99 from the replicas' `inference_extension_scheduler_e2e_duration_seconds`.\n")
    print("Sync lag: from a batch's sending to its application on a peer (a decision waits up to "
          "`sync_interval_ms`, 50 ms, in the outbox before that); bandwidth: bytes each replica sent "
          "each peer per second (`kvgate_cluster_sent_bytes_total`).\n")
    print("| workload | replicas | sync | hit rate | vs one replica | decision p50 µs | p99 µs | sync lag p50 / p99 ms "
          "| KB/s per peer | ok | failed |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in ("shared-prefix", "multi-turn"):
        one = runs.get((w, "1"))
        base = one and hit_rate(one["samples"], one["secs"] / 3, one["secs"])
        for label in ("1", "2-on", "2-off", "3-on", "3-off"):
            r = runs.get((w, label))
            if not r:
                continue
            h = hit_rate(r["samples"], r["secs"] / 3, r["secs"])
            diff = "—" if h is None or base is None else f"{100 * (h - base):+.1f} pts"
            n, sync = (label.split("-") + ["—"])[:2]
            lag = "—" if r.get("lag_p50_ms") is None else f"{r['lag_p50_ms']:.1f} / {r['lag_p99_ms']:.1f}"
            bw = "—" if not r.get("bytes_per_peer_s") else f"{r['bytes_per_peer_s'] / 1000:.1f}"
            print(f"| {w} | {n} | {sync} | {pct(h)} | {diff} | {r['decision_p50_us']:.1f} | {r['decision_p99_us']:.1f} "
                  f"| {lag} | {bw} | {r['ok']} | {r['failed']} |")
    kill = json.load(open(os.path.join(d, "kill.json"))) if os.path.exists(os.path.join(d, "kill.json")) else None
    for label in ("3-on-kill", "3-off-kill"):
        r = runs.get(("multi-turn", label))
        if not r or not kill:
            continue
        k = kill.get(label, {})
        at = k.get("killed_at", 0)
        # Up to a minute each side of the kill (the first seconds of the run warm the caches).
        span = max(5.0, min(60.0, at - 5, r["secs"] - at - 2))
        before = hit_rate(r["samples"], at - span, at)
        after = hit_rate(r["samples"], at + 1, at + 1 + span)
        print(f"\n### A replica killed mid-run ({label}): multi-turn over 3 replicas for {r['secs']:.0f} s, "
              f"the third killed at {at:.0f} s\n")
        print(f"| hit rate {span:.0f} s before | {span:.0f} s after | change | requests failed "
              "| the dead replica's counts gone from a survivor after |")
        print("|---:|---:|---:|---:|---:|")
        change = "—" if before is None or after is None else f"{100 * (after - before):+.1f} pts"
        print(f"| {pct(before)} | {pct(after)} | {change} | {r['failed']} | {k.get('drained_s', '—')} s |")
        if "restart_ready_s" in k:
            print(f"\nRestarted: ready {k['restart_ready_s']} s after its start; its index then held "
                  f"{k.get('restart_blocks', '—')} blocks against a survivor's {k.get('survivor_blocks', '—')}.")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--proxies", required=True)
    r.add_argument("--admins", required=True)
    r.add_argument("--sims", required=True)
    r.add_argument("--workload", choices=["shared-prefix", "multi-turn"], required=True)
    r.add_argument("--secs", type=float, default=30)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--label", required=True)
    r.add_argument("out")
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    a = p.parse_args()
    if a.cmd == "run":
        asyncio.run(run(a))
    else:
        report(a.dir)


if __name__ == "__main__":
    main()
