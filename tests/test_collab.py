"""Collaborative evidence (prompt.collab): training users only, leave-user-out, readable levels."""

import numpy as np
import pandas as pd
import pytest

from mllmrec_ray.data.collab import fit_collab, rank_by_evidence
from mllmrec_ray.config import PromptConfig
from mllmrec_ray.data.protocol import build_samples
from mllmrec_ray.data.windows import training_sequences
from mllmrec_ray.data.collab import COLLAB_LEGEND
from mllmrec_ray.prompting.prompts import sample_messages
from mllmrec_ray.data.run_data import load_collab

CATALOGUE = [str(i) for i in range(1, 9)]


def test_counts_by_hand_and_leave_user_out():
    seqs = {"a": ["1", "2", "3", "4"], "b": ["2", "4", "5"], "c": ["1", "5"]}
    st = fit_collab(seqs, CATALOGUE, window=2, recent=2, levels=5)
    assert st.pop[st.index["2"]] == 2 and st.pop[st.index["5"]] == 2 and st.pop[st.index["8"]] == 0
    # follows(h -> c) within 2 steps: a: 1->2,1->3,2->3,2->4,3->4; b: 2->4,2->5,4->5; c: 1->5
    assert st.follows[st.index["2"], st.index["4"]] == 2 and st.follows[st.index["1"], st.index["5"]] == 1
    # history ... 1, 2 (recent=2): candidate 4 follows 2 for users a and b; 5 follows 2 (b) and 1 (c)
    assert st.counts(["9", "1", "2"], ["4", "5", "8"]) == [(2, 2), (2, 2), (0, 0)]
    # user a's own interactions are left out: 4 loses a's pop and a's 2->4 transition
    assert st.counts(["1", "2"], ["4", "5"], user="a") == [(1, 1), (2, 2)]


def test_levels_are_monotone_and_bounded():
    seqs = {f"u{k}": [str(1 + (k + j) % 8) for j in range(4)] for k in range(30)}
    st = fit_collab(seqs, CATALOGUE, levels=5)
    lv = st.levels_of([(0, 0), (1, 1), (3, 2), (100, 3), (1000, 4096)])
    assert [f for _, f in lv] == [0, 1, 2, 2, 4]
    pops = [p for p, _ in lv]
    assert pops == sorted(pops) and 1 <= pops[0] and pops[-1] == 5


def _protocol(seed=0, windows="sliding"):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(40):
        items = rng.choice(60, size=14, replace=False) + 1
        rows += [{"user_id": str(u), "item_id": str(i), "timestamp": t} for t, i in enumerate(items)]
    items = pd.DataFrame({"item_id": [str(i) for i in range(1, 61)], "title": [f"Movie {i}" for i in range(1, 61)]})
    samples, _ = build_samples(items, pd.DataFrame(rows), min_inter=10, negatives=9, negatives_large=0, seed=seed,
                               train_windows=windows)
    return items, pd.DataFrame(rows), samples


def test_no_valid_or_test_target_reaches_the_statistics():
    items, inter, samples = _protocol()
    rows = samples.to_dict("records")
    st = fit_collab(training_sequences(rows), items["item_id"].tolist())
    held_out = samples[samples.split != "train"]
    train_users = set(samples[samples.split == "train"].user_id)
    assert not set(held_out.user_id) & train_users
    # changing everything valid/test users did leaves every statistic unchanged
    other = inter.copy()
    mask = other.user_id.isin(set(held_out.user_id))
    other.loc[mask, "item_id"] = other.loc[mask, "item_id"].map(lambda i: str(61 - int(i)))
    items2, _, samples2 = items, None, build_samples(items, other, min_inter=10, negatives=9, negatives_large=0,
                                                     seed=0, train_windows="sliding")[0]
    st2 = fit_collab(training_sequences(samples2.to_dict("records")), items2["item_id"].tolist())
    assert (st.pop == st2.pop).all() and (st.follows == st2.follows).all()
    # the counts equal a recount over training users' interactions only
    pop = inter[inter.user_id.isin(train_users)].groupby("item_id").user_id.nunique()
    for item, n in pop.items():
        assert st.pop[st.index[item]] == n


def test_training_prompt_evidence_leaves_its_own_user_out(tmp_path):
    items, _, samples = _protocol()
    rows = samples.to_dict("records")
    st = fit_collab(training_sequences(rows), items["item_id"].tolist())
    alone = {s["user_id"]: s for s in rows if s["split"] == "train"}
    for s in list(alone.values())[:10]:
        others = {u: q for u, q in training_sequences(rows).items() if u != s["user_id"]}
        st_wo = fit_collab(others, items["item_id"].tolist())
        assert st.counts(s["history"], s["candidates"], s["user_id"]) == st_wo.counts(s["history"], s["candidates"])


def test_prompt_shows_evidence_and_never_the_target(tmp_path):
    items, _, samples = _protocol()
    data = tmp_path / "data"
    data.mkdir()
    samples.to_parquet(data / "samples.parquet")
    items.to_parquet(data / "items.parquet")
    st = load_collab(data, PromptConfig(collab=True))
    assert load_collab(data, PromptConfig(collab=False)) is None
    item_rows = {r["item_id"]: r for r in items.to_dict("records")}
    for s in samples[samples.split == "test"].to_dict("records")[:5]:
        visible = {k: v for k, v in s.items() if k != "target"}
        text = sample_messages(visible, item_rows, collab=st)[1]["content"]
        assert COLLAB_LEGEND in text
        lines = [ln for ln in text.splitlines() if ln.startswith("(popularity ")]
        assert len(lines) == 10 and all("follows recent" in ln and "): [ITEM_" in ln for ln in lines)
        no_hist = sample_messages(visible, item_rows, collab=st, without_history=True)[1]["content"]
        assert "1. [ITEM_" not in no_hist and "follows recent 0/4" in no_hist


def test_rank_by_evidence_orders_by_follows_then_popularity():
    seqs = {"a": ["1", "2"], "b": ["1", "2"], "c": ["3", "4"], "d": ["5", "4"], "e": ["6", "4"]}
    st = fit_collab(seqs, CATALOGUE, window=1, recent=1, levels=3)
    # 2 follows 1 twice; 4 is the most popular but never follows 1; 7 nobody watched
    assert rank_by_evidence(st, ["1"], ["7", "4", "2"]) == ["2", "4", "7"]


def test_unknown_item_in_a_window_is_named():
    with pytest.raises(ValueError, match="'99'"):
        fit_collab({"a": ["1", "99"]}, CATALOGUE)


def test_served_prompt_equals_the_evaluated_prompt():
    """Serving builds the same prompt (evidence included) as evaluation for the same history and candidates."""
    from mllmrec_ray.ranking.serve_logic import prompt_messages

    items, _, samples = _protocol()
    st = fit_collab(training_sequences(samples.to_dict("records")), items["item_id"].tolist())
    item_rows = {r["item_id"]: dict(r, caption=None) for r in items.to_dict("records")}
    for s in samples[samples.split == "test"].to_dict("records")[:3]:
        visible = {"sample_id": s["sample_id"], "user_id": s["user_id"], "history": s["history"],
                   "candidates": s["candidates"]}
        assert prompt_messages(s["history"], s["candidates"], item_rows, False, False, st) == \
            sample_messages(visible, item_rows, collab=st)


def test_evidence_needs_its_legend():
    from mllmrec_ray.prompting.prompts import build_messages

    hist, cands = [{"item_id": "1", "title": "A"}], [{"item_id": "2", "title": "B"}]
    with pytest.raises(ValueError, match="legend"):
        build_messages(hist, cands, evidence=["(pop 3, fol 0):"])
    assert "Legend X" in build_messages(hist, cands, evidence=["(pop 3, fol 0):"], legend="Legend X")[1]["content"]


def test_compact_instructions_keep_every_item_line_and_number_in_fewer_words(tmp_path):
    """prompt.instructions: compact changes only the role, list header, legend and output rule: the same
    history and candidate lines (evidence included), no target, fewer characters; serving builds the same."""
    from mllmrec_ray.ranking.serve_logic import prompt_messages

    items, _, samples = _protocol()
    data = tmp_path / "data"
    data.mkdir()
    samples.to_parquet(data / "samples.parquet")
    items.to_parquet(data / "items.parquet")
    full = load_collab(data, PromptConfig(collab=True, evidence_style="short"))
    compact = load_collab(data, PromptConfig(collab=True, evidence_style="short", instructions="compact"))
    assert (full.compact, compact.compact) == (False, True)
    item_rows = {r["item_id"]: dict(r, caption=None) for r in items.to_dict("records")}
    for s in samples[samples.split == "test"].to_dict("records")[:5]:
        visible = {k: v for k, v in s.items() if k != "target"}
        long_ = sample_messages(visible, item_rows, collab=full)
        short = sample_messages(visible, item_rows, collab=compact, compact=True)
        item_lines = lambda m: [ln for ln in m[1]["content"].splitlines() if "[ITEM_" in ln and "<id>" not in ln]
        assert item_lines(short) == item_lines(long_) and len(item_lines(short)) == 9 + 10
        assert len(short[0]["content"]) + len(short[1]["content"]) < 0.8 * (len(long_[0]["content"]) + len(long_[1]["content"]))
        assert "pop 1-5, fol 0-4" in short[1]["content"] and "[ITEM_<id>] <title>" in short[1]["content"]
        assert f"[ITEM_{s['target']}]" not in "".join(item_lines(short)[:9])  # the target is never in the history
        assert prompt_messages(s["history"], s["candidates"], item_rows, False, False, compact, compact=True) == \
            sample_messages({k: s[k] for k in ("sample_id", "user_id", "history", "candidates")}, item_rows,
                            collab=compact, compact=True)
