"""A closed-loop HTTP load generator, run as its own process so it does not share the proxy's event loop.

`concurrency` workers each send a request, wait for the whole answer, and send the next,
until `requests` have been sent or `duration` seconds have passed (whichever comes first).
Requests cycle through a JSON file of `{"path": ..., "body": {...}}` items. The result is
one JSON object on standard output.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --requests-file reqs.json \
        --concurrency 8 --requests 2000 --duration 20
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from _common import summarize_ms


async def run_load(url: str, requests: list[dict[str, Any]], concurrency: int, total: int, duration: float,
                   warmup: int) -> dict[str, Any]:
    payloads = [(r["path"], json.dumps(r["body"]).encode()) for r in requests]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        order = itertools.cycle(payloads)
        for _ in range(warmup):
            await _one(client, *next(order))
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        flagged = 0
        sent = 0
        started = time.perf_counter()
        deadline = started + duration

        async def worker() -> None:
            nonlocal sent, flagged
            while sent < total and time.perf_counter() < deadline:
                sent += 1
                path, content = next(order)
                began = time.perf_counter()
                try:
                    status, headers = await _one(client, path, content)
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - began)
                statuses[str(status)] += 1
                flagged += headers.get("x-eco-flagged") == "true"

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = statuses.get("200", 0)
    return {"concurrency": concurrency, "sent": sent, "ok": ok, "statuses": dict(statuses),
            "elapsed_s": elapsed, "rps": ok / elapsed if elapsed > 0 else 0.0,
            "flagged_fraction": flagged / ok if ok else 0.0, "latency": summarize_ms(latencies)}


async def _one(client: httpx.AsyncClient, path: str, content: bytes) -> tuple[int, httpx.Headers]:
    async with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as response:
        async for _ in response.aiter_raw():
            pass
        return response.status_code, response.headers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests-file", type=Path, required=True, help='JSON list of {"path", "body"}')
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="stop after this many requests")
    parser.add_argument("--duration", type=float, default=20.0, help="or after this many seconds")
    parser.add_argument("--warmup", type=int, default=8, help="requests sent before measuring")
    args = parser.parse_args()
    requests = json.loads(args.requests_file.read_text())
    if not requests:
        raise SystemExit(f"{args.requests_file} holds no requests")
    try:
        import uvloop  # a faster loop leaves more of the shared CPU to the server under test
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run_load(args.url, requests, args.concurrency, args.requests, args.duration, args.warmup))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
