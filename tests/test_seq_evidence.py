"""Sequence-model evidence (prompt.collab_seq): cross-fitted, training users only, readable ranks."""

import pytest
import torch

from mllmrec_ray.config import PromptConfig
from mllmrec_ray.data.collab import fit_collab
from mllmrec_ray.data.run_data import SEQ_EVIDENCE, load_collab
from mllmrec_ray.data.seq_evidence import SeqEvidence, fit_seq_evidence
from mllmrec_ray.data.windows import training_sequences
from mllmrec_ray.data.collab import SEQ_LEGEND
from mllmrec_ray.prompting.prompts import sample_messages
from test_collab import _protocol

TINY = dict(epochs=2, hidden=16, blocks=1, max_len=12, log=None)


@pytest.fixture(scope="module")
def fitted():
    items, inter, samples = _protocol()
    rows = samples.to_dict("records")
    seqs = training_sequences(rows)
    ids = sorted(items["item_id"])
    return items, samples, seqs, fit_seq_evidence(seqs, ids, folds=2, seed=0, **TINY)


def test_no_model_gives_evidence_about_a_user_it_trained_on(fitted):
    items, samples, seqs, ev = fitted
    train_users = set(samples[samples.split == "train"].user_id)
    held_out = set(samples[samples.split != "train"].user_id)
    assert held_out and not held_out & train_users
    assert set(ev.trained_on[0]) == train_users  # the full model: every training user, nobody else
    for k, fold_model in enumerate(ev.folds):
        assert not set(ev.trained_on[k + 1]) & held_out
        fold = {u for u, f in ev.fold_of.items() if f == k}
        assert fold and not fold & set(ev.trained_on[k + 1])  # left out of the model that speaks for them
        assert set(ev.trained_on[k + 1]) == train_users - fold
    for u in train_users:
        assert ev.ranker_for(u) is ev.folds[ev.fold_of[u]]
    for u in list(held_out) + [None]:
        assert ev.ranker_for(u) is ev.full


def test_ranks_follow_the_models_ranking_and_survive_a_round_trip(fitted, tmp_path):
    items, samples, seqs, ev = fitted
    s = samples[samples.split == "test"].iloc[0]
    hist, cands = [str(h) for h in s.history], [str(c) for c in s.candidates]
    order = ev.full.rank([hist], [cands])[0]
    ranks = ev.ranks(hist, cands, s.user_id)
    assert sorted(ranks) == list(range(1, len(cands) + 1))
    assert [cands[ranks.index(r)] for r in range(1, len(cands) + 1)] == order
    # an item no model knows ranks last; a history of unknown items gives no evidence
    assert ev.ranks(hist, cands[:3] + ["unknown"], None)[-1] == 4
    assert ev.ranks(["unknown"], cands, None) == [0] * len(cands)
    path = tmp_path / "ev.pt"
    torch.save(ev.state(), path)
    back = SeqEvidence.from_state(torch.load(path, weights_only=True))
    train_row = samples[samples.split == "train"].iloc[0]
    for user, h, c in ((s.user_id, hist, cands), (train_row.user_id, list(map(str, train_row.history)),
                                                   list(map(str, train_row.candidates)))):
        assert back.ranks(h, c, user) == ev.ranks(h, c, user)


def _data_with_evidence(fitted, tmp_path, evidence: bool = True):
    """A data dir holding the fixture's samples, items and (unless evidence=False) sequence-model evidence."""
    items, samples, _, ev = fitted
    data = tmp_path / "data"
    data.mkdir()
    samples.to_parquet(data / "samples.parquet")
    items.to_parquet(data / "items.parquet")
    if evidence:
        torch.save(ev.state(), data / SEQ_EVIDENCE)
    return data


def test_prompt_shows_the_rank_and_load_collab_names_a_missing_file(fitted, tmp_path):
    items, samples, seqs, ev = fitted
    data = _data_with_evidence(fitted, tmp_path, evidence=False)
    cfg = PromptConfig(collab=True, collab_seq=True)
    with pytest.raises(FileNotFoundError, match=rf"{SEQ_EVIDENCE}.*mllmrec evidence"):
        load_collab(data, cfg)
    torch.save(ev.state(), data / SEQ_EVIDENCE)
    st = load_collab(data, cfg)
    assert load_collab(data, PromptConfig(collab=True)).seq is None
    item_rows = {r["item_id"]: r for r in items.to_dict("records")}
    s = samples[samples.split == "test"].to_dict("records")[0]
    visible = {k: v for k, v in s.items() if k != "target"}
    text = sample_messages(visible, item_rows, collab=st)[1]["content"]
    assert SEQ_LEGEND.strip() in text
    ranks = ev.ranks(s["history"], s["candidates"], s["user_id"])
    lines = [ln for ln in text.splitlines() if ln.startswith("(popularity ")]
    assert [ln.split("next-item rank ")[1].split("/")[0] for ln in lines] == [str(r) for r in ranks]
    # the calibrated readout's prompt without history has no sequence evidence (nothing to condition on)
    no_hist = sample_messages(visible, item_rows, collab=st, without_history=True)[1]["content"]
    assert "next-item rank" not in no_hist and SEQ_LEGEND.strip() not in no_hist




def test_short_evidence_style_writes_the_same_levels_and_ranks_in_fewer_tokens(fitted, tmp_path):
    """prompt.evidence_style: short: "(pop p, fol f, rank r):" carries exactly the words style's numbers,
    its legend names the scales, and a prompt with no history shows no rank (nor its legend)."""
    import re

    items, samples, seqs, ev = fitted
    data = _data_with_evidence(fitted, tmp_path)
    words = load_collab(data, PromptConfig(collab=True, collab_seq=True))
    short = load_collab(data, PromptConfig(collab=True, collab_seq=True, evidence_style="short"))
    assert (words.style, short.style) == ("words", "short")
    item_rows = {r["item_id"]: r for r in items.to_dict("records")}
    for s in samples[samples.split == "test"].to_dict("records")[:3]:
        visible = {k: v for k, v in s.items() if k != "target"}
        w = sample_messages(visible, item_rows, collab=words)[1]["content"]
        t = sample_messages(visible, item_rows, collab=short)[1]["content"]
        w_nums = re.findall(r"^\(popularity (\d)/5, follows recent (\d)/4, next-item rank (\d+)/10\): (.*)$", w, re.M)
        t_nums = re.findall(r"^\(pop (\d), fol (\d), rank (\d+)\): (.*)$", t, re.M)
        assert len(w_nums) == 10 and t_nums == w_nums
        assert "pop = how popular it is (1-5)" in t and "rank = where a sequence model" in t and "(1-10, 1 = most likely)" in t
        assert len(t) < len(w) - 200
        no_hist = sample_messages(visible, item_rows, collab=short, without_history=True)[1]["content"]
        assert ", rank " not in no_hist and "rank =" not in no_hist and "(pop " in no_hist


def test_fold_count_is_checked():
    seqs = {"a": ["1", "2", "3"], "b": ["2", "3", "4"]}
    with pytest.raises(ValueError, match="folds=1"):
        fit_seq_evidence(seqs, ["1", "2", "3", "4"], folds=1, **TINY)
    with pytest.raises(ValueError, match="2 training users for 3 folds"):
        fit_seq_evidence(seqs, ["1", "2", "3", "4"], folds=3, **TINY)


def test_collab_texts_unchanged_without_seq():
    st = fit_collab({"a": ["1", "2", "3"]}, ["1", "2", "3"])
    assert st.texts(["1"], ["2", "1"]) == ["(popularity 2/5, follows recent 1/4):",
                                           "(popularity 2/5, follows recent 0/4):"]


def test_pipeline_trains_the_evidence_before_every_prompt_builder(tmp_path):
    from pathlib import Path

    from jobs.pipeline import plan
    from mllmrec_ray import fingerprint as fp
    from mllmrec_ray.config import load_config

    for on in (False, True):
        cfg = load_config("configs/quickstart.yaml", [f"prompt.collab_seq={str(on).lower()}"])
        names = [name for name, _, _ in plan(cfg, Path("c.yaml"), tmp_path)]
        assert ("seqrec" in names) is on
        if on:
            deps = fp.dependencies(names, with_captions=False)
            for stage in ("sft", "grpo", "eval-base", "eval-sft", "eval-grpo"):
                assert "seqrec" in deps[stage], stage
            assert names.index("seqrec") < names.index("sft")


def _data_dir(tmp_path):
    """A prepared data dir (samples, items, interactions) of the tiny protocol; returns (dir, samples)."""
    items, inter, samples = _protocol()
    data = tmp_path / "data"
    data.mkdir()
    samples.to_parquet(data / "samples.parquet")
    items.to_parquet(data / "items.parquet")
    inter.to_parquet(data / "interactions.parquet")
    return data, samples


def test_evidence_command_writes_a_loadable_file_and_names_bad_folds(tmp_path, capsys):
    from jobs.cli import main
    from mllmrec_ray.data.run_data import load_seq_evidence

    data, samples = _data_dir(tmp_path)
    assert main(["evidence", "--data", str(data), "--folds", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --folds 1: need >= 2")
    assert main(["evidence", "--data", str(data), "--epochs", "1", "--seed", "3"]) == 0
    assert sorted(p.name for p in data.iterdir()) == sorted(
        ["samples.parquet", "items.parquet", "interactions.parquet", SEQ_EVIDENCE])  # no temp file left
    ev = load_seq_evidence(data)
    assert set(ev.fold_of) == set(samples[samples.split == "train"].user_id) and len(ev.folds) == 2


def test_sasrec_row_reuses_the_evidence_model_and_it_is_the_model_a_retrain_gives(tmp_path, capsys):
    """`baseline --model sasrec --from-evidence` ranks with the seqrec stage's full model; trained
    again with the same seed and settings, SASRec gives the same rankings, so the row is unchanged
    and the pipeline saves a training. Evidence for other users or another model is refused."""
    import json
    from pathlib import Path

    from jobs.cli import main
    from jobs.pipeline import plan
    from mllmrec_ray import fingerprint as fp
    from mllmrec_ray.config import load_config
    from mllmrec_ray.ranking.evaluation import read_rankings, rankings_path

    data, samples = _data_dir(tmp_path)
    common = ["--data", str(data), "--model", "sasrec", "--seed", "3", "--epochs", "2", "--max-seconds", "0"]
    assert main(["baseline", *common, "--from-evidence", "--out", str(tmp_path / "x.json")]) == 2
    assert "seq_evidence.pt" in capsys.readouterr().err  # no evidence yet: names the missing file
    assert main(["evidence", "--data", str(data), "--epochs", "2", "--seed", "3"]) == 0
    assert main(["baseline", *common, "--from-evidence", "--out", str(tmp_path / "reuse.json")]) == 0
    assert main(["baseline", *common, "--out", str(tmp_path / "train.json")]) == 0
    reused, trained = (read_rankings(rankings_path(tmp_path / f"{n}.json"))[1] for n in ("reuse", "train"))
    assert reused == trained and len(reused) == (samples.split == "test").sum()
    rec = json.loads((tmp_path / "reuse.json").read_text())
    assert rec["from_evidence"] is True and rec["train_windows"] > 0
    assert main(["baseline", *common[:3], "pop", "--from-evidence", "--out", str(tmp_path / "p.json")]) == 2
    assert "only --model sasrec" in capsys.readouterr().err

    # evidence trained on other training users is not this data's SASRec
    fewer = samples[samples.user_id != samples[samples.split == "train"].user_id.iloc[0]]
    fewer.to_parquet(data / "samples.parquet")
    assert main(["baseline", *common, "--from-evidence", "--out", str(tmp_path / "y.json")]) == 2
    assert "not trained on this data's" in capsys.readouterr().err

    # the pipeline trains the evidence first and passes --from-evidence only when the prompt uses it
    for on in (False, True):
        cfg = load_config("configs/quickstart.yaml", [f"prompt.collab_seq={str(on).lower()}"])
        stages = {name: argv for name, argv, _ in plan(cfg, Path("c.yaml"), tmp_path)}
        assert ("--from-evidence" in stages["sasrec"]) is on
        if on:
            names = list(stages)
            assert names.index("seqrec") < names.index("sasrec")
            assert "seqrec" in fp.dependencies(names, with_captions=False)["sasrec"]


def test_grpo_prompt_pool_carries_the_ranks_the_prompt_prints(fitted, tmp_path, tiny_llama):
    """`grpo.rank_teacher` rewards agreement with `seq_ranks`: they must be the ranks the policy reads in its
    own prompt (the cross-fitted model's for a training user), candidate by candidate, for both styles."""
    import re

    from transformers import AutoTokenizer

    from mllmrec_ray.config import PipelineConfig
    from mllmrec_ray.rl.prompt_pool import build_prompts

    items, samples, seqs, ev = fitted
    data = _data_with_evidence(fitted, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    by_id = {r["sample_id"]: r for r in samples.to_dict("records")}
    for style in ("words", "short"):
        cfg = PipelineConfig()
        cfg.grpo.action, cfg.grpo.rank_teacher = "rank", 0.5
        cfg.prompt = PromptConfig(collab=True, collab_seq=True, with_captions=False, evidence_style=style)
        cfg.model.engine.max_model_len = 8192  # the tiny tokenizer spends a token per character
        prompts = build_prompts(cfg, data, tmp_path / "stage1", tok)
        assert prompts and all(by_id[p["sample_id"]]["split"] == "train" for p in prompts)
        for p in prompts:
            s = by_id[p["sample_id"]]
            assert [int(r) for r in re.findall(r"rank (\d+)[/)]", p["prompt"])] == p["seq_ranks"]
            assert p["seq_ranks"] == ev.ranks(s["history"], s["candidates"], s["user_id"])
    cfg.grpo.rank_teacher = 0.0  # off: no ranks carried
    assert all("seq_ranks" not in p for p in build_prompts(cfg, data, tmp_path / "stage1", tok))
    # a teacher reward without ranks in the prompt, or outside rank mode, is refused before any model loads
    cfg.grpo.rank_teacher = 0.5
    cfg.prompt = PromptConfig(collab=True, with_captions=False)
    with pytest.raises(ValueError, match=r"grpo.rank_teacher=0.5 needs .* prompt.collab_seq on \(are True and False\)"):
        build_prompts(cfg, data, tmp_path / "stage1", tok)
    cfg.prompt.collab_seq, cfg.grpo.action = True, "generate"
    with pytest.raises(ValueError, match="needs grpo.action: rank \\(is 'generate'\\)"):
        build_prompts(cfg, data, tmp_path / "stage1", tok)
