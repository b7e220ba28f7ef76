"""The CLI's failure paths: one `error:` line naming the key or file, exit 2, no traceback, nothing written.

Every stage that reads the pipeline config takes the same --config / --set (added and validated in
jobs.cli before the stage runs); `mllmrec submit` validates before it submits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.cli import CONFIG_COMMANDS, build_parser, main
from mllmrec_ray.io import atomic_write_parquet

REPO = Path(__file__).resolve().parent.parent

# the examples: key, value, and what the message must say about them
BAD = [
    ("grpo.steps", "-3", "-3 is out of range (allowed: an integer >= 0)"),
    ("stage1.p_sft", "7", "7 is out of range (allowed: a number in [0, 1])"),
    ("sft.zero_stage", "9", "9 is out of range (allowed: an integer in [0, 3])"),
    ("model.engine.dtype", "bfloat61", "'bfloat61' is not allowed (allowed: one of 'auto', 'bfloat16', 'float32')"),
    ("grpo.group_size", "0", "0 is out of range (allowed: an integer >= 1)"),
]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("key,value,said", BAD, ids=[k for k, _, _ in BAD])
def test_bad_value_is_one_error_line_and_nothing_is_written(tmp_path, capsys, key, value, said):
    runs = tmp_path / "runs"
    rc = main(["pipeline", "--config", str(REPO / "configs" / "quickstart.yaml"), "--set", f"runs_dir={runs}",
               "--set", f"{key}={value}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert _one_error_line(err) == f"error: {key}: {said}; from --set {key}={value}"
    assert not runs.exists()
    # a stage run alone stops the same way, before it reads its inputs or creates its output
    model_out = tmp_path / "run" / "models" / "sft"
    rc = main(["sft", "--data", str(tmp_path / "no-data"), "--out", str(model_out), "--set", f"{key}={value}"])
    assert rc == 2 and _one_error_line(capsys.readouterr().err).startswith(f"error: {key}: {said}")
    assert not (tmp_path / "run").exists()


# every sub-command that runs a stage, with its required arguments
STAGES = {"evidence": ["--data", "d"], "textualize": ["--data", "d", "--out", "o"], "cot": ["--data", "d", "--stage1", "s"],
          "mda": ["--data", "d", "--stage1", "s"], "sft": ["--data", "d"], "grpo": [],
          "eval": ["--data", "d", "--model", "m"], "serve": ["--data", "d", "--model", "m"], "pipeline": [],
          "data prepare": ["--dataset", "ml-100k", "--out", "o"], "baseline": ["--data", "d", "--model", "pop",
                                                                               "--out", "o.json"],
          "report": ["r"]}


def _subparser(name: str):
    parser = build_parser()
    for part in name.split():
        parser = parser._subparsers._group_actions[0].choices[part]
    return parser


def test_every_config_stage_takes_config_and_set_in_one_place(tmp_path, capsys):
    assert set(STAGES) == CONFIG_COMMANDS
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {zero_stage: 9}\n")
    for stage, args in STAGES.items():
        assert {"--config", "--set"} <= set(_subparser(stage)._option_string_actions), stage
        assert main([*stage.split(), *args, "--set", "grpo.steps=-3"]) == 2
        assert _one_error_line(capsys.readouterr().err).startswith("error: grpo.steps: -3 is out of range"), stage
        assert main([*stage.split(), *args, "--config", str(bad)]) == 2
        assert _one_error_line(capsys.readouterr().err) == (
            f"error: sft.zero_stage: 9 is out of range (allowed: an integer in [0, 3]); in {bad}"), stage
    assert list(tmp_path.iterdir()) == [bad]  # nothing but the config file


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_help_shows_config(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([*stage.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mllmrec {stage} ") and "--config CONFIG" in out and "--set KEY=VALUE" in out


def test_commands_without_a_stage_config_do_not_take_it():
    for command in ("data fetch", "models", "jobs"):
        assert "--config" not in _subparser(command)._option_string_actions, command


@pytest.mark.parametrize("argv,key", [
    (["data", "prepare", "--dataset", "ml-100k", "--set", "data.min_inter=0"], "data.min_inter"),
    (["data", "prepare", "--dataset", "ml-100k", "--min-inter", "1"], "data.min_inter"),
    (["data", "prepare", "--dataset", "ml-100k", "--window-stride", "0"], "data.window_stride"),
    (["baseline", "--data", "d", "--model", "pop", "--set", "eval.split=tset"], "eval.split"),
    (["baseline", "--data", "d", "--model", "collab", "--collab", "3,3,1"], "prompt.collab_levels"),
    (["report", "--set", "name=../x"], "name"),
], ids=["prepare-set", "prepare-flag", "prepare-stride", "baseline-set", "baseline-collab", "report-set"])
def test_new_config_stages_bad_value_is_one_error_line(tmp_path, capsys, argv, key):
    out = ["--out", str(tmp_path / "out")] if argv[0] != "report" else []
    assert main([*argv, *out]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(f"error: {key}: ")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_prepare_bad_set_value_names_the_key(tmp_path, capsys):
    """The issue's example, as the real command line reports it."""
    rc = main(["data", "prepare", "--dataset", "ml-100k", "--out", str(tmp_path / "out"), "--set", "data.min_inter=0"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert _one_error_line(err) == ("error: data.min_inter: 0 is out of range (allowed: an integer >= 2); "
                                    "from --set data.min_inter=0")
    assert not (tmp_path / "out").exists()


def test_float_override_works(tmp_path, capsys):
    """`--set sft.lr=1e-5` was rejected (YAML 1.1 reads 1e-5 as a string)."""
    runs = tmp_path / "runs"
    rc = main(["pipeline", "--config", str(REPO / "configs" / "quickstart.yaml"), "--set", f"runs_dir={runs}",
               "--set", "sft.lr=1e-5", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "sft: run (output missing)" in out.splitlines() and not runs.exists()


def _prepared(tmp_path) -> Path:
    data = tmp_path / "data"
    atomic_write_parquet(pa.Table.from_pylist([{"sample_id": "u0", "split": "train"}]), data / "samples.parquet")
    atomic_write_parquet(pa.Table.from_pylist([{"item_id": "1", "title": "Film"}]), data / "items.parquet")
    return data


def test_bad_paths_name_the_option_or_file(tmp_path, capsys):
    data = _prepared(tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["sft", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m")], f"error: --data {tmp_path / 'nope'}: not found"),
        (["sft", "--data", str(a_file), "--out", str(tmp_path / "m")], f"error: --data {a_file}: not a directory"),
        (["sft", "--data", str(tmp_path), "--out", str(tmp_path / "m")],
         f"error: --data {tmp_path / 'samples.parquet'}: not found"),
        (["sft", "--data", str(data), "--out", str(a_file)], f"error: --out {a_file}: exists and is not a directory"),
        (["sft", "--data", str(data), "--out", str(a_file / "sub")], f"error: --out {a_file / 'sub'}: {a_file} is a file"),
        (["sft", "--data", str(data), "--out", str(tmp_path / "m"), "--cot", str(tmp_path / "c.parquet"),
          "--mda", str(tmp_path / "m.parquet")], f"error: --cot {tmp_path / 'c.parquet'}: not found"),
        (["sft", "--data", str(data), "--out", str(tmp_path / "m"), "--cot", str(a_file)], "error: --cot and --mda go together"),
        (["sft", "--data", str(data)], "error: mllmrec sft needs --out DIR"),
        (["grpo", "--run-dir", str(tmp_path / "run")], f"error: {tmp_path / 'run' / 'data' / 'samples.parquet'} not found"),
        (["mda", "--data", str(tmp_path / "nope"), "--stage1", str(tmp_path / "s1")],
         f"error: {tmp_path / 'nope' / 'items.parquet'}: not found"),
        (["sft"], "error: mllmrec sft: the following arguments are required: --data"),
        (["sft", "--data", str(data), "--epochs", "two"], "error: mllmrec sft: argument --epochs: invalid int value"),
        (["sft", "--data", str(data), "--out", str(tmp_path / "m"), "--epochs", "0"],
         "error: sft.epochs: 0 is out of range (allowed: an integer >= 1); from --epochs 0"),
        (["nosuchstage"], "error: mllmrec: argument COMMAND: invalid choice: 'nosuchstage'"),
    ]
    for argv, said in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(said), (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file.txt"]  # nothing written


def test_cli_process_exit_code_and_stderr(tmp_path):
    """The real command line: exit status 2, exactly one stderr line, no traceback, nothing written."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("MLLMREC_DEBUG", None)
    runs = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "pipeline", "--config", "configs/quickstart.yaml",
                        "--set", f"runs_dir={runs}", "--set", "grpo.steps=-3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "error: grpo.steps: -3 is out of range (allowed: an integer >= 0); from --set grpo.steps=-3"]
    assert not runs.exists()


def test_submit_validates_config_and_stage_arguments_before_submitting(tmp_path, capsys):
    """Nothing listens at the address: every case must fail before connecting."""
    address = ["--address", "http://127.0.0.1:9"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(REPO / "configs" / "quickstart.yaml") + "\nsft: {lr: -1.0e-5}\n")
    cases = [
        (["submit", "grpo", "--set", "grpo.steps=-3"], "error: grpo.steps: -3 is out of range"),
        (["submit", "sft", "--data", "d", "--config", str(bad)], "error: sft.lr: -1e-05 is out of range"),
        (["submit", "pipeline", "--set", "model.engine.dtype=bfloat61"], "error: model.engine.dtype: 'bfloat61' is not allowed"),
        (["submit", "sft", "--set", "sft.lr=1e-5"], "error: mllmrec sft: the following arguments are required: --data"),
        (["submit", "grpo", "--stepz", "1"], "error: mllmrec: unrecognized arguments: --stepz"),
    ]
    for argv, said in cases:
        assert main([*argv, *address]) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(said), (argv, line)
    # a valid config gets as far as connecting (and fails there, naming the address)
    assert main(["submit", "pipeline", "--set", "sft.lr=1e-5", "--set", f"runs_dir={tmp_path}", *address]) == 2
    assert "cannot submit to http://127.0.0.1:9" in _one_error_line(capsys.readouterr().err)
