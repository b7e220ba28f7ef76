"""Answer-likelihood scorers: both fast paths equal a naive full-sequence computation."""

import pytest
import torch

from mllmrec_ray.prompting.prompts import answer_text, build_messages, render_prompt
from mllmrec_ray.ranking.scoring import HFScorer, VLLMScorer, answer_ids, rank_by_scores, ranking_messages


def _naive(model, prompt: list[int], answers: list[list[int]]) -> list[float]:
    """log P(answer | prompt) from one full forward per candidate."""
    out = []
    with torch.no_grad():
        for a in answers:
            logp = torch.log_softmax(model(torch.tensor([prompt + a])).logits[0].float(), -1)
            out.append(float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(a))))
    return out


@pytest.fixture(scope="module")
def case(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, len(tok), (n,), generator=g).tolist()  # noqa: E731
    # 128 tokens = one whole vLLM CPU block (the recompute path), 150 = cache-read path, 5 = no full block.
    prompts = [ids(128), ids(150), ids(5), ids(125)]
    answers = [[ids(n) for n in (1, 4, 7, 3)] for _ in prompts[:3]]
    # Answers sharing a prefix that completes the prompt's block (like "[ITEM_1..."): cached past the prompt.
    shared = ids(5)
    answers.append([shared + ids(n) for n in (1, 2, 3)])
    expected = [_naive(model, p, a) for p, a in zip(prompts, answers)]
    return prompts, answers, expected


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_hf_scorer_matches_naive(tiny_llama, case, batch):
    """Unbatched (1), batched with a remainder (3) and all prompts in one left-padded forward (8)
    give the naive per-candidate numbers: padding and packing change nothing."""
    prompts, answers, expected = case
    scorer = HFScorer(str(tiny_llama), dtype="float32", chunk=3, batch=batch)  # chunk < answers: 2 chunks
    got = scorer.score(prompts, answers)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
def test_hf_scorer_shared_head_matches_naive(tiny_llama, case, batch):
    """Prompts that start alike (the system prompt and instructions before the history): their common head
    is computed once and its cache reused across batches and calls; scores equal the naive numbers, for a
    prompt one token longer than the head too, for a lone later prompt, and after prompts with another head."""
    from transformers import AutoModelForCausalLM

    prompts, answers, _ = case
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    head = prompts[1][:40]
    alike = [head + p[:n] for p, n in zip(prompts, (30, 1, 5, 17))]
    scorer = HFScorer(str(tiny_llama), dtype="float32", chunk=3, batch=batch)
    for g, p, a in zip(scorer.score(alike, answers), alike, answers):
        assert g == pytest.approx(_naive(model, p, a), abs=1e-3)
    assert scorer._prefix[0] == head  # the head, not more: the second prompt adds one token of its own
    lone = scorer.score([alike[0]], [answers[0]])[0]
    assert scorer._prefix[0] == head and lone == pytest.approx(_naive(model, alike[0], answers[0]), abs=1e-3)
    for g, e in zip(scorer.score(prompts, answers), case[2]):  # no common head: the plain path
        assert g == pytest.approx(e, abs=1e-3)
    plain = HFScorer(str(tiny_llama), dtype="float32", chunk=3, batch=batch, share_prefix=False)
    for g, e in zip(plain.score(alike, answers), scorer.score(alike, answers)):
        assert g == pytest.approx(e, abs=1e-4)
    assert plain._prefix is None
    assert scorer.score([], []) == []


def test_vllm_scorer_matches_naive(tiny_llama, case):
    from mllmrec_ray.config import EngineConfig
    from mllmrec_ray.runtime.engine import Engine

    engine = Engine(str(tiny_llama), EngineConfig(dtype="float32", max_model_len=512, kv_cache_gib=0.25))
    prompts, answers, expected = case
    scorer = VLLMScorer(engine, prompts_per_batch=2)
    assert scorer.block_size == 128  # what the recompute case above is built around
    for g, e in zip(scorer.score(prompts, answers), expected):
        assert g == pytest.approx(e, abs=1e-3)
    # Scoring twice (now fully cached prompts) gives the same numbers.
    for g, e in zip(scorer.score(prompts, answers), expected):
        assert g == pytest.approx(e, abs=1e-3)


def test_ranking_and_prompts(tiny_llama):
    from transformers import AutoTokenizer

    assert rank_by_scores(["a", "b", "c", "d"], [-3.0, -1.0, -3.0, -2.0]) == ["b", "d", "a", "c"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = build_messages([{"item_id": "1", "title": "Toy Story"}],
                              [{"item_id": "7", "title": "Heat"}, {"item_id": "42", "title": "Star Wars"}])
    prompt = render_prompt(tok, messages)
    answer = answer_text("42", "Star Wars")
    # Appending separately tokenized answers equals tokenizing the whole text.
    assert tok(prompt + answer, add_special_tokens=False)["input_ids"] == \
        tok(prompt, add_special_tokens=False)["input_ids"] + answer_ids(tok, [answer])[0]
    ranked = ranking_messages(messages, 2)
    assert ranked[0] == messages[0] and "rank the 2 candidate items" in ranked[-1]["content"]
    assert ranked[-1]["content"].split("\n\n")[:-1] == messages[-1]["content"].split("\n\n")[:-1]
    with pytest.raises(ValueError):
        ranking_messages([{"role": "user", "content": "no constraint"}], 2)
    for think_first in (False, True):  # the compact instructions' output rule is replaced the same way
        short = build_messages([{"item_id": "1", "title": "Toy Story"}], [{"item_id": "7", "title": "Heat"}],
                               think_first=think_first, compact=True)
        assert "rank the 1 candidate items" in ranking_messages(short, 1)[-1]["content"]


def test_id_and_calibrated_readouts_equal_a_hand_computation(tiny_llama):
    """id = log p(<id>] | prompt + "[ITEM_"); calibrated = that minus the same under the history-free prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mllmrec_ray.ranking.scoring import rank_samples, readout_tokens

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    items = {"7": {"title": "Heat"}, "42": {"title": "Star Wars"}, "1234": {"title": "Alien"}, "12": {"title": "Toy Story"}}
    row = {"sample_id": "u1", "history": ["12"], "candidates": ["7", "42", "1234"]}

    def messages_of(r, without_history=False):
        hist = [] if without_history else [{"item_id": i, "title": items[i]["title"]} for i in r["history"]]
        return build_messages(hist, [{"item_id": c, "title": items[c]["title"]} for c in r["candidates"]])

    def by_hand(without_history):
        prompt = tok(render_prompt(tok, messages_of(row, without_history)), add_special_tokens=False)["input_ids"]
        out = []
        for c in row["candidates"]:
            full = tok(f"[ITEM_{c}]", add_special_tokens=False)["input_ids"]
            shared = tok("[ITEM_", add_special_tokens=False)["input_ids"]
            assert full[:len(shared)] == shared  # this tokenizer splits after the underscore
            out.append(_naive(model, prompt + shared, [full[len(shared):]])[0])
        return out

    extra, ans = readout_tokens(tok, row["candidates"], [items[c]["title"] for c in row["candidates"]], "id")
    assert [extra + a for a in ans] == [tok(f"[ITEM_{c}]", add_special_tokens=False)["input_ids"]
                                        for c in row["candidates"]]
    scorer = HFScorer(str(tiny_llama), dtype="float32")
    titles = {k: v["title"] for k, v in items.items()}
    _, got_id = rank_samples(scorer, tok, [row], messages_of, titles, "id")
    _, got_cal = rank_samples(scorer, tok, [row], messages_of, titles, "calibrated")
    _, got_ans = rank_samples(scorer, tok, [row], messages_of, titles, "answer")
    with_h, without_h = by_hand(False), by_hand(True)
    assert got_id[0] == pytest.approx(with_h, abs=1e-3)
    assert got_cal[0] == pytest.approx([a - b for a, b in zip(with_h, without_h)], abs=1e-3)
    prompt = tok(render_prompt(tok, messages_of(row)), add_special_tokens=False)["input_ids"]
    assert got_ans[0] == pytest.approx(_naive(model, prompt, answer_ids(tok, [answer_text(c, items[c]["title"])
                                                                              for c in row["candidates"]])), abs=1e-3)
    with pytest.raises(ValueError, match="readout"):
        readout_tokens(tok, ["7"], ["Heat"], "title")


def test_vote_ranking_counts_votes_then_scores():
    from mllmrec_ray.ranking.scoring import vote_ranking

    cands = ["1", "2", "3", "4"]
    # 3 votes for "3", 1 for "2", an invalid answer and a non-candidate vote for nothing
    assert vote_ranking(cands, ["3", "2", None, "3", "9", "3"], [0.0, -1.0, -5.0, -0.5]) == ["3", "2", "1", "4"]
    assert vote_ranking(cands, [], [0.1, 0.4, 0.3, 0.2]) == ["2", "3", "4", "1"]
