"""Measure a running ``tools/serve.py``: tokens/s and time to first token with N concurrent streaming chat clients.

    python tools/serve.py --config.generation.ckpt_folder=RUN/demo/ckpt --config.generation.eos_id=[] \\
        --config.generation.max_length=256 --max-batch-size=16 --log-level=warning &
    python tools/bench_serve.py --url=http://127.0.0.1:8000 --clients=1,4,16 --max-tokens=64

For each client count, every client sends one streaming ``/v1/chat/completions`` request (greedy, ``max_tokens``
new tokens) at the same moment, ``--rounds`` times. Reported per count, as a Markdown table row: the aggregate
tokens/s (all clients' tokens over the wall time from the start to the last reply's end), per-client tokens/s, and
the median and worst time to first token (the first chunk with text). Serve with ``eos_id=[]`` so every reply has its
full length. A warm-up round with the most clients runs first (prefill compiles for new prompt lengths are not
measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time


def stream_one(
    url: str, key: str | None, text: str, max_tokens: int, start: threading.Barrier
) -> tuple[float, float, int]:
    """(seconds to the first text, seconds to the end, completion tokens) of one streaming chat request."""
    import httpx

    body = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start.wait()
    t0 = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            raise SystemExit(f"{r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t0
    return first if first is not None else float("nan"), time.perf_counter() - t0, tokens


def measure(url: str, key: str | None, clients: int, max_tokens: int) -> tuple[float, list[float], list[float], int]:
    """(wall seconds, each client's seconds to first text, each client's tokens/s, all tokens) of one round."""
    start = threading.Barrier(clients + 1)
    results: list[tuple[float, float, int] | None] = [None] * clients

    def run(i: int) -> None:
        results[i] = stream_one(url, key, f"client {i}: count on from {i}", max_tokens, start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    if len(done) != clients:
        raise SystemExit("a client failed (see above)")
    return wall, [r[0] for r in done], [r[2] / r[1] for r in done], sum(r[2] for r in done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    measure(args.url, args.api_key, max(counts), args.max_tokens)  # warm-up: compiles the prompts' prefill buckets
    print("| clients | tokens/s (all) | tokens/s per client | time to first token, median | worst |")
    print("|---:|---:|---:|---:|---:|")
    for clients in counts:
        walls, firsts, rates, tokens = [], [], [], 0
        for _ in range(args.rounds):
            wall, first, rate, n = measure(args.url, args.api_key, clients, args.max_tokens)
            walls.append(wall)
            firsts += first
            rates += rate
            tokens += n
        print(
            f"| {clients} | {tokens / sum(walls):.0f} | {statistics.median(rates):.0f} | "
            f"{statistics.median(firsts) * 1000:.0f} ms | {max(firsts) * 1000:.0f} ms |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
