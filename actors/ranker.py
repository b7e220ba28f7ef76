"""The trained ranker on Ray Serve: retrieval (Popularity or SASRec) then LLM re-ranking.

`POST /recommend` takes a `RecommendRequest` and answers a `RecommendResponse`
(`mllmrec_ray.ranking.serve_logic`; both schemas are in `/openapi.json` and on `/docs`). Without
candidates the retrieval stage proposes the `serve.retrieval_top_n` best items not in the
history; the LLM then ranks them with the evaluated readout and order ensemble
(`mllmrec_ray.ranking.scoring.rank_samples_over_orders`: transformers on a CPU replica, vLLM with
prefix caching on a replica that holds a GPU). With `explain`, the model writes its reasoning
greedily after the top-ranked answer and `<think>`.

Batching: `@serve.batch` gathers requests that arrive within `serve.batch_wait_timeout_s` and
hands them to a FIFO in front of the model (`ModelQueue`); each model call takes the oldest
`serve.max_batch_size` waiting requests and ranks them in one call of the ranking function. So
requests that queue up while the model is busy run together in the next call, in arrival order,
instead of one small batch after another (measured: with Serve's queue alone, most batches under
load held 1 request). Explanations are generated through a second FIFO, so a request that asks
for one does not hold up the rankings batched with it. One model call runs at a time per replica
(the cores are shared), in a worker thread so `/healthz` stays responsive.

Bad requests get a 4xx whose JSON names the field; an unexpected error answers 500 and the
replica keeps serving. `check_health` (Serve's hook) fails a replica whose model cannot score
or whose model call has hung.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from mllmrec_ray.config import EngineConfig, PipelineConfig, PromptConfig, ServeConfig
from mllmrec_ray.prompting.prompts import render_prompt
from mllmrec_ray.ranking.scoring import rank_samples_over_orders
from mllmrec_ray.ranking.serve_logic import (
    MAX_BODY_BYTES,
    ErrorResponse,
    RecommendRequest,
    RecommendResponse,
    RequestError,
    Retriever,
    answers,
    cut_reasoning,
    explain_prefix,
    fit_retriever,
    parse_request,
    prompt_messages,
    ranked_items,
)

logger = logging.getLogger("ray.serve")
APP_NAME = "mllmrec-ranker"
EXPLAIN_MAX_NEW_TOKENS = 64
HEALTH_FRESH_S = 30.0  # a batch that succeeded this recently proves the model works: no probe
HEALTH_STUCK_S = 600.0  # a model call running longer than this has hung (a batch of 8 takes seconds)

app = FastAPI(title="mllmrec ranker")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError("body", f"{declared} bytes; at most {limit} are allowed", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body", f"more than {limit} bytes; at most {limit} are allowed", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(e), "field": e.field}, status_code=e.status)


# The body is read and validated by hand against the pydantic model rather than declared as a
# typed FastAPI parameter: that keeps the size limit before the body is read (413), accepts any
# content type (`curl -d` sends form-encoded), checks the catalogue in the same validation pass,
# and answers 400 naming the field instead of FastAPI's 422. The schema is published all the same.
RECOMMEND_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RecommendRequest.model_json_schema()}}}}
ERROR_RESPONSES = {400: {"model": ErrorResponse, "description": "a bad request; `field` names the culprit"},
                   413: {"model": ErrorResponse, "description": f"a body over {MAX_BODY_BYTES} bytes"},
                   500: {"model": ErrorResponse, "description": "an unexpected error; the replica keeps serving"}}


class HFBackend:
    """transformers on CPU: `HFScorer` (prompts batched into one forward, answers over their KV caches)
    and greedy generate."""

    name = "transformers"

    def __init__(self, model: str, dtype: str, threads: int | None = None):
        from mllmrec_ray.ranking.scoring import HFScorer

        self.scorer = HFScorer(model, dtype=dtype, threads=threads)
        self.tokenizer = self.scorer.tokenizer
        self.max_len = int(getattr(self.scorer.model.config, "max_position_embeddings", 2048))

    def score(self, prompt_ids: list[list[int]], answer_ids: list[list[list[int]]]) -> list[list[float]]:
        return self.scorer.score(prompt_ids, answer_ids)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of token-id prompts, as one left-padded batch."""
        torch = self.scorer.torch
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.scorer.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                             do_sample=False, pad_token_id=pad)
        return tok.batch_decode(out[:, width:], skip_special_tokens=True)


class VLLMBackend:
    """vLLM (GPU replicas): `VLLMScorer` reads each prompt from the prefix cache; greedy = temperature 0."""

    name = "vllm"

    def __init__(self, model: str, engine_cfg: EngineConfig):
        from mllmrec_ray.runtime.engine import Engine
        from mllmrec_ray.ranking.scoring import VLLMScorer

        self.engine = Engine(model, engine_cfg)
        self.scorer = VLLMScorer(self.engine)
        self.tokenizer = self.engine.tokenizer
        self.max_len = engine_cfg.max_model_len

    def score(self, prompt_ids: list[list[int]], answer_ids: list[list[list[int]]]) -> list[list[float]]:
        return self.scorer.score(prompt_ids, answer_ids)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of token-id prompts (temperature 0)."""
        groups = self.engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_new_tokens)
        return [g[0].text for g in groups]


class RankerCore:
    """What a replica does, without Serve: rank a batch of validated requests, explain, probe.

    `rank` turns a list of requests into one call of the ranking function, so a scorer that
    batches prompts into one forward gets every request's rows at once. Model calls hold
    `lock`: one at a time, and `health` can tell a busy model from a hung one.
    """

    def __init__(self, backend, items: dict, collab, retriever: Retriever, serve_cfg: ServeConfig,
                 prompt_cfg: PromptConfig, readout: str = "answer", order_ensemble: int = 0):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.items = items
        self.titles = {i: it.get("title") for i, it in items.items()}
        # the evaluated prompt and readout: what is measured is what is served
        self.collab = collab
        self.retriever = retriever
        self.cfg = serve_cfg
        self.prompt = prompt_cfg
        self.readout = readout
        self.order_ensemble = order_ensemble
        self.lock = threading.Lock()
        self.busy_since: float | None = None
        self.last_ok = 0.0  # monotonic time of the last successful model call

    def parse(self, body: bytes) -> RecommendRequest:
        return parse_request(body, self.items, self.cfg.max_history, self.cfg.retrieval_top_n)

    def _model_call(self, fn, *args):
        with self.lock:
            self.busy_since = time.monotonic()
            try:
                out = fn(*args)
            finally:
                self.busy_since = None
            self.last_ok = time.monotonic()
            return out

    def rank(self, reqs: list[RecommendRequest]) -> list:
        """Retrieve (where no candidates were given) and score every candidate of every request.

        Returns per request `(response dict, explain prompt ids or None)`, or a RequestError for a
        prompt over the model's length.
        """
        need = [r for r in reqs if r.candidates is None]
        retrieved = iter(self.retriever.top_n([r.history for r in need], self.cfg.retrieval_top_n) if need else [])
        pools = [r.candidates if r.candidates is not None else next(retrieved) for r in reqs]
        out: list = [None] * len(reqs)
        work = []
        for n, (r, pool) in enumerate(zip(reqs, pools)):
            if not pool:  # a history that covers the whole catalogue leaves nothing to retrieve
                out[n] = RequestError("history", "every catalogue item is in the history; nothing left to recommend")
                continue
            messages = self._messages({"history": r.history, "candidates": pool})
            ids = self._encode(render_prompt(self.tokenizer, messages))
            answer_ids = [self._encode(a) for a in answers(pool, self.items)]
            length = len(ids) + max(map(len, answer_ids)) + (EXPLAIN_MAX_NEW_TOKENS + 32 if r.explain else 0)
            if length > self.backend.max_len:
                field = "history" if r.candidates is None else "candidates"
                out[n] = RequestError(field, f"the prompt needs {length} tokens, over the model's "
                                             f"{self.backend.max_len}; send fewer or shorter items")
            else:
                work.append((n, pool, ids))
        if work:
            rows = [{"history": reqs[n].history, "candidates": pool} for n, pool, _ in work]
            scores = self._model_call(rank_samples_over_orders, self.backend, self.tokenizer, rows, self._messages,
                                      self.titles, self.readout, self.order_ensemble)[1]
            logger.info("ranked a batch of %d request(s), %d candidates", len(work), sum(len(w[1]) for w in work))
            for (n, pool, ids), s in zip(work, scores):
                r = reqs[n]
                ranked = ranked_items(pool, s, self.items, r.k)
                explain_ids = None
                if r.explain:
                    explain_ids = ids + self._encode(explain_prefix(ranked[0]["item_id"], self.items,
                                                                    self.prompt.think_first))
                out[n] = ({"items": ranked, "retrieval": self.retriever.name if r.candidates is None else "given"},
                          explain_ids)
        return out

    def warm(self) -> None:
        """Rank for two catalogue histories once before serving: pays the first call's allocations, and the
        scorer finds the head every prompt shares, which a lone request can reuse but not find."""
        ids = list(self.items)[:4]
        if len(ids) == 4:
            rows = [{"history": [ids[0]], "candidates": ids[2:]}, {"history": [ids[1]], "candidates": ids[2:]}]
            self._model_call(rank_samples_over_orders, self.backend, self.tokenizer, rows, self._messages,
                             self.titles, self.readout, 0)

    def explain(self, prompts: list[list[int]]) -> list[str]:
        """The model's reasoning after each prompt (prompt + top answer + `<think>`), one batched generate."""
        texts = self._model_call(self.backend.generate, prompts, EXPLAIN_MAX_NEW_TOKENS)
        return [cut_reasoning(t) for t in texts]

    def probe(self) -> None:
        """A tiny scoring call; raises unless it returns finite log-probabilities."""
        prompt = self._encode("Recently watched: [ITEM_1]")
        choices = [self._encode(" yes"), self._encode(" no")]
        (scores,) = self._model_call(self.backend.score, [prompt], [choices])
        if len(scores) != 2 or not all(math.isfinite(x) and x <= 0 for x in scores):
            raise RuntimeError(f"the model's probe returned {scores}, not two finite log-probabilities")

    def health(self, now: float | None = None) -> str:
        """Serve's health check: busy (a batch runs), recent (one succeeded lately) or probed.

        Never waits behind a batch (the check would time out under load and Serve would kill a
        working replica); a model call that has run for HEALTH_STUCK_S has hung and fails it.
        """
        now = time.monotonic() if now is None else now
        since = self.busy_since
        if since is not None:
            if now - since > HEALTH_STUCK_S:
                raise RuntimeError(f"a model call has run for {now - since:.0f} s (over {HEALTH_STUCK_S:.0f} s)")
            return "busy"
        if now - self.last_ok < HEALTH_FRESH_S:
            return "recent"
        if self.lock.locked():  # a batch took the lock since busy_since was read
            return "busy"
        self.probe()
        return "probed"

    def _messages(self, row: dict, without_history: bool = False) -> list[dict]:
        return prompt_messages([] if without_history else row["history"], row["candidates"], self.items,
                               self.prompt.with_captions, self.prompt.think_first, self.collab,
                               compact=self.prompt.instructions == "compact")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class ModelQueue:
    """FIFO in front of the model: each call of `fn` takes the oldest `max_size` waiting items.

    `put` returns at once with one future per item, so Serve's batch loop is never blocked behind
    a running call: batches it forms meanwhile join this queue and run together in the next call
    (Serve forms the next batch while one runs and would otherwise run them one after another).
    Queues sharing `lock` (an asyncio.Lock wakes its waiters in order) take turns on the model.
    """

    def __init__(self, fn, max_size: int, lock: asyncio.Lock):
        self.fn = fn
        self.max_size = max_size
        self.lock = lock
        self.pending: deque = deque()
        self.tasks: set = set()

    def put(self, items: list) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.pending.extend(zip(items, futures))
        # one turn per max_size items put: every item is taken by some turn, most by an earlier one
        for _ in range(-(-len(items) // self.max_size)):
            task = loop.create_task(self._turn())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return futures

    async def _turn(self) -> None:
        async with self.lock:
            take = []
            while self.pending and len(take) < self.max_size:
                item, future = self.pending.popleft()
                if not future.done():  # a caller that went away (cancelled) is skipped
                    take.append((item, future))
            if not take:
                return
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in take])
            except Exception as e:
                for _, future in take:
                    if not future.done():
                        future.set_exception(e)
                return
            for (_, future), result in zip(take, results):
                if not future.done():
                    future.set_result(result)


def make_backend(model: str, engine_cfg: EngineConfig, gpu: bool, threads: int | None = None):
    """vLLM where the replica holds a GPU; transformers on CPU (faster there for scoring, no engine start-up)."""
    return VLLMBackend(model, engine_cfg) if gpu else HFBackend(model, engine_cfg.dtype, threads)


def replica_threads(serve_cfg: ServeConfig) -> int:
    """Torch threads of a CPU replica: its CPU reservation (`serve.resources.num_cpus`), at least 1."""
    resources = getattr(serve_cfg, "resources", None)
    return max(1, int(resources.num_cpus if resources else 1))


# Serve snapshots the class's globals when decorating it: everything it uses is defined above.
@serve.deployment(name="Ranker")
@serve.ingress(app)
class Ranker:
    def __init__(self, model: str, data_dir: str, captions: str | None, retriever: Retriever,
                 serve_cfg: ServeConfig, prompt_cfg: PromptConfig, engine_cfg: EngineConfig, readout: str = "answer",
                 order_ensemble: int = 0):
        import ray

        from mllmrec_ray.data.run_data import load_collab, load_items

        items = load_items(data_dir, captions if prompt_cfg.with_captions else None)
        backend = make_backend(model, engine_cfg, bool(ray.get_gpu_ids()), replica_threads(serve_cfg))
        self.core = RankerCore(backend, items, load_collab(data_dir, prompt_cfg), retriever, serve_cfg, prompt_cfg,
                               readout, order_ensemble)
        self.core.warm()
        self.model_name = Path(model).name
        model_turns = asyncio.Lock()
        self.rank_queue = ModelQueue(self.core.rank, serve_cfg.max_batch_size, model_turns)
        self.explain_queue = ModelQueue(self.core.explain, serve_cfg.max_batch_size, model_turns)
        for batcher in (self.rank_batch, self.explain_batch):
            batcher.set_max_batch_size(serve_cfg.max_batch_size)
            batcher.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name, "backend": self.core.backend.name,
                "items": len(self.core.items), "retrieval": self.core.retriever.name,
                "replica": serve.get_replica_context().replica_id.unique_id}

    async def check_health(self) -> None:
        """Serve's hook (every health_check_period_s): raising marks the replica unhealthy and restarts it."""
        await asyncio.to_thread(self.core.health)

    @app.post("/recommend", response_model=RecommendResponse, response_model_exclude_unset=True,
              openapi_extra=RECOMMEND_OPENAPI, responses=ERROR_RESPONSES)
    async def recommend(self, request: Request):
        try:
            req = self.core.parse(await read_body(request, MAX_BODY_BYTES))
        except RequestError as e:
            return error_response(e)
        try:
            result = await (await self.rank_batch(req))
            if isinstance(result, RequestError):
                return error_response(result)
            response, explain_ids = result
            if explain_ids is not None:
                response["reasoning"] = await (await self.explain_batch(explain_ids))
            return RecommendResponse(**response)
        except Exception as e:  # never let one request take the replica down
            logger.exception("ranking failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"[:500], "field": None},
                                status_code=500)

    # Serve's batching gathers arrivals (size and wait set from serve.* in __init__); each caller
    # gets a future of its own result from the model FIFO and awaits it.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def rank_batch(self, reqs: list[RecommendRequest]) -> list[asyncio.Future]:
        return self.rank_queue.put(reqs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def explain_batch(self, prompts: list[list[int]]) -> list[asyncio.Future]:
        return self.explain_queue.put(prompts)


def deployment_options(cfg: ServeConfig) -> dict:
    """Replicas (fixed, or autoscaling between `replicas` and `max_replicas`) and per-replica resources.

    `serve.max_replicas`, `serve.target_ongoing_requests` and `serve.resources` are read when the
    config carries them; otherwise the deployment runs `serve.replicas` replicas of 1 CPU each.
    """
    resources = getattr(cfg, "resources", None)
    opts = {
        "max_ongoing_requests": 2 * cfg.max_batch_size,  # room to fill a batch while one runs
        "ray_actor_options": {"num_cpus": resources.num_cpus if resources else 1.0,
                              "num_gpus": resources.num_gpus if resources else 0.0},
    }
    max_replicas = getattr(cfg, "max_replicas", cfg.replicas)
    if max_replicas > cfg.replicas:
        opts["autoscaling_config"] = {"min_replicas": cfg.replicas, "max_replicas": max_replicas,
                                      "target_ongoing_requests": getattr(cfg, "target_ongoing_requests",
                                                                         cfg.max_batch_size)}
    else:
        opts["num_replicas"] = cfg.replicas
    return opts


def default_captions(data_dir: str | Path) -> Path | None:
    """Stage I captions of the run the data dir belongs to (`<run>/stage1/captions.parquet`)."""
    path = Path(data_dir).resolve().parent / "stage1" / "captions.parquet"
    return path if path.exists() else None


def build_app(cfg: PipelineConfig, model: str, data_dir: str | Path, captions: str | Path | None = None):
    """The Serve application: fits the retrieval stage here, once, and ships it to every replica."""
    from mllmrec_ray.runtime.models import resolve_model

    data_dir = Path(data_dir).resolve()
    for name in ("items.parquet", "interactions.parquet", "samples.parquet"):
        if not (data_dir / name).exists():
            raise FileNotFoundError(f"--data {data_dir}: {name} is missing (run `mllmrec data prepare` first)")
    captions = captions if captions is not None else default_captions(data_dir)
    retriever = fit_retriever(cfg.serve.retrieval, data_dir, seed=cfg.data.seed)
    return Ranker.options(**deployment_options(cfg.serve)).bind(
        resolve_model(str(model)), str(data_dir), None if captions is None else str(captions), retriever,
        cfg.serve, cfg.prompt, cfg.model.engine, cfg.eval.readout, cfg.eval.order_ensemble)


def app_builder(args: dict):
    """Entry point for Serve config files (KubeRay RayService `import_path: actors.ranker:app_builder`).

    args: `model` (path or cache alias), `data` (prepared data dir), optional `config` (pipeline YAML)
    and `captions`.
    """
    from mllmrec_ray.config import load_config

    cfg = load_config(args["config"]) if args.get("config") else PipelineConfig()
    return build_app(cfg, args["model"], args["data"], args.get("captions"))
