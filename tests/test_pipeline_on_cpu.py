"""`mllmrec pipeline` end to end on real (cheap) stages: prepare + two baselines on a tiny csv dataset.

Checks what a user sees: one line per stage on the console, the stage output in
`logs/<stage>.log`, fingerprints written, a rerun that skips, and a changed key that reruns
exactly the stages reading it. No Ray is started (these stages do not use it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tiny_dataset(folder: Path, users: int = 20, items: int = 30, per_user: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user,item,timestamp"] + [f"u{u},{(u * 7 + k * 3) % items},{1_000_000 + u * 100 + k}"
                                       for u in range(users) for k in range(per_user)]
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n")
    (folder / "items.csv").write_text("item,title\n" + "".join(f"{i},Movie number {i}\n" for i in range(items)))
    return folder


def pipeline(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(BIN / "mllmrec"), "pipeline", "--config", str(config), "--only", "prepare,pop,random",
                           *extra], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_pipeline_real_stages_skip_and_rerun(tmp_path):
    raw = tiny_dataset(tmp_path / "raw")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\nruns_dir: {tmp_path / 'runs'}\n"
                      f"data: {{dataset: null, format: csv, path: {raw}, images: null, negatives_large: 0}}\n"
                      "eval: {models: [pop, random]}\n")
    run_dir = tmp_path / "runs" / "tiny"

    r = pipeline(config)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[1:] == [
        "prepare: run (output missing)", lines[2], "pop: run (output missing)", lines[4],
        "random: run (output missing)", lines[6],
        "textualize: skip (not in --only)", "cot: skip (not in --only)", "mda: skip (not in --only)",
        "sft: skip (not in --only)", "grpo: skip (not in --only)", "report: skip (not in --only)", lines[-1]]
    assert all(lines[i].split(": done in ")[0] == n for i, n in ((2, "prepare"), (4, "pop"), (6, "random")))
    assert lines[-1].startswith("[pipeline] finished in") and r.stderr == ""
    assert "loading csv data" in (run_dir / "logs" / "prepare.log").read_text()  # the stage's own output
    assert json.loads((run_dir / "eval" / "random.json").read_text())
    assert not (run_dir / "config.yaml").exists()  # no stage that reads it ran
    for name in ("prepare", "pop", "random"):
        assert json.loads((run_dir / "fingerprints" / f"{name}.json").read_text())["stage"] == name

    r = pipeline(config)
    assert r.returncode == 0 and "prepare: skip (up to date)" in r.stdout and " done in " not in r.stdout

    r = pipeline(config, "--set", "data.seed=7", "--dry-run")
    assert r.stdout.splitlines()[:3] == [
        "prepare: run (settings changed: data.seed 42 -> 7, --seed 42 -> 7)",
        "pop: run (settings changed: --seed 42 -> 7)", "random: run (settings changed: --seed 42 -> 7)"]
