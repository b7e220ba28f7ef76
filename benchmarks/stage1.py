"""Stage I throughput on Ray Data actor pools: captions and pseudo-/refined-CoT rows per second with
1 vs 2 generator actors, each pool size in its own fresh Stage I dir and its own `mllmrec` process.

Usage: python benchmarks/stage1.py --data RUN/data [--config configs/quickstart.yaml] [--actors 1,2]
           [--cot-samples 32] [--cores N] [--out benchmarks/results/stage1.json]
Captions use the config's captioner (pixel statistics on CPU); CoT uses the config's model as
generator and refiner, no judge. The machine's cores are split over the pool (num_cpus = cores /
actors, and each actor generates with that many torch threads), so the pools compare at equal
compute. rows/s is stored rows over the pool's wall time (actor start and engine load included);
tokens/engine-s is generated tokens over the actors' batch time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared data dir (items.parquet with image paths)")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--actors", default="1,2", help="pool sizes to measure")
    parser.add_argument("--cot-samples", type=int, default=32, help="training samples to write CoT for (0: skip)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores split over each pool's actors")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage1.json"))
    args = parser.parse_args()

    sizes = [int(x) for x in args.actors.split(",") if x]
    if args.cot_samples and args.cot_samples < max(sizes) * args.batch_size:
        print(f"note: {args.cot_samples} CoT rows make fewer than {max(sizes)} batches of {args.batch_size}: "
              f"some actors get no work and only add engine start-up", flush=True)
    mllmrec = [sys.executable, "-m", "jobs.cli"]
    results = []
    with tempfile.TemporaryDirectory(prefix="mllmrec-bench-stage1-") as tmp:
        for n in sizes:
            stage1 = Path(tmp) / f"actors{n}"
            common = ["--config", args.config, "--pool-size", str(n), "--num-cpus", str(args.cores / n),
                      "--batch-size", str(args.batch_size)]
            wall = run(mllmrec + ["textualize", "--data", args.data, "--out", str(stage1)] + common)
            cap = json.loads((stage1 / "captions_summary.json").read_text())
            row = {"actors": n, "captions": {"items": cap["computed_now"], "pool_seconds": cap["seconds"],
                                             "items_per_s": cap["items_per_s"], "process_seconds": round(wall, 1)}}
            if args.cot_samples:
                wall = run(mllmrec + ["cot", "--data", args.data, "--stage1", str(stage1), "--max-samples",
                                      str(args.cot_samples), "--judge-samples", "0"] + common)
                timings = json.loads((stage1 / "audit.json").read_text())["timings"]
                row["cot"] = {step: {"rows": t.get("rows"), "pool_seconds": t.get("seconds"),
                                     "rows_per_s": t.get("rows_per_s"),
                                     "tokens_per_engine_s": t.get("tokens_per_engine_s"),
                                     "torch_threads": t.get("torch_threads")}
                              for step, t in timings.items()}
                row["cot"]["process_seconds"] = round(wall, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {"data": args.data, "config": args.config, "cores": args.cores,
              "batch_size": args.batch_size, "cot_samples": args.cot_samples, "runs": results}
    if len(results) >= 2:
        a, b = results[0], results[-1]
        report["speedup_captions"] = round(b["captions"]["items_per_s"] / a["captions"]["items_per_s"], 2)
        for step in (a.get("cot") or {}):
            if step != "process_seconds" and a["cot"][step].get("rows_per_s") and b["cot"].get(step, {}).get("rows_per_s"):
                report[f"speedup_{step}"] = round(b["cot"][step]["rows_per_s"] / a["cot"][step]["rows_per_s"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| actors | captions items/s | " + " | ".join(f"{s} rows/s" for s in (results[0].get("cot") or {})
                                                       if s != "process_seconds") + " |")
    for r in results:
        cot = [f"{v['rows_per_s']}" for s, v in (r.get("cot") or {}).items() if s != "process_seconds"]
        print(f"| {r['actors']} | {r['captions']['items_per_s']} | " + " | ".join(cot) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
