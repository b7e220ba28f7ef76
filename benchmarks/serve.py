"""Load test of `mllmrec serve`: closed-loop clients at 1, 4 and 8 concurrency, on 127.0.0.1 only.

    # against a running server
    mllmrec serve --model runs/quickstart/models/grpo --data runs/quickstart/data &
    python benchmarks/serve.py --data runs/quickstart/data [--clients 1,4,8] [--seconds 30]

    # or let it start the server, once per variant of the run's config (1 vs 2 CPU replicas)
    python benchmarks/serve.py --data runs/quickstart/data --launch runs/quickstart/models/grpo \\
        --variant serve.replicas=1,serve.resources.num_cpus=2 \\
        --variant serve.replicas=2,serve.resources.num_cpus=1 --out benchmarks/results/serve/run

    # the ranking function alone, per request at each batch size (sizes serve.max_batch_size)
    python benchmarks/serve.py --data runs/quickstart/data --core runs/quickstart/models/grpo

Requests are real test-split samples of the data dir: their history, and in `candidates` mode
their stored 10-candidate list (`retrieval` mode lets the server propose candidates). Per level:
requests/s, p50 / p99 latency of successful requests, errors (a non-200 answer or a failed
connection) and the efficiency = requests/s at N clients x p50 at 1 client (1.0: concurrency buys
nothing; N: perfect scaling). The machine's background load is measured before each variant
(busy cores from /proc/stat while the server idles) and recorded with the 1-minute load average.
A server it launched is also charged its CPU time (every process of its session: proxy,
controller, replicas): CPU seconds per request, which other work on the machine disturbs far less
than latency does. Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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
        payload = {"history": r["history"][-50:], "k": k, "explain": explain}
        if mode == "candidates":
            payload["candidates"] = r["candidates"]
        out.append(json.dumps(payload).encode())
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def busy_cores(seconds: float = 3.0) -> float:
    """Cores kept busy on this machine over `seconds` (from /proc/stat): the load we run next to."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return round((b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1), 2)


def session_cpu_seconds(sid: int) -> float:
    """user + system CPU seconds of every live process in session `sid` (a launched server's tree)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: session id; 14, 15: utime, stime
            total += int(fields[11]) + int(fields[12])
    return total / tick


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

    load0 = os.getloadavg()[0]
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
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def measure(url: str, payloads: list[bytes], levels: list[int], seconds: float, timeout: float,
            warmup: int, cpu=None) -> dict:
    """Every level in turn after `warmup` sequential requests; efficiency against the 1-client p50.
    cpu: a callable giving the server's CPU seconds so far (a launched server only)."""
    with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
        health = json.loads(r.read())
    for body in payloads[:warmup]:  # first calls pay one-off kernel and allocator set-up
        urllib.request.urlopen(urllib.request.Request(url + "/recommend", data=body, method="POST"),
                               timeout=timeout).read()
    background = busy_cores()
    results = []
    for n in levels:
        cpu0 = cpu() if cpu else None
        res = run(url, payloads, n, seconds, timeout)
        res["cpu_s_per_request"] = (round((cpu() - cpu0) / res["requests"], 3)
                                    if cpu and res["requests"] else None)
        results.append(res)
        print(f"  {n} client(s): {res['requests']} requests in {res['seconds']} s, {res['req_per_s']} req/s, "
              f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, CPU {res['cpu_s_per_request']} s/request, "
              f"errors {res['errors']} {res['error_kinds'] or ''}"
              f"(load {res['loadavg_1m'][0]} -> {res['loadavg_1m'][1]})", flush=True)
    base = next((r for r in results if r["clients"] == 1 and r["p50_ms"]), None)
    for r in results:
        r["efficiency"] = round(r["req_per_s"] * base["p50_ms"] / 1000, 2) if base else None
        r["p99_over_p50"] = round(r["p99_ms"] / r["p50_ms"], 2) if r["p50_ms"] else None
    return {"server": health, "background_busy_cores": background, "levels": results}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def variant_config(base: Path | None, sets: list[str], port: int, out: Path) -> dict:
    """The run's config with `key=value` overrides (dotted keys) and the port, written to `out`."""
    import yaml

    cfg = yaml.safe_load(base.read_text()) if base and base.exists() else {}
    for item in sets:
        key, _, value = item.partition("=")
        node = cfg
        *path, last = key.strip().split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    cfg.setdefault("serve", {}).update(host="127.0.0.1", port=port)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


class Server:
    """`mllmrec serve` in its own session, stopped with SIGTERM (then only its own session is killed)."""

    def __init__(self, model: str, data: Path, config: Path, port: int, log: Path):
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        env.pop("RAY_ADDRESS", None)
        self.log = open(log, "w")
        exe = Path(sys.executable).parent / "mllmrec"
        cmd = [str(exe), "serve", "--model", model, "--data", str(data), "--config", str(config)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mllmrec serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:  # not listening yet: poll again until the deadline
                pass
            time.sleep(2)
        raise RuntimeError(f"mllmrec serve not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this benchmark started
                self.proc.wait()
        self.log.close()


def core_batches(model: str, data: Path, config: Path | None, sizes: list[int], repeats: int,
                 threads: int | None = None) -> list[dict]:
    """Seconds per request of the replica's ranking call (no Ray, no HTTP) at each batch size."""
    from actors.ranker import RankerCore, make_backend, replica_threads
    from mllmrec_ray.config import PipelineConfig, load_config
    from mllmrec_ray.data.run_data import load_collab, load_items
    from mllmrec_ray.ranking.serve_logic import fit_retriever

    cfg = load_config(config) if config and config.exists() else PipelineConfig()
    threads = threads or replica_threads(cfg.serve)
    backend = make_backend(model, cfg.model.engine, gpu=False, threads=threads)
    core = RankerCore(backend, load_items(data), load_collab(data, cfg.prompt), fit_retriever("pop", data),
                      cfg.serve, cfg.prompt, cfg.eval.readout, cfg.eval.order_ensemble)
    reqs = [core.parse(p) for p in load_payloads(data, "candidates", 5, False, limit=max(sizes) * repeats)]
    core.rank(reqs[:2])  # warm-up
    out = []
    for n in sizes:
        t0, c0 = time.perf_counter(), time.process_time()
        for r in range(repeats):
            core.rank(reqs[r * n:(r + 1) * n])
        per = (time.perf_counter() - t0) / (repeats * n)
        cpu = (time.process_time() - c0) / (repeats * n)
        out.append({"batch": n, "s_per_request": round(per, 3), "requests_per_s": round(1 / per, 2),
                    "cpu_s_per_request": round(cpu, 3), "threads": threads, "loadavg_1m": round(os.getloadavg()[0], 2)})
        print(f"  batch {n}: {per:.3f} s per request ({1 / per:.2f} requests/s), CPU {cpu:.3f} s per request, "
              f"{threads} thread(s), load {os.getloadavg()[0]:.2f}", flush=True)
    return out


def markdown(report: dict) -> str:
    lines = [f"# `benchmarks/serve.py` on {report['host']}", "",
             f"{report['when']}, {report['cores']} cores, mode {report['mode']}, k {report['k']}, "
             f"{report['seconds']:.0f} s per level. Load: see `background busy cores` (other work on the "
             "machine while the server idled) and the 1-minute load average per level.", ""]
    for v in report["variants"]:
        lines += [f"## {v['name']}", "",
                  f"server {v['server'].get('model')} ({v['server'].get('backend')}), background busy cores "
                  f"{v['background_busy_cores']}", "",
                  "| clients | requests/s | p50 ms | p99 ms | p99/p50 | efficiency | CPU s/request | errors "
                  "| load 1m |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in v["levels"]:
            lines.append(f"| {r['clients']} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['p99_over_p50']} "
                         f"| {r['efficiency']} | {r.get('cpu_s_per_request')} | {r['errors']} "
                         f"| {r['loadavg_1m'][0]}-{r['loadavg_1m'][1]} |")
        lines.append("")
    if report.get("verdict"):
        lines += ["## Verdict", "", report["verdict"], ""]
    if report.get("core"):
        lines += ["## The ranking call alone (no Ray, no HTTP)", "",
                  "| batch | threads | s per request | requests/s | CPU s/request | load 1m |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['batch']} | {c['threads']} | {c['s_per_request']} | {c['requests_per_s']} "
                  f"| {c['cpu_s_per_request']} | {c['loadavg_1m']} |" for c in report["core"]] + [""]
    return "\n".join(lines)


def verdict(variants: list[dict]) -> str | None:
    """Which variant serves the most requests/s at the highest concurrency, by how much, and whether
    the machine was quiet enough for that to be the variant's doing rather than its share of a busy CPU."""
    if len(variants) < 2:
        return None
    top = max(r["clients"] for r in variants[0]["levels"])
    at_top = [(next(r for r in v["levels"] if r["clients"] == top), v) for v in variants]
    (best, v1), (second, v2) = sorted(at_top, key=lambda x: -x[0]["req_per_s"])[:2]
    text = (f"At {top} clients, {v1['name']} serves {best['req_per_s']} requests/s vs {second['req_per_s']} for "
            f"{v2['name']} ({best['req_per_s'] / second['req_per_s']:.2f}x).")
    cpu = [(r.get("cpu_s_per_request"), v["name"]) for r, v in at_top]
    if all(c is not None for c, _ in cpu):
        text += " CPU seconds per request there: " + ", ".join(f"{c} ({n})" for c, n in cpu) + "."
    busy = max(v["background_busy_cores"] for v in variants)
    if busy > 0.5:
        text += (f" Other work kept up to {busy} cores busy while the servers idled: under such load a variant's "
                 "requests/s mostly measures the share of the CPU its threads won, not what it does on a quiet box.")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running ranker (loopback only)")
    p.add_argument("--data", type=Path, required=True, help="prepared data dir the server was started with")
    p.add_argument("--launch", metavar="MODEL", help="start `mllmrec serve --model MODEL` per variant instead of --url")
    p.add_argument("--config", type=Path, help="base config for --launch / --core (default: <data>/../config.yaml)")
    p.add_argument("--variant", action="append", default=[], metavar="K=V[,K=V]",
                   help="with --launch: config overrides of one server, e.g. serve.replicas=2 (repeatable)")
    p.add_argument("--core", metavar="MODEL", help="also time the ranking call alone at each --core-batches size")
    p.add_argument("--core-batches", default="1,2,4,8,16")
    p.add_argument("--core-threads", type=int, help="torch threads of --core (default serve.resources.num_cpus)")
    p.add_argument("--clients", default="1,4,8", help="concurrency levels, comma-separated (1 is the efficiency base)")
    p.add_argument("--seconds", type=float, default=30.0, help="per level")
    p.add_argument("--warmup", type=int, default=3, help="sequential requests before measuring")
    p.add_argument("--mode", choices=["candidates", "retrieval"], default="candidates")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--explain", action="store_true", help="ask for the model's reasoning too")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url {args.url}: this benchmark only talks to 127.0.0.1")
    levels = [int(x) for x in args.clients.split(",")]
    config = args.config or (args.data.resolve().parent / "config.yaml")
    payloads = load_payloads(args.data, args.mode, args.k, args.explain)
    report = {"host": socket.gethostname(), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(),
              "mode": args.mode, "k": args.k, "explain": args.explain, "seconds": args.seconds, "variants": []}
    print(f"{levels} clients, {args.seconds:.0f} s each, mode {args.mode}, k {args.k}"
          f"{', explain' if args.explain else ''}; background busy cores {busy_cores()}", flush=True)
    if args.core:
        print("ranking call alone:", flush=True)
        report["core"] = core_batches(args.core, args.data, config,
                                      [int(x) for x in args.core_batches.split(",")], repeats=2,
                                      threads=args.core_threads)
    if args.launch:
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
            for n, spec in enumerate(args.variant or [""]):
                sets = [s for s in spec.split(",") if s]
                port = free_port()
                cfg = variant_config(config, sets, port, Path(tmp) / f"v{n}.yaml")
                serve = cfg["serve"]
                cpus = (serve.get("resources") or {}).get("num_cpus", 1)
                name = (f"{serve.get('replicas', 1)} replica(s) x {cpus} CPU, batch {serve.get('max_batch_size', 8)}, "
                        f"wait {serve.get('batch_wait_timeout_s', 0.05)} s")
                print(f"variant {name} ({spec or 'the config as is'}): starting mllmrec serve", flush=True)
                server = Server(args.launch, args.data, Path(tmp) / f"v{n}.yaml", port, Path(tmp) / f"v{n}.log")
                try:
                    server.wait_ready()
                    res = measure(server.url, payloads, levels, args.seconds, args.timeout, args.warmup,
                                  cpu=lambda: session_cpu_seconds(server.proc.pid))
                finally:
                    server.stop()
                report["variants"].append({"name": name, "overrides": sets, **res})
    elif not args.core:
        print(f"server {args.url}", flush=True)
        report["variants"].append({"name": args.url, "overrides": [],
                                   **measure(args.url, payloads, levels, args.seconds, args.timeout, args.warmup)})
    report["verdict"] = verdict(report["variants"])
    for v in report["variants"]:
        for r in v["levels"]:
            print(f"{v['name']}: {r['clients']} clients: {r['req_per_s']} req/s, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms (p99/p50 {r['p99_over_p50']}), efficiency {r['efficiency']}, "
                  f"CPU {r.get('cpu_s_per_request')} s/request, errors {r['errors']}")
    if report["verdict"]:
        print(report["verdict"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
    return 1 if any(r["errors"] for v in report["variants"] for r in v["levels"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
