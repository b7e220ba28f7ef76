"""`mllmrec report RUN_DIR`: reward curve PNG, GRPO metrics table, and the results table.

Reads what the stages wrote (SPEC section 9): `grpo/metrics.jsonl`, `eval/*.json` and,
where saved, `eval/*.rankings.parquet`; writes `reward_curve.png`, `grpo/metrics.md`,
`results.json`, `results.md` and (when rankings exist) `paired.json`. Saved rankings
must reproduce their record's metrics, else the report fails naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mllmrec_ray.ranking.evaluation import check_rankings, format_table, load_split, rankings_path, read_rankings
from mllmrec_ray.io import atomic_write_json, atomic_write_text
from mllmrec_ray.ranking.metrics import paired_bootstrap_diff

# Order of the results table: LLM stages first, then the classic baselines, then trivial rankers.
MODEL_ORDER = ["base", "sft", "grpo", "pop", "sasrec", "sasrec-full", "collab", "min-id", "random"]
# Paired comparisons: each training stage against the one before, each LLM against the baselines.
LLM_MODELS = ("base", "sft", "grpo")
PAIR_BASELINES = ("pop", "sasrec", "collab")
PAIR_METRICS = ("HR@3", "NDCG@3", "HR@5", "NDCG@5")
PAIRED_TITLE = "Paired differences (95% bootstrap CI over the same samples)"
STEP_COLUMNS = ["step", "reward_mean", "reward_std", "hit_rate", "valid_rate", "zero_var_groups", "kl", "loss", "clip_frac",
                "response_len", "rollout_tok_s", "sync_s", "step_s", "reward/format", "reward/hit", "skipped_groups", "logprob_gap", "tis_weight_mean", "think_rate", "think_len", "sync_bytes"]


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


def _collect_records(run_dir: Path) -> list[tuple[Path, dict]]:
    """(record path, record) of every eval/*.json, in results-table order."""
    entries = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        record = json.loads(path.read_text())
        if "HR@3" not in record:
            raise ValueError(f"{path}: not an evaluation record (no HR@3)")
        entries.append((path, record))
    rank = {m: i for i, m in enumerate(MODEL_ORDER)}
    return sorted(entries, key=lambda e: (rank.get(e[1]["model"], len(rank)), e[1]["model"]))


def collect_results(run_dir: Path) -> list[dict]:
    return [record for _, record in _collect_records(run_dir)]


def collect_evidence(run_dir: Path, entries: list[tuple[Path, dict]]) -> list[dict]:
    """Checked per-sample metrics of every record that has a rankings file beside it.

    Each item: {"path", "record", "sample_ids", "values": {metric: per-sample array}}.
    Targets and candidates come from <run>/data/samples.parquet (the record's split
    and candidate-set size); a ranking that does not reproduce its record raises.
    """
    evidence, splits = [], {}
    for path, record in entries:
        rpath = rankings_path(path)
        if not rpath.exists():
            continue  # records from before rankings were saved: table row only
        data = run_dir / "data"
        if not (data / "samples.parquet").exists():
            raise ValueError(f"{rpath}: cannot check it, {data / 'samples.parquet'} does not exist")
        key = (record["split"], int(record["candidates"]))
        if key not in splits:
            splits[key] = load_split(data, *key)[0]
        sample_ids, rankings = read_rankings(rpath)
        values = check_rankings(record, sample_ids, rankings, splits[key], source=str(rpath))
        evidence.append({"path": rpath, "record": record, "sample_ids": sample_ids, "values": values})
    return evidence


def paired_differences(evidence: list[dict], n_resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Paired bootstrap differences (a - b) on the samples both models were evaluated on.

    Only models of the same dataset, split and candidate-set size are paired.
    """
    groups: dict[tuple, dict[str, dict]] = {}
    for ev in evidence:
        r = ev["record"]
        group = groups.setdefault((r.get("dataset"), r["split"], int(r["candidates"])), {})
        if r["model"] in group:
            raise ValueError(f"{ev['path']} and {group[r['model']]['path']}: two rankings of model "
                             f"{r['model']!r} on the same split; cannot tell which to compare")
        group[r["model"]] = ev
    pairs = [("sft", "base"), ("grpo", "sft")] + [(m, b) for m in LLM_MODELS for b in PAIR_BASELINES]
    rows = []
    for (dataset, split, candidates), models in groups.items():
        for a, b in pairs:
            if a not in models or b not in models:
                continue
            ea, eb = models[a], models[b]
            # LLM rows may cover only the first max_samples of the split: compare the common samples
            b_index = {sid: i for i, sid in enumerate(eb["sample_ids"])}
            common = [(i, b_index[sid]) for i, sid in enumerate(ea["sample_ids"]) if sid in b_index]
            if not common:
                continue
            ia, ib = [i for i, _ in common], [j for _, j in common]
            for metric in PAIR_METRICS:
                if metric not in ea["values"] or metric not in eb["values"]:
                    continue
                d = paired_bootstrap_diff(ea["values"][metric][ia], eb["values"][metric][ib],
                                          n_resamples=n_resamples, seed=seed)
                rows.append({"a": a, "b": b, "dataset": dataset, "split": split, "candidates": candidates,
                             "n": len(common), "metric": metric, **d})
    return rows


def paired_table(rows: list[dict]) -> str:
    """Markdown table, one row per pair, cells like `+0.0529 [0.01,0.09]*` (* = interval excludes 0)."""
    metrics = [m for m in PAIR_METRICS if any(r["metric"] == m for r in rows)]
    several = len({(r["dataset"], r["split"], r["candidates"]) for r in rows}) > 1
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        label = f"{r['a']} − {r['b']}"
        if several:
            label += f" ({r['split']}, {r['candidates']} cand)"
        lo, hi = r["ci95"]
        mark = "*" if lo > 0 or hi < 0 else ""
        cells.setdefault((label, r["n"]), {})[r["metric"]] = f"{r['diff']:+.4f} [{lo:.2f},{hi:.2f}]{mark}"
    header = ["pair", "n", *metrics]
    body = [[label, str(n), *(c.get(m, "-") for m in metrics)] for (label, n), c in cells.items()]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    return "\n".join(lines)


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
    entries = _collect_records(run_dir)
    records = [record for _, record in entries]
    if records:
        # check every saved ranking before writing anything: a table its rankings contradict is not written
        pairs = paired_differences(collect_evidence(run_dir, entries))
        atomic_write_json(run_dir / "results.json", records)
        md = format_table(records) + "\n"
        out["table"] = format_table(records)
        if pairs:
            out["paired"] = (f"{PAIRED_TITLE}\n\n{paired_table(pairs)}\n\n"
                             "`*`: the 95% interval of the difference excludes 0; "
                             "n: samples both models were evaluated on.")
            md += "\n" + out["paired"] + "\n"
            atomic_write_json(run_dir / "paired.json", pairs)
        else:
            (run_dir / "paired.json").unlink(missing_ok=True)  # stale from an earlier report
        order = order_table(records)
        if order:
            out["order"] = order
            md += "\n" + order + "\n"
        atomic_write_text(run_dir / "results.md", md)
    return out


def order_table(records: list[dict]) -> str:
    """Candidate-order sensitivity of the LLM rows (eval.order_shuffles): the same samples scored with
    the candidate list in the prompt as stored and shuffled; a ranker that reads the evidence barely moves."""
    rows = [r for r in records if r.get("order_sensitivity")]
    if not rows:
        return ""
    lines = ["Candidate-order sensitivity (same samples, candidate list shuffled in the prompt)", "",
             "| model | n | HR@3 as stored | HR@3 shuffled | NDCG@3 as stored | NDCG@3 shuffled | top-1 unchanged |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["order_sensitivity"]
        shuffled = o["shuffled"]
        hr = ", ".join(f"{x['HR@3']:.3f}" for x in shuffled)
        ndcg = ", ".join(f"{x['NDCG@3']:.3f}" for x in shuffled)
        top1 = ", ".join(f"{a:.2f}" for a in o["top1_agreement"])
        lines.append(f"| {r['model']} | {o['n']} | {o['original']['HR@3']:.3f} | {hr} | "
                     f"{o['original']['NDCG@3']:.3f} | {ndcg} | {top1} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, nargs="?", default=None,
                   help="a run directory, e.g. runs/quickstart (default: <runs_dir>/<name> of --config)")


def main(args: argparse.Namespace) -> int:
    if args.run_dir is None:
        from jobs.common import stage_config

        args.run_dir = stage_config(args).run_dir
    if not args.run_dir.is_dir():
        print(f"error: run directory {args.run_dir} does not exist")
        return 2
    try:
        out = write_report(args.run_dir)
    except ValueError as e:  # a record or rankings file that contradicts the data: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "grpo" in out:
        g = out["grpo"]
        print(f"GRPO: {g['steps']} steps, reward {g['reward_start']:.3f} -> {g['reward_end']:.3f}, "
              f"sync {g['sync_s_mean']:.2f} s vs step {g['step_s_mean']:.1f} s (mean)")
        print(f"reward curve: {out['reward_curve']}")
    if "table" in out:
        print(out["table"])
    if "paired" in out:
        print("\n" + out["paired"])
    if not out:
        print(f"nothing to report in {args.run_dir} (no grpo/metrics.jsonl, no eval/*.json)")
    return 0
