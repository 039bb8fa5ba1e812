#!/usr/bin/env python3
"""Seeded production-like request traces for `kvgate bench --workload trace`.

Each line: {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}
where equal ids at equal positions are the same block of `--block-tokens` tokens. The mix:

- long shared system prompts (a few, 1,000-3,000 tokens, Zipf-popular),
- multi-turn sessions under them: each turn repeats the whole conversation so far (system
  prompt, earlier questions and answers) and adds a question; turns follow after a think time,
- one-off questions under a system prompt (shared prefix, unique tail),
- a heavy tail of one-off prompts with no shared prefix (log-normal lengths).

New sessions and one-offs arrive as a Poisson process at `--rate`; the trace's working set (its
distinct blocks) is printed to stderr, so simulator caches can be sized against it.

Usage: benches/gen_trace.py --seed 1 --requests 600 --rate 20 > trace.jsonl
"""
import argparse
import json
import math
import random
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--rate", type=float, default=20.0, help="new sessions and one-offs per second")
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--system-prompts", type=int, default=8)
    ap.add_argument("--think-ms", type=float, default=2000.0, help="mean think time between turns")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    bt = args.block_tokens
    next_id = [1]

    def fresh(n_tokens):
        n = max(1, n_tokens // bt)
        ids = list(range(next_id[0], next_id[0] + n))
        next_id[0] += n
        return ids

    systems = [fresh(rng.randint(1000, 3000)) for _ in range(args.system_prompts)]
    zipf = [1.0 / (k + 1) ** 1.1 for k in range(len(systems))]

    def system():
        return rng.choices(systems, weights=zipf)[0]

    out = []
    t = 0.0
    while len(out) < args.requests:
        t += rng.expovariate(args.rate) * 1000.0
        kind = rng.random()
        if kind < 0.55:
            # A session of 2-8 turns.
            history = list(system())
            turns = min(8, 2 + int(rng.expovariate(0.5)))
            at = t
            for _ in range(turns):
                question = fresh(rng.randint(40, 300))
                output = rng.randint(20, 200)
                ids = history + question
                out.append((at, len(ids) * bt + rng.randint(0, bt - 1), output, ids))
                history = ids + fresh(output)
                at += output * 8.0 + rng.expovariate(1.0 / args.think_ms)
        elif kind < 0.8:
            ids = list(system()) + fresh(rng.randint(40, 400))
            out.append((t, len(ids) * bt + rng.randint(0, bt - 1), rng.randint(20, 200), ids))
        else:
            n = int(min(6000, math.exp(rng.gauss(6.5, 0.9))))
            ids = fresh(max(bt, n))
            out.append((t, len(ids) * bt, rng.randint(20, 300), ids))
    out.sort(key=lambda r: r[0])
    out = out[: args.requests]
    blocks = set()
    for _, _, _, ids in out:
        blocks.update(ids)
    print(
        f"{len(out)} requests over {out[-1][0] / 1000:.1f} s; working set {len(blocks)} blocks "
        f"({len(blocks) * bt} tokens)",
        file=sys.stderr,
    )
    for at, n, output, ids in out:
        print(json.dumps({"timestamp": round(at, 1), "input_length": n, "output_length": output, "hash_ids": ids}))


if __name__ == "__main__":
    main()
