#!/usr/bin/env python3
"""Open-loop load at a fixed request rate: sends POSTs at evenly spaced times, whatever the
answers do, and reports latency percentiles measured from each request's scheduled start.
Standard library only (asyncio, raw HTTP/1.1 with keep-alive connections).

usage: open_loop.py HOST:PORT PATH BODY_FILE RATE SECONDS
prints: p50_ms p99_ms completed errors
"""
import asyncio
import sys
import time


async def main():
    hostport, path, body_file, rate, secs = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
    host, port = hostport.rsplit(":", 1)
    body = open(body_file, "rb").read()
    head = (f"POST {path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    idle = asyncio.Queue()
    lat, errors = [], 0

    async def conn():
        r, w = await asyncio.open_connection(host, int(port))
        return r, w

    async def one(start):
        nonlocal errors
        c = idle.get_nowait() if not idle.empty() else await conn()
        r, w = c
        try:
            w.write(head + body)
            await w.drain()
            status = await r.readline()
            length = None
            chunked = False
            while True:
                line = await r.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.decode().partition(":")
                if k.lower() == "content-length":
                    length = int(v)
                elif k.lower() == "transfer-encoding" and "chunked" in v:
                    chunked = True
            if chunked:
                while True:
                    size = int((await r.readline()).strip(), 16)
                    await r.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await r.readexactly(length)
            if not status.startswith(b"HTTP/1.1 2"):
                errors += 1
            lat.append(time.perf_counter() - start)
            idle.put_nowait(c)
        except Exception:
            errors += 1
            w.close()

    t0 = time.perf_counter()
    n = int(rate * secs)
    tasks = []
    for i in range(n):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    await asyncio.gather(*tasks)
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")
    print(f"{pct(0.5):.3f} {pct(0.99):.3f} {len(lat)} {errors}")


asyncio.run(main())
