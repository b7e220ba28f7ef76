"""Copy a finished run's evidence into benchmarks/results/quality/<run name>/ for committing.

Usage: python benchmarks/collect_quality.py runs/cpu-full [--out benchmarks/results/quality]

Copies results.json / results.md / paired.json, every eval record with its per-sample
rankings, the resolved config, GRPO's metrics and the data manifest, and writes
`provenance.json` (data seed, commit, run timings when the pipeline logged them). A README*.md
already in the destination (e.g. the rule written before the run) is kept. It re-runs
`mllmrec report`'s checks first, so a copied ranking always reproduces its table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    p.add_argument("--timings", type=Path, help="the pipeline's console log: its last lines (stage timings) are kept")
    args = p.parse_args()
    run = args.run_dir
    if not (run / "eval").is_dir():
        print(f"error: {run}/eval does not exist: not a finished run", file=sys.stderr)
        return 2
    from jobs.report import write_report

    write_report(run)  # fails, naming the file, when a ranking does not reproduce its record
    dest = args.out / run.name
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "eval").mkdir(parents=True)
    for name in ("results.json", "results.md", "paired.json", "config.yaml", "reward_curve.png"):
        if (run / name).exists():
            shutil.copy2(run / name, tmp / name)
    for f in sorted((run / "eval").iterdir()):
        if f.suffix == ".json" or f.name.endswith(".rankings.parquet"):
            shutil.copy2(f, tmp / "eval" / f.name)
    for src, name in ((run / "grpo" / "metrics.jsonl", "grpo_metrics.jsonl"), (run / "grpo" / "metrics.md", "grpo_metrics.md"),
                      (run / "data" / "manifest.json", "data_manifest.json")):
        if src.exists():
            shutil.copy2(src, tmp / name)
    manifest = json.loads((run / "data" / "manifest.json").read_text()) if (run / "data" / "manifest.json").exists() else {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=run.resolve().parent).stdout.strip() or None
    provenance = {"run": str(run), "data_seed": manifest.get("config", {}).get("seed"), "dataset": manifest.get("dataset"),
                  "commit_of_the_run_checkout": commit}
    if args.timings:
        provenance["pipeline_console"] = args.timings.read_text().splitlines()[-40:]
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if dest.is_dir():  # hand-written notes (a rule written before the run) are not the run's to replace
        for note in dest.glob("README*.md"):
            shutil.copy2(note, tmp / note.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    print(f"copied {run} -> {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
