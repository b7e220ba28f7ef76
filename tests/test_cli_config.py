"""`--config` / `--set` of `data prepare`, `baseline` and `report` (added in jobs.cli like every stage's).

The config supplies the defaults of their flags (data.*, eval.split, prompt.n_candidates, the collab
levels; report's run dir is <runs_dir>/<name>); a flag given on the command line wins; without a
config file the flags keep the defaults they had before --config existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.cli import build_parser, main
from mllmrec_ray.config import DataConfig

N_USERS, N_ITEMS = 30, 60


def tiny_csv(root: Path) -> Path:
    """30 users with 6..17 items each, at increasing times."""
    d = root / "src"
    d.mkdir()
    (d / "items.csv").write_text("item,name\n" + "".join(f"i{i},Item {i}\n" for i in range(N_ITEMS)))
    rows = ["user,item,ts"] + [f"u{u},i{(u * 7 + j * 3) % N_ITEMS},{100 + j}"
                               for u in range(N_USERS) for j in range(6 + u % 12)]
    (d / "interactions.csv").write_text("\n".join(rows) + "\n")
    return d


def write_config(path: Path, src: Path, runs: Path, **data) -> Path:
    data = {"dataset": None, "format": "csv", "path": str(src),
            "columns": {"user": "user", "item": "item", "timestamp": "ts", "title": "name"}, **data}
    path.write_text(json.dumps({"name": "tiny", "runs_dir": str(runs), "data": data}))  # JSON is YAML
    return path


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def parsed(argv: list[str]):
    return build_parser().parse_args(argv)


def test_prepare_flag_defaults_without_config_are_unchanged():
    """The argparse defaults of before (seed 0, min_inter 10, negatives 9/99, last windows, stride 1, no cap)
    are what a prepare without --config runs with, though DataConfig's seed is 42."""
    from jobs.data import prepare_settings

    s = prepare_settings(parsed(["data", "prepare", "--dataset", "ml-100k", "--out", "o"]))
    assert s == dict(dataset="ml-100k", fmt=None, path=None, columns=None, images=None, seed=0, min_inter=10,
                     negatives=9, negatives_large=99, train_windows="last", window_stride=1,
                     max_windows_per_user=None)
    d = DataConfig()
    assert (d.min_inter, d.negatives, d.negatives_large, d.train_windows, d.window_stride,
            d.max_windows_per_user) == (10, 9, 99, "last", 1, None)
    assert d.seed == 42  # the one default that differs: the command keeps its own 0
    # --set alone overlays those defaults; it does not switch to the config classes' seed
    s = prepare_settings(parsed(["data", "prepare", "--dataset", "ml-100k", "--out", "o",
                                 "--set", "data.negatives=4"]))
    assert (s["seed"], s["negatives"]) == (0, 4)


def test_prepare_takes_data_from_config_and_flags_win(tmp_path, capsys):
    src = tiny_csv(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", src, tmp_path / "runs", seed=7, min_inter=5, negatives_large=20,
                       train_windows="sliding", window_stride=2)
    # the source, the protocol and the windows all from the config
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / "a")]) == 0
    conf = manifest(tmp_path / "a")["config"]
    assert (conf["format"], conf["path"], conf["columns"]["timestamp"]) == ("csv", str(src.resolve()), "ts")
    assert (conf["seed"], conf["min_inter"], conf["negatives"], conf["negatives_large"]) == (7, 5, 9, 20)
    assert (conf["train_windows"], conf["window_stride"], conf["max_windows_per_user"]) == ("sliding", 2, None)
    # a flag given wins over the config; --set over the file; the rest still from the config
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / "b"), "--seed", "3",
                 "--min-inter", "6", "--train-windows", "last", "--set", "data.negatives=5"]) == 0
    conf = manifest(tmp_path / "b")["config"]
    assert (conf["seed"], conf["min_inter"], conf["negatives"], conf["negatives_large"]) == (3, 6, 5, 20)
    assert (conf["train_windows"], conf["window_stride"]) == ("last", 2)
    # the same settings given as flags alone make the same data
    assert main(["data", "prepare", "--format", "csv", "--path", str(src), "--columns",
                 "user=user,item=item,timestamp=ts,title=name", "--out", str(tmp_path / "c"), "--seed", "3",
                 "--min-inter", "6", "--negatives", "5", "--negatives-large", "20", "--window-stride", "2"]) == 0
    assert manifest(tmp_path / "c")["content_hash"] == manifest(tmp_path / "b")["content_hash"]
    capsys.readouterr()


def test_prepare_config_without_a_source_or_path(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {dataset: null}\n")
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: mllmrec data prepare: one of the arguments --dataset --format is required "
        f"(or data.dataset / data.format in {cfg}) (see mllmrec data prepare --help)")
    cfg.write_text("data: {dataset: null, format: csv}\n")
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: data.format csv needs data.path (or --path)"
    assert not (tmp_path / "o").exists()


def test_baseline_and_report_take_the_config(tmp_path, capsys):
    src = tiny_csv(tmp_path)
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.yaml", src, runs, seed=5, min_inter=5, negatives_large=0)
    run = runs / "tiny"
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(run / "data")]) == 0

    # eval.split and data.seed from the config, the flag default test without it
    cfg.write_text(cfg.read_text()[:-1] + ', "eval": {"split": "valid"}}')
    assert main(["baseline", "--config", str(cfg), "--data", str(run / "data"), "--model", "random",
                 "--out", str(run / "eval" / "random.json")]) == 0
    rec = json.loads((run / "eval" / "random.json").read_text())
    assert (rec["split"], rec["candidates"], rec["seed"]) == ("valid", 10, 5)
    assert main(["baseline", "--config", str(cfg), "--data", str(run / "data"), "--model", "min-id",
                 "--split", "test", "--set", "data.seed=9", "--out", str(run / "eval" / "min-id.json")]) == 0
    rec = json.loads((run / "eval" / "min-id.json").read_text())
    assert (rec["split"], rec["seed"]) == ("test", 9)
    ns = parsed(["baseline", "--data", "d", "--model", "collab", "--out", "o"])
    from jobs.baseline import resolve

    resolve(ns)  # without --config: the flags' defaults of before
    assert (ns.split, ns.candidates, ns.seed, ns.collab) == ("test", 10, 0, "3,3,5")
    ns = parsed(["baseline", "--data", "d", "--model", "collab", "--out", "o", "--set", "prompt.collab_levels=4",
                 "--set", "prompt.n_candidates=100"])
    resolve(ns)
    assert (ns.candidates, ns.collab) == (100, "3,3,4")

    # report: the run dir is <runs_dir>/<name> of the config when not given
    capsys.readouterr()
    assert main(["report", "--config", str(cfg)]) == 0
    assert "| random" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())[0]["model"] in ("random", "min-id")
    assert main(["report", "--config", str(cfg), "--set", "name=other"]) == 2
    assert f"run directory {runs / 'other'} does not exist" in capsys.readouterr().out


def test_submit_puts_the_config_after_the_prepare_sub_command(tmp_path):
    """`mllmrec submit data prepare --config X`: the job's command line parses (no job is submitted)."""
    import shlex

    from jobs.submit import build_job, split_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {min_inter: 5}\n")
    args = parsed(["submit", "data", "prepare", "--dataset", "ml-100k", "--out", "o", "--config", str(cfg),
                   "--address", "http://127.0.0.1:9"])
    job = build_job(args, split_args(args))
    argv = shlex.split(job["entrypoint"].split("exec ", 1)[1])
    i = argv.index("jobs.cli")
    assert argv[i + 1:i + 5] == ["data", "prepare", "--config", "$CFG"]
    assert parsed(argv[i + 1:]).out == "o"


@pytest.mark.parametrize("argv", [["data", "prepare", "--dataset", "ml-100k", "--out", "o"],
                                  ["baseline", "--data", "d", "--model", "pop", "--out", "o"], ["report", "r"]])
def test_new_config_stages_parse_config_and_set(argv):
    ns = parsed([*argv, "--config", "c.yaml", "--set", "a.b=1", "--set", "c.d=2"])
    assert ns.config == "c.yaml" and ns.set == ["a.b=1", "c.d=2"]
