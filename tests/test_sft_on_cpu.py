"""SFT examples (pure) and a real Ray Train SFT run on a tiny model (local CPU cluster)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from mllmrec_ray.io import atomic_write_parquet
from mllmrec_ray.runtime.policy import MERGED_MARKER, is_complete, load_tokenizer
from mllmrec_ray.prompting.sft_data import IGNORE, collate, sft_texts, tokenize_example
from tiny_models import make_tiny_model

ITEMS = {str(i): {"item_id": str(i), "title": f"Film {i}", "caption": None} for i in range(1, 31)}


def _samples(n=6):
    out = []
    for u in range(n):
        hist = [str((u + k) % 30 + 1) for k in range(9)]
        target = str((u + 9) % 30 + 1)
        cands = [target] + [str((u + 15 + k) % 30 + 1) for k in range(9)]
        out.append({"sample_id": f"u{u}", "user_id": str(u), "split": "train", "history": hist,
                    "target": target, "candidates": cands[u % 10:] + cands[: u % 10], "candidates_100": None})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama"))


def test_completion_only_labels_mask_exactly_the_prompt(tiny):
    tok = load_tokenizer(tiny)
    (text,) = sft_texts(_samples(1), ITEMS, tok)
    p = tok(text["prompt"], add_special_tokens=False)["input_ids"]
    a = tok(text["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert text["answer"] == "[ITEM_10] Film 10"

    ex = tokenize_example(tok, text["prompt"], text["answer"], max_len=4096)
    assert ex["input_ids"] == p + a and not ex["truncated"]
    assert ex["labels"] == [IGNORE] * len(p) + a

    whole = tokenize_example(tok, text["prompt"], text["answer"], max_len=4096, completion_only=False)
    assert whole["labels"] == whole["input_ids"]

    # Too long: the prompt loses tokens from its left, the answer stays whole.
    cut = tokenize_example(tok, text["prompt"], text["answer"], max_len=len(a) + 5)
    assert cut["truncated"] and cut["input_ids"] == p[-5:] + a and cut["labels"] == [IGNORE] * 5 + a
    assert tokenize_example(tok, text["prompt"], text["answer"], max_len=len(a)) is None

    batch = collate([ex, cut], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(p) + len(a))
    assert batch["attention_mask"][1].sum() == len(cut["input_ids"])
    assert (batch["labels"][1, len(cut["input_ids"]) :] == IGNORE).all()


def test_completion_loss_equals_the_models_own_loss_in_value_and_gradient(tiny):
    """Vocabulary projection only at labelled positions and no padding mask on right-padded rows: same
    loss and LoRA gradients as the model's own `labels=` loss with the mask."""
    from mllmrec_ray.config import LoraConfig
    from mllmrec_ray.runtime.policy import build_policy
    from mllmrec_ray.prompting.sft_data import causal_only, completion_loss

    tok = load_tokenizer(tiny)
    texts = sft_texts(_samples(3), ITEMS, tok)
    exs = [tokenize_example(tok, t["prompt"], t["answer"] + " extra" * i, max_len=4096) for i, t in enumerate(texts)]
    batch = collate(exs, tok.pad_token_id)
    # right-padded rows of different lengths: completion_loss runs without the padding mask,
    # the model's own loss with it; both must agree
    assert (batch["attention_mask"] == 0).any() and causal_only(batch["attention_mask"]) is None
    left = batch["attention_mask"].flip(1)
    assert causal_only(left) is left
    grads = []
    for fn in (lambda m: m(**batch).loss, lambda m: completion_loss(m, batch)):
        torch.manual_seed(0)
        model = build_policy(tiny, LoraConfig(r=4, alpha=8, dropout=0.0), dtype=torch.float32)
        for n, p in model.named_parameters():  # B = 0 at init would make every gradient of A zero
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        loss = fn(model)
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, g_ref), (got, g_got) = grads
    assert got == pytest.approx(ref, rel=1e-5)
    assert g_ref.keys() == g_got.keys() and len(g_ref) > 0
    for n in g_ref:
        assert torch.allclose(g_ref[n], g_got[n], atol=1e-6, rtol=1e-4), n


def test_reasoning_only_for_selected_samples(tiny):
    tok = load_tokenizer(tiny)
    texts = sft_texts(_samples(3), ITEMS, tok, reasoning={"u1": "Step 1: likes films."})
    assert [t["has_reasoning"] for t in texts] == [False, True, False]
    assert "Step 1: likes films." in texts[1]["prompt"]
    assert not any("Reference reasoning" in t["prompt"] for t in (texts[0], texts[2]))
    assert all("Film" in t["answer"] and "<think>" not in t["answer"] for t in texts)


@pytest.mark.parametrize("think_first", [False, True])
def test_reasoning_in_target_is_the_papers_think_block(tiny, think_first):
    from mllmrec_ray.prompting.parsing import parse_answer

    tok = load_tokenizer(tiny)
    samples = _samples(3)
    texts = sft_texts(samples, ITEMS, tok, reasoning={"u1": "Step 1: likes <think>films</think>."},
                      think_first=think_first, reasoning_in="target")
    plain = sft_texts(samples, ITEMS, tok, think_first=think_first)
    assert [t["has_reasoning"] for t in texts] == [False, True, False]
    # the prompt carries no reference block; the completion carries the CoT as a think block
    assert texts[1]["prompt"] == plain[1]["prompt"] and "Step 1" not in texts[1]["prompt"]
    parsed = parse_answer(texts[1]["answer"], samples[1]["candidates"], think_first=think_first)
    assert parsed.well_formed and parsed.item_id == samples[1]["target"]
    assert parsed.think == "Step 1: likes films."  # nested tags stripped, so the label stays parseable
    assert [texts[i]["answer"] for i in (0, 2)] == [plain[i]["answer"] for i in (0, 2)]
    with pytest.raises(ValueError, match="reasoning_in"):
        sft_texts(samples, ITEMS, tok, reasoning_in="both")


def test_sft_job_on_ray_train(tiny, tmp_path, capsys, monkeypatch):
    """Train on Ray Train, crash mid-run, resume from the checkpoint, log to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from jobs.sft import FAULT_ENV
    from jobs.cli import main

    data = tmp_path / "data"
    samples = _samples(6)
    atomic_write_parquet(pa.Table.from_pylist(samples), data / "samples.parquet")
    atomic_write_parquet(pa.Table.from_pylist(list(ITEMS.values())), data / "items.parquet")
    stage1 = tmp_path / "stage1"
    atomic_write_parquet(pa.Table.from_pylist(
        [{"sample_id": s["sample_id"], "pseudo_cot": "p", "refined_cot": f"Reasoning about {s['sample_id']}."}
         for s in samples]), stage1 / "cot.parquet")
    atomic_write_parquet(pa.Table.from_pylist(
        [{"sample_id": s["sample_id"], "selected_sft": s["sample_id"] == "u2"} for s in samples]), stage1 / "mda.parquet")
    config = tmp_path / "sft.yaml"
    config.write_text("sft: {micro_batch_size: 2, grad_accum: 1, lr: 1e-2, checkpoint_every: 4}\n"
                      "model: {lora: {r: 8, alpha: 16, dropout: 0.0}}\nprompt: {with_captions: false}\n")
    out = tmp_path / "models" / "sft"
    work = tmp_path / "sft"  # the default work dir: beside models/, like <run>/grpo
    args = ["sft", "--data", str(data), "--model", tiny, "--out", str(out), "--config", str(config),
            "--epochs", "4", "--cot", str(stage1 / "cot.parquet"), "--mda", str(stage1 / "mda.parquet")]

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # conftest: tests stay on the loopback
        # a worker dies after step 6: the checkpoint of step 4 is left behind
        monkeypatch.setenv(FAULT_ENV, "6")
        with pytest.raises(Exception, match="test hook"):
            main(args)
        assert (work / "checkpoints" / "latest").read_text().strip() == "step_000004" and not is_complete(out)
        monkeypatch.delenv(FAULT_ENV)
        assert main(args) == 0  # the rerun continues from it
        printed = capsys.readouterr().out
        # no dashboard here: Ray Train's placement-group cleaner would warn once a second (jobs.sft.trainer_class)
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        assert not [f.name for f in logs.glob("*.err") if "State API may be temporarily unavailable" in f.read_text()]
        assert "6 examples (1 with reasoning" in printed and "12 optimizer steps" in printed
        assert "resuming from step 4" in printed and "resumed at step 4/12" in printed
        assert is_complete(out) and (out / "adapter" / "adapter_model.safetensors").exists()
        info = json.loads((out / MERGED_MARKER).read_text())
        assert info["steps"] == 12 and info["last_loss"] < info["first_loss"] - 0.5, info
        assert info["resumed_from"].endswith("step_000004")
        # loss, lr and grad-norm of every step reached TensorBoard; the finished model supersedes checkpoints
        events = EventAccumulator(str(work))
        events.Reload()
        for tag in ("sft/loss", "sft/lr", "sft/grad_norm"):
            assert [e.step for e in events.Scalars(tag)] == list(range(1, 13)), tag
        assert [json.loads(r)["step"] for r in (work / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))
        assert not (work / "checkpoints").exists()

        model = AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora" in k for k in model.state_dict())
        tok = load_tokenizer(out)
        text = sft_texts(samples[:1], ITEMS, tok)[0]
        ids = tok(text["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == ids.shape[1] + 3  # generates from the saved config and weights

        # A finished --out is not retrained.
        assert main(args) == 0
        assert "skipping" in capsys.readouterr().out
    finally:
        ray.shutdown()


def test_write_prompts_builds_the_training_examples_without_training(tiny, tmp_path, capsys):
    from jobs.cli import main

    data, stage1 = tmp_path / "data", tmp_path / "stage1"
    samples = _samples(4)
    atomic_write_parquet(pa.Table.from_pylist(samples), data / "samples.parquet")
    atomic_write_parquet(pa.Table.from_pylist(list(ITEMS.values())), data / "items.parquet")
    atomic_write_parquet(pa.Table.from_pylist(
        [{"sample_id": s["sample_id"], "pseudo_cot": "p", "refined_cot": f"Reasoning about {s['sample_id']}."}
         for s in samples]), stage1 / "cot.parquet")
    atomic_write_parquet(pa.Table.from_pylist(
        [{"sample_id": s["sample_id"], "selected_sft": s["sample_id"] in ("u1", "u3")} for s in samples]),
        stage1 / "mda.parquet")
    config = tmp_path / "sft.yaml"
    config.write_text("prompt: {with_captions: false}\n")
    prompts = tmp_path / "prompts.parquet"
    assert main(["sft", "--data", str(data), "--model", tiny, "--config", str(config), "--stage1", str(stage1),
                 "--write-prompts", str(prompts)]) == 0
    assert "not training" in capsys.readouterr().out
    rows = {r["sample_id"]: r for r in pq.read_table(prompts).to_pylist()}
    assert sorted(rows) == ["u0", "u1", "u2", "u3"]
    for sid, r in rows.items():
        assert r["has_reasoning"] == (sid in ("u1", "u3"))
        assert (f"Reasoning about {sid}." in r["prompt"]) == r["has_reasoning"]
        assert r["kept"] and r["tokens"] > 0
    assert main(["sft", "--data", str(data), "--model", tiny]) == 2
    assert capsys.readouterr().err.startswith("error: mllmrec sft needs --out DIR")
