"""The keyed part store behind resumable Stage I steps, and the storing step that sanitises."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mllmrec_ray.stage1.store import store_generations
from mllmrec_ray.stage1.store import PartStore, content_hash, row_key


def test_row_key_changes_with_every_part():
    base = row_key("pseudo", "u1", "h", "m", "v1")
    assert base == row_key("pseudo", "u1", "h", "m", "v1")
    others = [row_key("refined", "u1", "h", "m", "v1"), row_key("pseudo", "u2", "h", "m", "v1"),
              row_key("pseudo", "u1", "h2", "m", "v1"), row_key("pseudo", "u1", "h", "m2", "v1"),
              row_key("pseudo", "u1", "h", "m", "v2")]
    assert len({base, *others}) == 6
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})


def test_store_write_read_select_and_idempotent_names(tmp_path):
    store = PartStore(tmp_path / "parts")
    assert store.read() is None and store.finished_keys() == set()
    t1 = pa.table({"key": ["a", "b"], "v": [1, 2]})
    p1 = store.write(t1)
    assert store.write(pa.table({"key": ["b", "a"], "v": [2, 1]})) == p1  # same keys -> same file
    store.write(pa.table({"key": ["c"], "v": [3]}))
    assert store.finished_keys() == {"a", "b", "c"}
    assert store.select(["c", "zz", "a"]).to_pylist() == [{"key": "c", "v": 3}, {"key": "a", "v": 1}]
    assert store.write(pa.table({"key": [], "v": []})) is None
    # a temp file left by a crash mid-write is never read
    (store.root / ".part-x.parquet.123.tmp").write_bytes(b"garbage")
    assert store.finished_keys() == {"a", "b", "c"}


def test_store_generations_sanitises_and_never_stores_raw_text(tmp_path):
    batch = {"key": np.array(["k1", "k2", "k3"]), "sample_id": np.array(["u1", "u2", "u3"]),
             "text": np.array(["I bet on Heat (1995), [ITEM_12].", "Step 4: a calm drama.", ""]),
             "finish_reason": np.array(["stop", "length", "stop"]), "completion_tokens": np.array([9, 7, 0])}
    targets = {"u1": ("12", "Heat", ["12", "5"]), "u2": ("7", "Fargo", ["7"]), "u3": ("8", "Jaws", ["8"])}
    out = store_generations(batch, str(tmp_path), targets, constants={"model": "m", "prompt_version": "v"})
    assert out == {"n": [3]}
    rows = {r["sample_id"]: r for r in PartStore(tmp_path).read().to_pylist()}
    assert "text" not in rows["u1"]
    assert rows["u1"]["cot"] == "I bet on [MASKED] (1995), [MASKED]." and rows["u1"]["n_masks"] == 2
    assert rows["u2"]["cot"] == "Step 4: a calm drama." and rows["u2"]["n_masks"] == 0
    assert rows["u3"]["cot"] is None and rows["u3"]["dropped"] is False
    assert rows["u1"]["model"] == "m" and rows["u1"]["prompt_version"] == "v"
    files = list(tmp_path.glob("part-*.parquet"))
    assert len(files) == 1 and pq.read_table(files[0]).num_rows == 3


def test_store_generations_keeps_each_generator_calls_batch_id(tmp_path):
    # Ray Data can hand the store one block holding two generator calls: their ids (and times) stay apart.
    batch = {"key": np.array(["k1", "k2", "k3"]), "sample_id": np.array(["u1", "u2", "u3"]),
             "text": np.array(["a", "b", "c"]), "batch": np.array(["call1", "call1", "call2"]),
             "batch_seconds": np.array([10.0, 10.0, 12.0])}
    store_generations(batch, str(tmp_path), None)
    rows = {r["key"]: r for r in PartStore(tmp_path).read().to_pylist()}
    assert [rows[k]["batch"] for k in ("k1", "k2", "k3")] == ["call1", "call1", "call2"]
    # without generator ids, the stored block is one batch
    store_generations({"key": np.array(["k4", "k5"]), "text": np.array(["d", "e"])}, str(tmp_path / "b"), None)
    ids = {r["batch"] for r in PartStore(tmp_path / "b").read().to_pylist()}
    assert len(ids) == 1
