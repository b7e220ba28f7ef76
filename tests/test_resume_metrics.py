"""A resumed SFT or GRPO run redoes the steps after its checkpoint: their logged rows must go."""

import json

from mllmrec_ray.io import drop_steps_after


def test_rows_past_the_checkpoint_are_dropped_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4, 5)) + "\n")
    drop_steps_after(path, 3)
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind
    drop_steps_after(path, 0)  # a fresh start keeps nothing of an earlier attempt
    assert path.read_text() == ""
    drop_steps_after(tmp_path / "absent.jsonl", 2)  # nothing logged yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
