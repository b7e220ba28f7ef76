"""Load test of a running `mllmrec serve`: N concurrent clients for a bounded time, on 127.0.0.1 only.

    mllmrec serve --model runs/quickstart/models/grpo --data runs/quickstart/data &
    python benchmarks/serve.py --data runs/quickstart/data [--clients 8] [--seconds 60] [--mode candidates]

Requests are real test-split samples of the data dir: their history, and in `candidates`
mode their stored 10-candidate list (`retrieval` mode lets the server propose candidates).
Prints p50 / p99 latency of successful requests, requests/s and errors (a non-200 answer
or a failed connection); exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_payloads(data_dir: Path, mode: str, k: int, explain: bool, limit: int = 256) -> list[bytes]:
    import pyarrow.parquet as pq

    rows = pq.read_table(data_dir / "samples.parquet", columns=["split", "history", "candidates"]).to_pylist()
    rows = [r for r in rows if r["split"] == "test"] or rows
    out = []
    for r in rows[:limit]:
        payload = {"history": r["history"], "k": k, "explain": explain}
        if mode == "candidates":
            payload["candidates"] = r["candidates"]
        out.append(json.dumps(payload).encode())
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def run(url: str, payloads: list[bytes], clients: int, seconds: float, timeout: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(idx: int) -> None:
        n = idx
        while time.monotonic() < stop_at:
            body = payloads[n % len(payloads)]
            n += clients
            req = urllib.request.Request(url + "/recommend", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    r.read()
                    ok, why = r.status == 200, f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                ok, why = False, f"HTTP {e.code}"
            except OSError as e:
                ok, why = False, type(e).__name__
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors[why] = errors.get(why, 0) + 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    wall = time.monotonic() - t0
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
            "errors": sum(errors.values()), "error_kinds": errors,
            "req_per_s": round(len(latencies) / wall, 3),
            "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 99), 1) if latencies else None,
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the ranker (loopback only)")
    p.add_argument("--data", type=Path, required=True, help="prepared data dir the server was started with")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--mode", choices=["candidates", "retrieval"], default="candidates")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--explain", action="store_true", help="ask for the model's reasoning too")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url {args.url}: this benchmark only talks to 127.0.0.1")
    with urllib.request.urlopen(args.url + "/healthz", timeout=10) as r:
        health = json.loads(r.read())
    payloads = load_payloads(args.data, args.mode, args.k, args.explain)
    print(f"server: {health}; {args.clients} clients for {args.seconds:.0f} s, mode {args.mode}, k {args.k}"
          f"{', explain' if args.explain else ''}", flush=True)
    res = run(args.url, payloads, args.clients, args.seconds, args.timeout)
    res.update(mode=args.mode, k=args.k, explain=args.explain, model=health.get("model"))
    print(f"requests {res['requests']} in {res['seconds']} s: {res['req_per_s']} req/s, "
          f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, mean {res['mean_ms']} ms, "
          f"errors {res['errors']} {res['error_kinds'] or ''}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
