"""Pure helpers of the Serve ranker (no Ray): request and response models, retrieval, prompts.

A request is JSON `{"history": [item ids], "candidates": [item ids] (optional), "k": int,
"explain": bool}` (`RecommendRequest`); the answer is a `RecommendResponse`. Item ids are
strings (ints are accepted and read as their decimal string). The pydantic models are the
one definition of the API: `/openapi.json` publishes their schemas and `parse_request`
validates with them, catalogue and config limits included (validation context). Every
rejection is a `RequestError` whose message starts with the offending field, with an HTTP
status: 413 for a body over the size limit, 400 for the rest.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Mapping, Sequence

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from mllmrec_ray.prompting.prompts import answer_text, build_messages

MAX_BODY_BYTES = 64 * 1024  # a 50-item history + 100 candidates is ~2 KB of JSON
MAX_CANDIDATES = 100
FIELDS = ("history", "candidates", "k", "explain")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


ItemId = StrictStr | StrictInt  # strict: true, 1.5 and "1" + 1 mistakes are rejected, not coerced


def _shown(value: Any) -> str:
    return json.dumps(value, default=str)[:40]


def _check_ids(ids: list[str], info: ValidationInfo, limit: int | None) -> list[str]:
    """Catalogue and length checks; they need the replica's catalogue, passed as validation context."""
    ctx = info.context or {}
    if limit is not None and len(ids) > limit:
        raise PydanticCustomError("too_long", "{n} items; at most {limit} are allowed", {"n": len(ids), "limit": limit})
    items = ctx.get("items")
    if items is not None:
        unknown = [i for i in ids if i not in items]
        if unknown:
            shown = ", ".join(repr(i[:40]) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise PydanticCustomError("unknown_items", "unknown item ids: {shown}", {"shown": shown})
    return ids


class RecommendRequest(BaseModel):
    """POST /recommend: rank `candidates` (or the retrieval stage's top-N) for a user's `history`."""

    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(min_length=1, examples=[["50", "181", "258"]],
                                  description="the user's items, oldest first (at most serve.max_history)")
    candidates: list[ItemId] | None = Field(
        None, min_length=1, max_length=MAX_CANDIDATES,
        description="items to rank, no duplicates; omitted or null: the retrieval stage proposes serve.retrieval_top_n")
    k: StrictInt | None = Field(None, ge=1, validate_default=True,
                                description="how many ranked items to return (default min(10, candidates))")
    explain: StrictBool = Field(False, description="also generate the model's reasoning for its top item")

    @field_validator("history")
    @classmethod
    def _history(cls, v: list, info: ValidationInfo) -> list[str]:
        return _check_ids([str(i) for i in v], info, (info.context or {}).get("max_history"))

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return None
        ids = _check_ids([str(i) for i in v], info, None)
        if len(set(ids)) != len(ids):
            raise PydanticCustomError("duplicates", "duplicate item ids")
        return ids

    @field_validator("k")
    @classmethod
    def _k(cls, v: int | None, info: ValidationInfo) -> int | None:
        """k against the pool it picks from: the candidates, or the retrieval size (a config value)."""
        if "candidates" not in info.data:  # candidates failed: that error is reported first
            return v
        candidates = info.data["candidates"]
        pool = len(candidates) if candidates is not None else (info.context or {}).get("retrieval_top_n")
        if pool is None:
            return v
        if v is None:
            return min(10, pool)
        if v > pool:
            where = "the number of candidates" if candidates is not None else "the retrieval size"
            raise PydanticCustomError("k_range", "{k} is out of range; allowed 1..{pool} ({where})",
                                      {"k": v, "pool": pool, "where": where})
        return v


class RankedItem(BaseModel):
    rank: int = Field(ge=1, description="1 = best")
    item_id: str
    title: str | None
    score: float = Field(description="the model's log-likelihood score of the item (higher ranks first)")


class RecommendResponse(BaseModel):
    items: list[RankedItem] = Field(description="the top k candidates, best first")
    retrieval: Literal["pop", "sasrec", "given"] = Field(
        description="where the candidates came from: the retrieval stage (pop / sasrec) or the request (given)")
    reasoning: str | None = Field(None, description="the model's reasoning about its top item; only with explain")


class ErrorResponse(BaseModel):
    error: str = Field(description="`<field>: <what is wrong>`")
    field: str | None = Field(None, description="the offending request field (`body` for the body as a whole)")


def _as_request_error(e: ValidationError) -> RequestError:
    """The first validation error as a RequestError naming the field, in words a client can act on."""
    err = e.errors(include_url=False)[0]
    loc, kind, value = err["loc"], err["type"], err.get("input")
    if not loc:
        if kind == "json_invalid":
            return RequestError("body", f"malformed JSON ({err['msg'].removeprefix('Invalid JSON: ')})")
        return RequestError("body", f"expected a JSON object with {', '.join(FIELDS)}")
    field = str(loc[0])
    if kind == "extra_forbidden":
        return RequestError(field, f"unknown field; allowed fields: {', '.join(FIELDS)}")
    if kind == "missing":
        return RequestError(field, "missing (a list of item ids, oldest first)")
    if len(loc) > 1:  # one element of an id list
        return RequestError(field, f"item ids are strings or integers, got {_shown(value)}")
    messages = {
        "list_type": lambda: f"expected a list of item ids, got {type(value).__name__}",
        "too_short": lambda: "must not be empty",
        "too_long": lambda: f"{len(value)} items; at most {err['ctx']['max_length']} are allowed"
        if "max_length" in err.get("ctx", {}) else err["msg"],
        "int_type": lambda: f"expected an integer, got {_shown(value)}",
        "bool_type": lambda: f"expected true or false, got {_shown(value)}",
        "greater_than_equal": lambda: f"{_shown(value)} is out of range; at least {err['ctx']['ge']}",
    }
    return RequestError(field, messages[kind]() if kind in messages else err["msg"])


def parse_request(body: bytes, items: Mapping[str, Any], max_history: int, retrieval_top_n: int,
                  max_body_bytes: int = MAX_BODY_BYTES) -> RecommendRequest:
    """Validate a /recommend body against the catalogue; raises RequestError naming the field.

    The returned request has string ids and `k` resolved (its default depends on the pool size).
    """
    if len(body) > max_body_bytes:
        raise RequestError("body", f"{len(body)} bytes; at most {max_body_bytes} are allowed", 413)
    try:
        return RecommendRequest.model_validate_json(
            body, context={"items": items, "max_history": max_history, "retrieval_top_n": retrieval_top_n})
    except ValidationError as e:
        raise _as_request_error(e) from None


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
                    with_captions: bool, think_first: bool, collab=None, compact: bool = False) -> list[dict]:
    """The ranking prompt of a request, built like the training prompts (collab: the same evidence;
    a request has no user, so nobody is left out of the statistics)."""
    def as_dict(i: str) -> dict:
        it = items[i]
        return {"item_id": i, "title": it.get("title"), "caption": it.get("caption")}

    evidence = None if collab is None else collab.texts(list(history), list(candidates))
    return build_messages([as_dict(i) for i in history], [as_dict(i) for i in candidates],
                          with_captions=with_captions, think_first=think_first, evidence=evidence,
                          legend=None if collab is None else collab.legend(evidence), compact=compact)


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
        from mllmrec_ray.ranking.evaluation import load_split

        train = interactions[interactions["user_id"].isin(train_users)].sort_values("timestamp", kind="stable")
        sequences = train.groupby("user_id", sort=True)["item_id"].apply(list).tolist()
        valid, _ = load_split(data_dir, "valid", 10)
        early_stop = ((valid["history"].tolist(), valid["candidates"].tolist(), valid["target"].tolist())
                      if len(valid) else None)
        ranker = fit_sasrec(sequences, item_ids, early_stop, seed=seed, max_seconds=sasrec_max_seconds, log=log)
        return Retriever("sasrec", sasrec=ranker, item_ids=item_ids)
    raise ValueError(f"serve.retrieval: {name!r} is not allowed; allowed values: 'pop', 'sasrec'")
