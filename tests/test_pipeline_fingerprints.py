"""Config-aware skipping (`mllmrec_ray.fingerprint`) and the pipeline runner's console.

The pure logic is tested as functions. The runner (`jobs.pipeline.main`) is tested on the
real quickstart plan with every stage swapped for a stand-in process that writes the
stage's completion marker and prints a little (milliseconds per stage, no Ray: RAY_ADDRESS
is set so no local head is started).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from mllmrec_ray import fingerprint as fp
from mllmrec_ray.config import PipelineConfig, to_dict

REPO = Path(__file__).resolve().parent.parent
ALL = ["prepare", "seqrec", "pop", "sasrec", "random", "min-id", "collab", "textualize", "cot", "mda", "sft",
       "grpo", "eval-base", "eval-sft", "eval-grpo", "report"]

# ----------------------------------------------------------------------------- pure logic


def test_config_keys_read_per_stage():
    cfg = to_dict(PipelineConfig())
    grpo = fp.config_keys_read("grpo", cfg)
    assert "grpo.lr" in grpo and "model.lora.r" in grpo and "prompt.with_captions" in grpo
    assert not any(k.startswith(("sft.", "eval.", "serve.", "data.")) for k in grpo)
    sft = fp.config_keys_read("sft", cfg)
    assert "sft.lr" in sft and not any(k.startswith("grpo.") for k in sft)
    # checkpoint cadence changes where a run can resume, not what it writes
    assert "sft.checkpoint_every" not in sft and "grpo.keep_checkpoints" not in grpo
    cot = fp.config_keys_read("cot", cfg)
    assert "stage1.max_cot_samples" in cot and "data.seed" in cot
    # a key at None (an optional feature left off) compares like a key that did not exist yet, so a
    # record made before the key was added still matches; set, it counts
    old = {"argv": [], "config": {k: v for k, v in cot.items() if k != "stage1.max_cot_samples"}}
    assert cot["stage1.max_cot_samples"] is None
    assert fp.comparable(old, "cot") == fp.comparable({"argv": [], "config": cot}, "cot")
    assert fp.comparable(old, "cot") != fp.comparable({"argv": [], "config": {**cot, "stage1.max_cot_samples": 12}},
                                                      "cot")
    # a record holding a key the stage no longer reads (checkpoint cadence) still matches
    recorded = {"argv": [], "config": {**grpo, "grpo.checkpoint_every": 2}}
    assert fp.comparable(recorded, "grpo") == fp.comparable({"argv": [], "config": grpo}, "grpo")
    # parallelism only (the part stores never key on it), and MDA's own knobs
    assert not any(k.startswith(("stage1.pool_size", "stage1.batch_size", "stage1.resources", "stage1.p_sft"))
                   for k in cot)
    ev = fp.config_keys_read("eval-sft", cfg)
    assert "eval.readout" in ev and "eval.models" not in ev
    assert fp.config_keys_read("pop", cfg) == {}  # a baseline gets everything on its command line
    other = fp.config_keys_read("some-new-stage", cfg)  # unknown stage: everything but serve / where the run lives
    assert "grpo.lr" in other and "serve.port" not in other and "name" not in other and "ray_num_cpus" not in other


def test_normalize_argv_and_settings_diff():
    argv = ["eval", "--data", "/r/q/data", "--model", "smollm2-135m", "--out", "/r/q/eval/base.json", "/r/q"]
    assert fp.normalize_argv(argv, "/r/q") == ["eval", "--data", "<run>/data", "--model", "smollm2-135m",
                                               "--out", "<run>/eval/base.json", "<run>"]
    old = {"argv": ["b", "--seed", "42"], "config": {"grpo.lr": 1e-4, "grpo.steps": 5}}
    new = {"argv": ["b", "--seed", "7"], "config": {"grpo.lr": 5e-5, "grpo.steps": 5}}
    assert fp.settings_diff(old, new) == ["grpo.lr 0.0001 -> 5e-05", "--seed 42 -> 7"]


def test_dependencies():
    deps = fp.dependencies(ALL, with_captions=True)
    assert deps["prepare"] == []
    assert deps["pop"] == ["prepare"] and deps["collab"] == ["prepare"]
    assert fp.dependencies(["prepare", "sasrec-full"], with_captions=False)["sasrec-full"] == ["prepare"]
    assert deps["grpo"] == ["prepare", "seqrec", "textualize", "cot", "mda", "sft"]
    assert deps["eval-base"] == ["prepare", "seqrec", "textualize"]
    assert deps["eval-grpo"] == ["prepare", "seqrec", "textualize", "cot", "mda", "sft", "grpo"]
    assert deps["report"] == ALL[:-1]
    assert fp.dependencies(ALL, with_captions=False)["eval-base"] == ["prepare", "seqrec"]
    # a stage the graph does not know depends on everything planned before it
    assert fp.dependencies(["prepare", "pop", "new"], with_captions=False)["new"] == ["prepare", "pop"]


def _states(settings=None, exists=True):
    names = ["prepare", "sft", "grpo", "eval-grpo"]
    deps = fp.dependencies(names, with_captions=False)
    return [fp.StageState(n, (settings or {}).get(n, {"argv": [n], "config": {}}), deps[n],
                          output_exists=exists) for n in names]


def _records(states):
    records: dict = {}
    for s in states:
        records[s.name] = fp.make_record(fp.attempt_for(s.name, s.settings, s.ancestors, records))
    return records


def test_decide_reasons():
    states = _states()
    records = _records(states)
    assert [d.line() for d in fp.decide(states, records)] == [
        "prepare: skip (up to date)", "sft: skip (up to date)", "grpo: skip (up to date)",
        "eval-grpo: skip (up to date)"]
    changed = _states({"grpo": {"argv": ["grpo"], "config": {"grpo.lr": 2}}})
    assert [d.line() for d in fp.decide(changed, records)][1:] == [
        "sft: skip (up to date)", "grpo: run (settings changed: grpo.lr <unset> -> 2)",
        "eval-grpo: run (upstream grpo reruns)"]
    assert [d.run for d in fp.decide(states, records, force={"sft"})] == [False, True, True, True]
    assert fp.decide(states, records, force={"sft"})[2].reason == "upstream sft reruns"
    only = fp.decide(states, records, only={"sft"}, force={"sft"})
    assert [d.line() for d in only] == ["prepare: not in --only".replace(": ", ": skip (") + ")",
                                        "sft: run (forced)", "grpo: skip (not in --only)",
                                        "eval-grpo: skip (not in --only)"]
    # sft reran alone since: grpo consumed the older sft output
    rerun = dict(records, sft=fp.make_record(fp.attempt_for("sft", states[1].settings, states[1].ancestors, records)))
    assert [d.line() for d in fp.decide(states, rerun)][2:] == [
        "grpo: run (upstream sft was rerun since)", "eval-grpo: run (upstream grpo reruns)"]
    assert fp.decide(states, dict(records, sft=None))[1].reason == "no fingerprint recorded"
    assert fp.decide(_states(exists=False), records)[0].reason == "output missing"
    report = fp.StageState("report", {"argv": ["report"], "config": {}}, ["prepare"], has_marker=False)
    assert fp.decide([report], {})[0].line() == "report: run (always rebuilt from the stage outputs)"


def test_fingerprint_includes_upstream():
    s = {"argv": ["x"], "config": {"a": 1}}
    assert fp.fingerprint(s, {"sft": "1"}) != fp.fingerprint(s, {"sft": "2"})
    assert fp.fingerprint(s, {"sft": "1"}) == fp.fingerprint(json.loads(json.dumps(s)), {"sft": "1"})


def test_progress_parsing_and_eta():
    from jobs.pipeline import Progress, parse_progress

    assert parse_progress("(RayTrainWorker pid=12) [sft] step 3/12 epoch 1 loss 2.1") == ("sft", 3, 12, "step")
    assert parse_progress("[grpo] step 2/5 reward 0.4") == ("grpo", 2, 5, "step")
    assert parse_progress("[refined] 12/24 rows finished (0.33 rows/s)") == ("refined", 12, 24, "row")
    assert parse_progress("eval sft (score):  40%|####      | 76/189 [01:10<01:45,  1.07sample/s]") == (
        "eval sft (score)", 76, 189, "sample")
    assert parse_progress("loading weights") is None
    p = Progress()
    assert p.update("sft", 1, 12, "step", now=100.0) == "1/12"
    assert p.update("sft", 3, 12, "step", now=140.0) == "3/12, 20.0 s/step, ETA 3m00s"
    assert p.update("eval", 50, 100, "sample", now=150.0) == "50/100"  # a new bar starts over
    assert p.update("eval", 100, 100, "sample", now=160.0) == "100/100, 5.00 sample/s"


# ----------------------------------------------------------------------------- the runner

FAKE_STAGE = r"""
import json, os, sys, time
from pathlib import Path
spec = json.loads(sys.argv[1])
name, run = spec["name"], Path(spec["run"])
ckpt = run / "grpo" / "checkpoints" / "latest"
with open(spec["ran"], "a") as f:
    f.write(name + (" resumed" if name == "grpo" and ckpt.exists() else "") + "\n")
print("engine chatter that stays in the log", flush=True)
if os.environ.get("FAKE_FAIL") == name:
    if name == "grpo":
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_text("step_000002\n")
    for i in range(30):
        print(f"fail line {i}")
    sys.exit(3)
for i in range(1, 4):
    print(f"[{name}] step {i}/3", flush=True)
    if os.environ.get("FAKE_SLOW"):
        time.sleep(0.05)
if spec["done"]:
    Path(spec["done"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["done"]).write_text("{}")
"""


class Runner:
    def __init__(self, tmp_path: Path, monkeypatch, capsys):
        import jobs.pipeline as pipeline

        self.pipeline, self.capsys, self.tmp = pipeline, capsys, tmp_path
        self.ran_file = tmp_path / "ran.txt"
        self.run_dir = tmp_path / "runs" / "quickstart"
        # an image folder that exists wherever the clone lives: the quickstart's ../shared path may not,
        # and the pipeline's note about it would add a console line
        self.posters = tmp_path / "posters"
        self.posters.mkdir()
        script = tmp_path / "fake_stage.py"
        script.write_text(FAKE_STAGE)
        specs: dict[tuple, str] = {}
        real_plan = pipeline.plan

        def plan(cfg, config_path, run_dir):
            stages = real_plan(cfg, config_path, run_dir)
            for name, argv, done in stages:
                specs[tuple(argv)] = json.dumps({"name": name, "done": str(done) if done else None,
                                                 "run": str(run_dir), "ran": str(self.ran_file)})
            return stages

        monkeypatch.setattr(pipeline, "plan", plan)
        monkeypatch.setattr(pipeline, "stage_command", lambda argv: [sys.executable, str(script), specs[tuple(argv)]])
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # stand-in stages: no local head
        monkeypatch.chdir(REPO)

    def __call__(self, *extra: str) -> tuple[int, str, str, list[str]]:
        parser = argparse.ArgumentParser()
        self.pipeline.add_arguments(parser)
        args = parser.parse_args(["--config", "configs/quickstart.yaml", "--set", f"runs_dir={self.tmp / 'runs'}",
                                  "--set", f"data.images={self.posters}",
                                  *extra])
        self.ran_file.unlink(missing_ok=True)
        self.capsys.readouterr()
        rc = self.pipeline.main(args)
        out, err = self.capsys.readouterr()
        ran = self.ran_file.read_text().split("\n")[:-1] if self.ran_file.exists() else []
        return rc, out, err, ran


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    return Runner(tmp_path, monkeypatch, capsys)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def test_fresh_run_then_everything_current(run):
    rc, out, err, ran = run()
    assert rc == 0, out + err
    assert ran == ALL
    lines = out.splitlines()
    assert len(lines) <= 2 * len(ALL) + 3, out  # a run line and a done line per stage
    assert "prepare: run (output missing)" in lines and "report: run (always rebuilt from the stage outputs)" in lines
    assert any(line.startswith("grpo: done in ") for line in lines)
    assert "chatter" not in out and "step 1/3" not in out  # the stage output is in its log only
    assert "engine chatter" in (run.run_dir / "logs" / "sft.log").read_text()
    for name in ALL:
        rec = json.loads((run.run_dir / "fingerprints" / f"{name}.json").read_text())
        assert rec["stage"] == name and rec["fingerprint"] and rec["run_id"]
        assert not (run.run_dir / "fingerprints" / f"{name}.attempt.json").exists()
    grpo = json.loads((run.run_dir / "fingerprints" / "grpo.json").read_text())
    assert grpo["settings"]["config"]["grpo.lr"] == 1e-4 and set(grpo["upstream"]) == {
        "prepare", "seqrec", "textualize", "cot", "mda", "sft"}
    assert str(run.tmp) not in json.dumps(grpo["settings"])  # paths of the run only locate outputs
    config = run.run_dir / "config.yaml"
    assert config.read_text().startswith("# Resolved config")
    stamp = config.stat().st_mtime_ns

    rc, out, err, ran = run()
    assert rc == 0 and ran == ["report"], out
    assert "grpo: skip (up to date)" in out.splitlines()
    assert config.stat().st_mtime_ns == stamp  # no stage reading it ran: not rewritten


def test_changing_one_grpo_key_reruns_grpo_and_downstream_only(run):
    assert run()[0] == 0
    before = tree(run.run_dir)
    rc, out, err, ran = run("--set", "grpo.lr=0.00005", "--dry-run")
    assert rc == 0 and ran == [] and tree(run.run_dir) == before  # --dry-run writes nothing
    assert out.splitlines() == [
        "prepare: skip (up to date)", "seqrec: skip (up to date)", "pop: skip (up to date)",
        "sasrec: skip (up to date)", "random: skip (up to date)", "min-id: skip (up to date)",
        "collab: skip (up to date)", "textualize: skip (up to date)", "cot: skip (up to date)",
        "mda: skip (up to date)", "sft: skip (up to date)",
        "grpo: run (settings changed: grpo.lr 0.0001 -> 5e-05)",
        "eval-base: skip (up to date)", "eval-sft: skip (up to date)",
        "eval-grpo: run (upstream grpo reruns)", "report: run (always rebuilt from the stage outputs)"]
    rc, out, err, ran = run("--set", "grpo.lr=0.00005")
    assert rc == 0 and ran == ["grpo", "eval-grpo", "report"], out
    assert "lr: 5.0e-05" in (run.run_dir / "config.yaml").read_text()
    assert run("--set", "grpo.lr=0.00005")[3] == ["report"]


def test_force_reruns_downstream_and_only_limits(run):
    assert run()[0] == 0
    assert run("--force", "sft")[3] == ["sft", "grpo", "eval-sft", "eval-grpo", "report"]
    # sft alone: what consumed the older sft output is stale afterwards
    assert run("--only", "sft", "--force", "sft")[3] == ["sft"]
    rc, out, err, ran = run("--dry-run")
    assert "grpo: run (upstream sft was rerun since)" in out.splitlines()
    assert "eval-base: skip (up to date)" in out.splitlines()
    assert run()[3] == ["grpo", "eval-sft", "eval-grpo", "report"]


def test_unknown_stage_names_are_rejected(run):
    for option in ("--only", "--force"):
        rc, out, err, ran = run(option, "sft,gpro")
        assert rc == 2 and ran == [] and out == ""
        assert err.count("\n") == 1 and err.startswith(f"error: {option}: unknown stage 'gpro'; stages of this run:")
    assert not run.run_dir.exists()


def test_stage_without_record_reruns_with_downstream(run):
    assert run()[0] == 0
    (run.run_dir / "fingerprints" / "mda.json").unlink()  # e.g. made before fingerprints existed
    rc, out, err, ran = run()
    assert "mda: run (no fingerprint recorded)" in out.splitlines()
    assert ran == ["mda", "sft", "grpo", "eval-sft", "eval-grpo", "report"]


def test_failure_prints_log_tail_and_records_nothing(run, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "sft")
    rc, out, err, ran = run()
    assert rc == 1 and ran[-1] == "sft"
    log = run.run_dir / "logs" / "sft.log"
    assert f"sft: FAILED (exit code 3) after 0 s; last lines of {log}:" in out
    assert "    fail line 29" in out and "fail line 10" in out and "fail line 9" not in out
    assert err.startswith("error: stage sft failed (exit code 3); full output in")
    assert not (run.run_dir / "fingerprints" / "sft.json").exists()
    monkeypatch.delenv("FAKE_FAIL")
    rc, out, err, ran = run()  # continues where it stopped
    assert rc == 0 and ran == ["sft", "grpo", "eval-base", "eval-sft", "eval-grpo", "report"]
    assert "sft: run (output missing)" in out.splitlines() and "mda: skip (up to date)" in out.splitlines()


def test_rerun_removes_the_completion_marker_first(run, monkeypatch):
    assert run()[0] == 0
    done = run.run_dir / "models" / "sft" / "mllmrec_complete.json"
    monkeypatch.setenv("FAKE_FAIL", "sft")
    assert run("--set", "sft.lr=0.001")[0] == 1
    assert not done.exists()  # the stale model no longer looks complete
    assert not (run.run_dir / "fingerprints" / "sft.json").exists()


def test_grpo_resumes_only_an_attempt_with_the_same_fingerprint(run, monkeypatch):
    assert run()[0] == 0
    monkeypatch.setenv("FAKE_FAIL", "grpo")
    assert run("--force", "grpo")[0] == 1  # leaves a checkpoint behind
    monkeypatch.delenv("FAKE_FAIL")
    rc, out, err, ran = run("--dry-run")
    assert "grpo: run (output missing; resuming the interrupted attempt (same fingerprint))" in out.splitlines()
    rc, out, err, ran = run()
    assert ran[0] == "grpo resumed", ran
    monkeypatch.setenv("FAKE_FAIL", "grpo")
    assert run("--force", "grpo")[0] == 1
    monkeypatch.delenv("FAKE_FAIL")
    rc, out, err, ran = run("--set", "grpo.lr=0.00005")
    assert "grpo: run (output missing; clearing grpo/ (made by another attempt))" in out.splitlines()
    assert ran[0] == "grpo", ran  # started over: the checkpoint of other settings was cleared


def test_progress_line_with_rate(run, monkeypatch):
    import jobs.pipeline as pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setenv("FAKE_SLOW", "1")
    rc, out, err, ran = run("--only", "prepare")
    assert rc == 0 and ran == ["prepare"]
    progress = [line for line in out.splitlines() if line.startswith("prepare: step ")]
    assert progress and ("s/step" in progress[-1] or "step/s" in progress[-1]), out


def test_raylet_warnings_go_to_the_run_log_not_the_console(tmp_path, monkeypatch, capsys):
    """Ray prints cluster-wide raylet warnings on every driver; the pipeline's go to logs/ray.log."""
    import types

    import ray._private.worker as ray_worker

    import jobs.common
    from jobs import pipeline

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    monkeypatch.setattr(jobs.common, "start_local_ray",
                        lambda *a, **k: types.SimpleNamespace(address_info={"address": "127.0.0.1:1"}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pipeline._start_head(pipeline.PipelineConfig(), pipeline.Console(), tmp_path / "logs")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes"], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr()
    assert "PYTHON worker" not in out.out + out.err and "local Ray cluster at 127.0.0.1:1" in out.out
    assert "(raylet) WARNING: 8 PYTHON worker processes" in (tmp_path / "logs" / "ray.log").read_text()


def test_raising_grpo_steps_continues_from_the_checkpoint(run):
    assert run()[0] == 0
    ckpt = run.run_dir / "grpo" / "checkpoints" / "latest"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text("step_000005\n")
    rc, out, err, ran = run("--set", "grpo.steps=8")
    assert rc == 0 and ran == ["grpo resumed", "eval-grpo", "report"], out
    assert "grpo: run (settings changed: grpo.steps 5 -> 8; continuing from its last checkpoint " \
           "(only grpo.steps raised))" in out.splitlines()
    # fewer steps, or another key changed with them: the checkpoint is of another run, start over
    for extra in (["--set", "grpo.steps=6"], ["--set", "grpo.steps=9", "--set", "grpo.lr=0.00005"]):
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_text("step_000008\n")
        rc, out, err, ran = run(*extra)
        assert rc == 0 and ran[0] == "grpo", (extra, out)
        assert any(line.startswith("grpo: run") and "clearing grpo/" in line for line in out.splitlines()), out


def test_sigterm_unwinds_after_the_local_head_started(tmp_path):
    """ray.init replaces the SIGTERM handler with one that dumps a stack and exits; the pipeline must
    get it back, or `kill` skips stopping the running stage and the head."""
    import subprocess

    code = (
        "import os, signal, time\n"
        "from pathlib import Path\n"
        "import jobs.pipeline as p\n"
        "from mllmrec_ray.config import load_config\n"
        "os.environ.pop('RAY_ADDRESS', None)\n"
        "cfg = load_config('configs/quickstart.yaml', ['ray_num_cpus=1'])\n"
        f"ray = p._start_head(cfg, p.Console(), Path({str(tmp_path)!r}))\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('unwound', flush=True)\n"
        "finally:\n"
        "    ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "unwound" in out.stdout, out.stdout + out.stderr


def test_a_switch_added_later_left_off_still_matches_old_records():
    old = {"argv": [], "config": {"grpo.lr": 1e-4}}
    for value, same in ((False, True), (None, True), (True, False)):
        new = {"argv": [], "config": {"grpo.lr": 1e-4, "prompt.collab_seq": value}}
        assert (fp.comparable(old, "sft") == fp.comparable(new, "sft")) is same, value
