"""The trained ranker on Ray Serve: retrieval (Popularity or SASRec) then LLM re-ranking.

`POST /recommend` `{"history": [ids], "candidates": [ids] (optional), "k": int, "explain": bool}`
-> `{"items": [{"rank", "item_id", "title", "score"}], "retrieval": "pop"|"sasrec"|"given",
"reasoning": str (when explain)}`. Without candidates the retrieval stage proposes the
`serve.retrieval_top_n` best items not in the history; the LLM then ranks them by the
log-likelihood of each answer `[ITEM_<id>] <title>` given the prompt, reading the shared
prompt once (`mllmrec_ray.scoring`: transformers on a CPU replica, vLLM with prefix caching
on a replica that holds a GPU). With `explain`, the model writes its reasoning greedily
after the top-ranked answer and `<think>`.

Requests are batched with `@serve.batch` (size and wait from `serve.*`); the model runs in
a worker thread so `/healthz` stays responsive. Bad requests get a 4xx whose JSON names the
field (`mllmrec_ray.serve_logic.parse_request`); an unexpected error answers 500 and the
replica keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from mllmrec_ray.config import EngineConfig, PipelineConfig, PromptConfig, ServeConfig
from mllmrec_ray.prompts import render_prompt
from mllmrec_ray.scoring import rank_samples_over_orders
from mllmrec_ray.serve_logic import (
    MAX_BODY_BYTES,
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


class HFBackend:
    """transformers on CPU: `HFScorer` (one prompt forward, answers over its KV cache) and greedy generate."""

    name = "transformers"

    def __init__(self, model: str, dtype: str):
        from mllmrec_ray.scoring import HFScorer

        self.scorer = HFScorer(model, dtype=dtype)
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
        from mllmrec_ray.engine import Engine
        from mllmrec_ray.scoring import VLLMScorer

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


# Serve snapshots the class's globals when decorating it: everything it uses is defined above.
@serve.deployment(name="Ranker")
@serve.ingress(app)
class Ranker:
    def __init__(self, model: str, data_dir: str, captions: str | None, retriever: Retriever,
                 serve_cfg: ServeConfig, prompt_cfg: PromptConfig, engine_cfg: EngineConfig, readout: str = "answer",
                 order_ensemble: int = 0):
        import ray

        from mllmrec_ray.run_data import load_collab, load_items

        self.items = load_items(data_dir, captions if prompt_cfg.with_captions else None)
        self.titles = {i: it.get("title") for i, it in self.items.items()}
        # the evaluated prompt and readout: what is measured is what is served
        self.collab = load_collab(data_dir, prompt_cfg)
        self.readout = readout
        self.order_ensemble = order_ensemble
        # vLLM where the replica holds a GPU; transformers on CPU (faster there for scoring, no engine start-up)
        self.backend = VLLMBackend(model, engine_cfg) if ray.get_gpu_ids() else HFBackend(model, engine_cfg.dtype)
        self.tokenizer = self.backend.tokenizer
        self.retriever = retriever
        self.cfg = serve_cfg
        self.prompt = prompt_cfg
        self.model_name = Path(model).name
        self.rank_batch.set_max_batch_size(serve_cfg.max_batch_size)
        self.rank_batch.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name, "backend": self.backend.name, "items": len(self.items),
                "retrieval": self.retriever.name, "replica": serve.get_replica_context().replica_id.unique_id}

    @app.post("/recommend")
    async def recommend(self, request: Request):
        try:
            body = await read_body(request, MAX_BODY_BYTES)
            req = parse_request(body, self.items, self.cfg.max_history, self.cfg.retrieval_top_n)
        except RequestError as e:
            return error_response(e)
        try:
            result = await self.rank_batch(req)
            return error_response(result) if isinstance(result, RequestError) else result
        except Exception as e:  # never let one request take the replica down
            logger.exception("ranking failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"[:500]}, status_code=500)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def rank_batch(self, reqs: list) -> list[dict]:
        return await asyncio.to_thread(self._rank, reqs)

    def _rank(self, reqs: list) -> list:
        """Retrieve (where no candidates were given), score every candidate, explain on request.

        Returns per request a response dict, or a RequestError for a prompt over the model's length.
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
                out[n] = RequestError(field, f"the prompt needs {length} tokens, over the model's {self.backend.max_len}; "
                                             "send fewer or shorter items")
            else:
                work.append((n, pool, ids, answer_ids))
        rows = [{"history": reqs[n].history, "candidates": pool} for n, pool, _, _ in work]
        scores = rank_samples_over_orders(self.backend, self.tokenizer, rows, self._messages, self.titles,
                                          self.readout, self.order_ensemble)[1] if work else []
        logger.info("ranked a batch of %d request(s), %d candidates", len(work), sum(len(w[1]) for w in work))
        explain = []  # (request index, prompt + the top answer + <think>)
        for (n, pool, ids, _), s in zip(work, scores):
            r = reqs[n]
            ranked = ranked_items(pool, s, self.items, r.k)
            out[n] = {"items": ranked, "retrieval": self.retriever.name if r.candidates is None else "given"}
            if r.explain:
                prefix = explain_prefix(ranked[0]["item_id"], self.items, self.prompt.think_first)
                explain.append((n, ids + self._encode(prefix)))
        if explain:
            texts = self.backend.generate([ids for _, ids in explain], EXPLAIN_MAX_NEW_TOKENS)
            for (n, _), text in zip(explain, texts):
                out[n]["reasoning"] = cut_reasoning(text)
        return out

    def _messages(self, row: dict, without_history: bool = False) -> list[dict]:
        return prompt_messages([] if without_history else row["history"], row["candidates"], self.items,
                               self.prompt.with_captions, self.prompt.think_first, self.collab)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


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
    from mllmrec_ray.models import resolve_model

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
