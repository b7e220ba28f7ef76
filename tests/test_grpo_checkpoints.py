"""GRPO checkpoint rotation: the controller keeps the last `grpo.keep_checkpoints` checkpoints.

The controller's own `save_checkpoint` runs against a stand-in learner that writes a checkpoint dir
(the real learner's DeepSpeed save is covered by tests/test_grpo_on_cpu.py), so no Ray is needed.
"""

from __future__ import annotations

import pytest

from jobs.grpo import Controller, rotate_checkpoints
from mllmrec_ray.config import GRPOConfig


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Learner:
    def __init__(self):
        self.save_checkpoint = _Remote(self._save)

    @staticmethod
    def _save(path, client_state):
        from pathlib import Path

        Path(path).mkdir(parents=True)
        (Path(path) / "state.pt").write_text(str(client_state["step"]))
        return "tag"


class _Ray:
    @staticmethod
    def get(x):
        return x


def _controller(tmp_path, keep: int) -> Controller:
    c = object.__new__(Controller)  # no actors: only what save_checkpoint touches
    c.ray, c.learner, c.g, c.version = _Ray(), _Learner(), GRPOConfig(keep_checkpoints=keep), 0
    c.ckpt_dir = tmp_path / "checkpoints"
    return c


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_controller_keeps_the_last_n_checkpoints(tmp_path, keep):
    c = _controller(tmp_path, keep)
    for step in (2, 4, 6, 8, 10):
        c.save_checkpoint(step, cursor=step * 4)
        left = sorted(p.name for p in c.ckpt_dir.glob("step_*"))
        assert left[-1] == f"step_{step:06d}" and len(left) == min(keep, step // 2)
    assert (c.ckpt_dir / "latest").read_text().strip() == "step_000010"
    assert sorted(p.name for p in c.ckpt_dir.glob("step_*")) == [f"step_{s:06d}" for s in (2, 4, 6, 8, 10)[-keep:]]


def test_rotation_never_deletes_what_latest_names(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step:06d}").mkdir()
    (tmp_path / "step_000002.tmp").write_text("not a checkpoint dir")
    (tmp_path / "latest").write_text("step_000001\n")  # e.g. newer dirs from a crashed save
    assert rotate_checkpoints(tmp_path, 2) == ["step_000002"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001", "step_000002.tmp", "step_000003",
                                                                "step_000004"]
    assert rotate_checkpoints(tmp_path, 5) == []


def test_keep_checkpoints_is_validated():
    from mllmrec_ray.config import ConfigError, load_config

    assert GRPOConfig().keep_checkpoints == 2
    with pytest.raises(ConfigError, match=r"^grpo\.keep_checkpoints: 0 is out of range \(allowed: an integer >= 1\)"):
        load_config(None, ["grpo.keep_checkpoints=0"])
