"""`mllmrec report RUN_DIR`: reward curve PNG, GRPO metrics table, and the results table.

Reads what the stages wrote (SPEC section 9): `grpo/metrics.jsonl` and `eval/*.json`;
writes `reward_curve.png`, `grpo/metrics.md`, `results.json` and `results.md`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mllmrec_ray.evaluation import format_table
from mllmrec_ray.io import atomic_write_json, atomic_write_text

# Order of the results table: LLM stages first, then the classic baselines.
MODEL_ORDER = ["base", "sft", "grpo", "pop", "sasrec"]
STEP_COLUMNS = ["step", "reward_mean", "reward_std", "hit_rate", "valid_rate", "kl", "loss", "clip_frac",
                "response_len", "rollout_tok_s", "sync_s", "step_s"]


def read_metrics(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                # a run killed mid-write leaves at most one torn last line
                raise ValueError(f"{path}: line {n} is not valid JSON: {e}") from e
    # a resumed run may repeat steps after its last checkpoint: keep the latest of each step
    by_step = {int(r["step"]): r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def plot_reward_curve(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    mean = [r["reward_mean"] for r in rows]
    std = [r.get("reward_std", 0.0) for r in rows]
    ax.plot(steps, mean, marker="o", label="reward mean")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                    label="± reward std")
    ax.plot(steps, [r.get("hit_rate", float("nan")) for r in rows], marker=".", label="hit rate")
    ax.plot(steps, [r.get("valid_rate", float("nan")) for r in rows], marker=".", label="valid-format rate")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / rate")
    ax.set_title("GRPO reward (R = R_fmt + 1[hit])")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def metrics_table(rows: list[dict]) -> str:
    cols = [c for c in STEP_COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else (str(v) if isinstance(v, int) else f"{v:.4g}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect_results(run_dir: Path) -> list[dict]:
    records = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        record = json.loads(path.read_text())
        if "HR@3" not in record:
            raise ValueError(f"{path}: not an evaluation record (no HR@3)")
        records.append(record)
    rank = {m: i for i, m in enumerate(MODEL_ORDER)}
    return sorted(records, key=lambda r: (rank.get(r["model"], len(rank)), r["model"]))


def write_report(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    out: dict = {}
    metrics_path = run_dir / "grpo" / "metrics.jsonl"
    if metrics_path.exists():
        rows = read_metrics(metrics_path)
        if rows:
            out["reward_curve"] = str(plot_reward_curve(rows, run_dir / "reward_curve.png"))
            atomic_write_text(run_dir / "grpo" / "metrics.md", metrics_table(rows) + "\n")
            out["grpo"] = {
                "steps": len(rows),
                "reward_start": rows[0]["reward_mean"],
                "reward_end": rows[-1]["reward_mean"],
                "sync_s_mean": sum(r.get("sync_s", 0.0) for r in rows) / len(rows),
                "step_s_mean": sum(r.get("step_s", 0.0) for r in rows) / len(rows),
            }
    records = collect_results(run_dir)
    if records:
        atomic_write_json(run_dir / "results.json", records)
        atomic_write_text(run_dir / "results.md", format_table(records) + "\n")
        out["table"] = format_table(records)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/quickstart")


def main(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        print(f"error: run directory {args.run_dir} does not exist")
        return 2
    out = write_report(args.run_dir)
    if "grpo" in out:
        g = out["grpo"]
        print(f"GRPO: {g['steps']} steps, reward {g['reward_start']:.3f} -> {g['reward_end']:.3f}, "
              f"sync {g['sync_s_mean']:.2f} s vs step {g['step_s_mean']:.1f} s (mean)")
        print(f"reward curve: {out['reward_curve']}")
    if "table" in out:
        print(out["table"])
    if not out:
        print(f"nothing to report in {args.run_dir} (no grpo/metrics.jsonl, no eval/*.json)")
    return 0
