"""SFT training visibility and resume, in process (one DeepSpeed rank, tiny model, no Ray Train).

`jobs.sft.train_steps` is the loop every Ray Train worker runs: TensorBoard scalars, metrics.jsonl,
checkpoints every `sft.checkpoint_every` steps, and a resume that continues exactly where an
interrupted run stopped. `prepare_work_dir` decides, by fingerprint, whether a checkpoint may be resumed.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from jobs import sft as sft_job
from mllmrec_ray.config import LoraConfig, PipelineConfig, SFTConfig, to_dict
from tiny_models import make_tiny_model

STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama"))


@pytest.fixture(scope="module")
def examples(tiny):
    from mllmrec_ray.runtime.policy import load_tokenizer

    tok = load_tokenizer(tiny)
    out = []
    for u in range(8):  # 8 examples, micro-batch 2, accum 2: 2 steps an epoch, 3 epochs
        ids = tok(f"User {u} watched films {u} and {u + 1}. Next:", add_special_tokens=False)["input_ids"]
        answer = tok(f" [ITEM_{u + 2}] Film {u + 2}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer})
    return out, tok.pad_token_id


def _single_rank_world():
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def _engine(tiny, sft: SFTConfig):
    from mllmrec_ray.runtime.policy import build_policy, deepspeed_engine

    _single_rank_world()
    torch.manual_seed(sft.seed)
    # dropout > 0: the resumed run must also restore the RNG to match the uninterrupted one
    model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
                         dtype=torch.float32)
    engine = deepspeed_engine(model, zero_stage=sft.zero_stage, bf16=sft.bf16, lr=sft.lr,
                              micro_batch_size=sft.micro_batch_size, grad_accum=sft.grad_accum)
    engine.train()
    return engine


def _sft(**kw) -> SFTConfig:
    return SFTConfig(**{"lr": 1e-2, "epochs": 3, "micro_batch_size": 2, "grad_accum": 2, "bf16": False,
                        "checkpoint_every": 2, **kw})


def _rows(work_dir):
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_sft_resumes_exactly_and_logs_to_tensorboard(tiny, examples, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, pad = examples
    sft = _sft()
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = sft_job.train_steps(_engine(tiny, sft), data, pad, sft, work_dir=full_dir, fingerprint="fp", say=lambda *_: None)
    assert full["steps"] == STEPS
    ref = _rows(full_dir)
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert all(r["lr"] == pytest.approx(1e-2) and r["grad_norm"] > 0 for r in ref)
    # step 6 is the last: the model is saved after it, so the last checkpoint is step 4, alone
    ckpts = full_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000004"]
    events = EventAccumulator(str(full_dir))
    events.Reload()
    assert {"sft/loss", "sft/lr", "sft/grad_norm", "sft/step_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("sft/loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in events.Scalars("sft/loss")] == pytest.approx([r["loss"] for r in ref], rel=1e-6)

    # the same run, crashing after step 3 (its last checkpoint: step 2) ...
    with pytest.raises(RuntimeError, match="test hook"):
        sft_job.train_steps(_engine(tiny, sft), data, pad, sft, work_dir=cut_dir, fingerprint="fp",
                            say=lambda *_: None, fail_at_step=3)
    assert (cut_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not list((cut_dir / "checkpoints").glob(".*.tmp"))  # written aside, then renamed
    # ... is resumed by a rerun with the same fingerprint, which drops the metrics past the checkpoint
    meta, why = sft_job.prepare_work_dir(cut_dir, "fp")
    assert meta["step"] == 2 and "resuming from step 2" in why
    assert [r["step"] for r in _rows(cut_dir)] == [1, 2]
    said = []
    resumed = sft_job.train_steps(_engine(tiny, sft), data, pad, sft, work_dir=cut_dir, resume=meta["path"],
                                  fingerprint="fp", say=said.append)
    assert any("resumed at step 2/6" in s for s in said)
    assert resumed["steps"] == STEPS and resumed["first_loss"] == pytest.approx(full["first_loss"])
    got = _rows(cut_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    # same data order, optimizer state and RNG: the continuation is the uninterrupted run's
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4)
    events = EventAccumulator(str(cut_dir))
    events.Reload()  # the crashed attempt's step 3 was purged: one value per step
    assert [e.step for e in events.Scalars("sft/loss")] == list(range(1, STEPS + 1))


def _checkpoint(work_dir, step, fingerprint):
    d = work_dir / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    (work_dir / "checkpoints" / "latest").write_text(d.name + "\n")
    (work_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, step + 2)))
    (work_dir / "events.out.tfevents.1.host").write_text("x")
    (work_dir / "notes.txt").write_text("not ours")


@pytest.mark.parametrize("case", ["other settings", "force", "torn latest", "none"])
def test_a_checkpoint_of_other_settings_is_never_resumed(tmp_path, case):
    work = tmp_path / "sft"
    if case != "none":
        _checkpoint(work, 4, "other" if case == "other settings" else "fp")
    if case == "torn latest":
        (work / "checkpoints" / "latest").write_text("step_000009\n")  # names a dir that is not there
    meta, why = sft_job.prepare_work_dir(work, "fp", force=case == "force")
    assert meta is None and "starting at step 0" in why
    assert {"other settings": "other settings", "force": "--force", "torn latest": "no checkpoint",
            "none": "no checkpoint"}[case] in why
    if case != "none":  # its checkpoints, metrics and events go; files it did not write stay
        assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()
        assert not list(work.glob("events.out.tfevents.*")) and (work / "notes.txt").exists()


def test_resume_fingerprint_follows_what_training_computes(tiny, examples):
    data, _ = examples
    cfg = to_dict(PipelineConfig())
    fp = sft_job.resume_fingerprint(cfg, tiny, None, data)
    same = dict(cfg, sft=dict(cfg["sft"], checkpoint_every=3, resources={"num_cpus": 2.0, "num_gpus": 0.0}))
    assert sft_job.resume_fingerprint(same, tiny, None, data) == fp  # execution-only keys
    for changed in (dict(cfg, sft=dict(cfg["sft"], lr=2e-5)),
                    dict(cfg, model=dict(cfg["model"], lora=dict(cfg["model"]["lora"], r=8)))):
        assert sft_job.resume_fingerprint(changed, tiny, None, data) != fp
    assert sft_job.resume_fingerprint(cfg, tiny, 5, data) != fp
    assert sft_job.resume_fingerprint(cfg, tiny, None, data[:-1]) != fp  # other data / prompts / tokenizer
    # GRPO keys are not SFT's business
    assert sft_job.resume_fingerprint(dict(cfg, grpo=dict(cfg["grpo"], steps=1)), tiny, None, data) == fp


def test_default_work_dir_sits_beside_grpo(tmp_path):
    assert sft_job.default_work_dir(tmp_path / "run" / "models" / "sft") == tmp_path / "run" / "sft"
    assert sft_job.default_work_dir(tmp_path / "m") == tmp_path / "m.train"
