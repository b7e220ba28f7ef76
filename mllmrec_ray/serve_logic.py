"""Pure helpers of the Serve ranker (no Ray): request validation, retrieval, prompts, responses.

A request is JSON `{"history": [item ids], "candidates": [item ids] (optional), "k": int,
"explain": bool}`. Item ids are strings (ints are accepted and read as their decimal
string). Every rejection is a `RequestError` whose message starts with the offending
field, with an HTTP status: 413 for a body over the size limit, 400 for the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mllmrec_ray.prompts import answer_text, build_messages

MAX_BODY_BYTES = 64 * 1024  # a 50-item history + 100 candidates is ~2 KB of JSON
MAX_CANDIDATES = 100
FIELDS = ("history", "candidates", "k", "explain")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


@dataclass
class RankRequest:
    history: list[str]
    candidates: list[str] | None  # None: the retrieval stage proposes them
    k: int
    explain: bool


def _ids(value: Any, field: str, items: Mapping[str, Any], max_len: int) -> list[str]:
    if not isinstance(value, list):
        raise RequestError(field, f"expected a list of item ids, got {type(value).__name__}")
    if not value:
        raise RequestError(field, "must not be empty")
    if len(value) > max_len:
        raise RequestError(field, f"{len(value)} items; at most {max_len} are allowed")
    ids = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise RequestError(field, f"item ids are strings or integers, got {json.dumps(v)[:40]}")
        ids.append(str(v))
    unknown = [i for i in ids if i not in items]
    if unknown:
        shown = ", ".join(repr(i[:40]) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise RequestError(field, f"unknown item ids: {shown}")
    return ids


def parse_request(body: bytes, items: Mapping[str, Any], max_history: int, retrieval_top_n: int,
                  max_body_bytes: int = MAX_BODY_BYTES) -> RankRequest:
    """Validate a /recommend body against the catalogue; raises RequestError naming the field."""
    if len(body) > max_body_bytes:
        raise RequestError("body", f"{len(body)} bytes; at most {max_body_bytes} are allowed", 413)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError("body", f"malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError("body", "expected a JSON object with history, candidates, k, explain")
    extra = sorted(set(data) - set(FIELDS))
    if extra:
        raise RequestError(extra[0], f"unknown field; allowed fields: {', '.join(FIELDS)}")
    if "history" not in data:
        raise RequestError("history", "missing (a list of item ids, oldest first)")
    history = _ids(data["history"], "history", items, max_history)
    candidates = None
    if data.get("candidates") is not None:
        candidates = _ids(data["candidates"], "candidates", items, MAX_CANDIDATES)
        if len(set(candidates)) != len(candidates):
            raise RequestError("candidates", "duplicate item ids")
    pool = len(candidates) if candidates is not None else retrieval_top_n
    k = data.get("k", min(10, pool))
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError("k", f"expected an integer, got {json.dumps(k)[:40]}")
    if not 1 <= k <= pool:
        where = "the number of candidates" if candidates is not None else "the retrieval size"
        raise RequestError("k", f"{k} is out of range; allowed 1..{pool} ({where})")
    explain = data.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError("explain", f"expected true or false, got {json.dumps(explain)[:40]}")
    return RankRequest(history, candidates, k, explain)


def popularity_order(counts: Mapping[str, int], item_ids: Sequence[str]) -> list[str]:
    """Every catalogue item, most interacted first (ties by id, like the Popularity baseline)."""
    return sorted(item_ids, key=lambda i: (-counts.get(i, 0), i))


def top_n_excluding(order: Sequence[str], exclude: Sequence[str], n: int) -> list[str]:
    """The first n items of a ranked catalogue that are not in `exclude`."""
    seen = set(exclude)
    out = []
    for item in order:
        if item not in seen:
            out.append(item)
            if len(out) == n:
                break
    return out


def prompt_messages(history: Sequence[str], candidates: Sequence[str], items: Mapping[str, Mapping[str, Any]],
                    with_captions: bool, think_first: bool, collab=None) -> list[dict]:
    """The ranking prompt of a request, built like the training prompts (collab: the same evidence;
    a request has no user, so nobody is left out of the statistics)."""
    def as_dict(i: str) -> dict:
        it = items[i]
        return {"item_id": i, "title": it.get("title"), "caption": it.get("caption")}

    evidence = None if collab is None else collab.texts(list(history), list(candidates))
    return build_messages([as_dict(i) for i in history], [as_dict(i) for i in candidates],
                          with_captions=with_captions, think_first=think_first, evidence=evidence)


def answers(candidates: Sequence[str], items: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [answer_text(i, items[i].get("title")) for i in candidates]


def ranked_items(candidates: Sequence[str], scores: Sequence[float], items: Mapping[str, Mapping[str, Any]],
                 k: int) -> list[dict]:
    """Top-k candidates by score (ties keep the candidate order), as response rows."""
    order = sorted(range(len(candidates)), key=lambda j: -scores[j])[:k]
    return [{"rank": r + 1, "item_id": candidates[j], "title": items[candidates[j]].get("title"),
             "score": round(float(scores[j]), 4)} for r, j in enumerate(order)]


def explain_prefix(top_item: str, items: Mapping[str, Mapping[str, Any]], think_first: bool) -> str:
    """Assistant text the explanation is generated after: the chosen answer then `<think>` (paper
    order), so the reasoning is about the top-ranked item; or just `<think>` for think-first."""
    if think_first:
        return f"{THINK_OPEN}\n"
    return f"{answer_text(top_item, items[top_item].get('title'))}\n{THINK_OPEN}\n"


def cut_reasoning(text: str) -> str:
    """Generated reasoning up to `</think>` (or all of it when the budget ran out), trimmed."""
    text = text.split(THINK_CLOSE, 1)[0]
    return re.sub(r"\s+\n", "\n", text).strip()


class Retriever:
    """The retrieval stage: proposes the top-n catalogue items for a history, excluding the history.

    `pop` ranks the catalogue by interaction counts of training users; `sasrec` scores the
    whole catalogue with a SASRec trained on training users' sequences. Both are fitted the
    way the evaluated baselines are (`mllmrec baseline`), so served and evaluated models agree.
    """

    def __init__(self, name: str, order: list[str] | None = None, sasrec: Any = None, item_ids: list[str] | None = None):
        self.name = name
        self.order = order  # pop: the catalogue, most popular first
        self.sasrec = sasrec  # sasrec: a SASRecRanker
        self.item_ids = item_ids

    def top_n(self, histories: Sequence[Sequence[str]], n: int) -> list[list[str]]:
        if self.name == "pop":
            return [top_n_excluding(self.order, h, n) for h in histories]
        seen = [set(h) for h in histories]
        pools = [[i for i in self.item_ids if i not in s] for s in seen]
        return [r[:n] for r in self.sasrec.rank([list(h) for h in histories], pools)]


def fit_retriever(name: str, data_dir, seed: int = 0, sasrec_max_seconds: float = 120.0,
                  log=print) -> Retriever:
    """Fit the retrieval stage on the training users of a prepared data dir."""
    from pathlib import Path

    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    train_users = set(pq.read_table(data_dir / "samples.parquet", columns=["user_id"],
                                    filters=[("split", "==", "train")]).column("user_id").to_pylist())
    interactions = pq.read_table(data_dir / "interactions.parquet").to_pandas()
    item_ids = sorted(set(pq.read_table(data_dir / "items.parquet", columns=["item_id"]).column("item_id").to_pylist())
                      | set(interactions["item_id"]))
    if name == "pop":
        from mllmrec_ray.baselines.popularity import fit_popularity

        return Retriever("pop", order=popularity_order(fit_popularity(interactions, train_users), item_ids))
    if name == "sasrec":
        from mllmrec_ray.baselines.sasrec import fit_sasrec
        from mllmrec_ray.evaluation import load_split

        train = interactions[interactions["user_id"].isin(train_users)].sort_values("timestamp", kind="stable")
        sequences = train.groupby("user_id", sort=True)["item_id"].apply(list).tolist()
        valid, _ = load_split(data_dir, "valid", 10)
        early_stop = ((valid["history"].tolist(), valid["candidates"].tolist(), valid["target"].tolist())
                      if len(valid) else None)
        ranker = fit_sasrec(sequences, item_ids, early_stop, seed=seed, max_seconds=sasrec_max_seconds, log=log)
        return Retriever("sasrec", sasrec=ranker, item_ids=item_ids)
    raise ValueError(f"serve.retrieval: {name!r} is not allowed; allowed values: 'pop', 'sasrec'")
