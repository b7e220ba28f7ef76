"""Ray Data callables for Stage I text generation (pseudo-CoT, refinement, judge).

Rows arrive with `key` and `messages` (chat messages as JSON, built by the job from
`mllmrec_ray.stage1.cot_prompts`, i.e. from the history only) and leave with the generated
`text`. The callables never see a target: sanitising and storing happen in
`mllmrec_ray.stage1.store.store_generations`, a separate step that gets the targets from the job.

- `LocalGenerator`: one vLLM engine per actor (`mllmrec_ray.runtime.engine.Engine`), any local
  model; text prompts go through the model's chat template, prompts with image parts
  through vLLM's multimodal chat input.
- `OpenAIGenerator`: an OpenAI-compatible `/chat/completions` endpoint (e.g. DeepSeek-R1)
  with retries (429, 5xx, connection errors; `Retry-After` honoured), a minimum interval
  between requests, a few requests in flight, and an on-disk response cache.
- `judge=True`: replies are parsed with the Appendix D parser; an invalid reply is asked
  again up to `judge_retries` times, then recorded as invalid (never repaired).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mllmrec_ray.stage1.store import batch_id


def _judge_fields(text: str | None, attempts: int) -> dict:
    from mllmrec_ray.stage1.cot_prompts import parse_judge

    parsed = parse_judge(text)
    return {"valid": parsed is not None, "scores": json.dumps(parsed) if parsed else None, "attempts": attempts}


class LocalGenerator:
    """`map_batches` callable: messages -> text with a local vLLM engine.

    model: local dir or cache alias; engine: `EngineConfig` fields; sampling: temperature,
    top_p, max_tokens. json_schema: constrain the output (vLLM structured outputs), used
    for the judge.
    """

    def __init__(self, model: str, engine: dict | None = None, sampling: dict | None = None,
                 judge: bool = False, judge_retries: int = 2, json_schema: dict | None = None,
                 max_images: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from mllmrec_ray.config import EngineConfig
        from mllmrec_ray.runtime.engine import Engine
        from mllmrec_ray.runtime.models import resolve_model

        extra: dict[str, Any] = {"limit_mm_per_prompt": {"image": max_images}} if max_images else {}
        if json_schema is not None:  # compact JSON: no whitespace runs eating the token budget
            from vllm.config import StructuredOutputsConfig

            extra["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        self.engine = Engine(resolve_model(model), EngineConfig(**(engine or {})), **extra)
        self.sampling = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256, **(sampling or {})}
        self.judge, self.judge_retries, self.json_schema = judge, judge_retries, json_schema
        self.calls = 0  # engine requests made by this actor

    def _run(self, conversations: list[list[dict]]) -> list[tuple[str, str | None, int]]:
        """(text, finish_reason, completion tokens) per conversation, in order."""
        from mllmrec_ray.prompting.prompts import render_prompt

        if any(isinstance(m["content"], list) for conv in conversations for m in conv):
            self.calls += len(conversations)
            outs = self.engine.chat([_with_images(c) for c in conversations], self.sampling, self.json_schema)
            return [(o.text, o.finish_reason, o.completion_tokens) for o in outs]
        ids = [self.engine.encode(render_prompt(self.engine.tokenizer, c)) for c in conversations]
        # A prompt that leaves no room for the answer is recorded as such, not sent (vLLM would fail the batch).
        room = self.engine.config.max_model_len - 16
        fits = [i for i, x in enumerate(ids) if len(x) <= room]
        results = [("", "prompt_too_long", 0)] * len(ids)
        if fits:
            self.calls += len(fits)
            outs = self.engine.complete([ids[i] for i in fits], self.sampling, self.json_schema)
            for i, o in zip(fits, outs):
                results[i] = (o.text, o.finish_reason, o.completion_tokens)
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from mllmrec_ray.runtime.engine import restore_thread_budget

        # In the thread that generates (Ray Data may call from another thread than __init__'s):
        # the engine's attention metadata and kernels then agree on the actor's thread count.
        restore_thread_budget()
        t0 = time.perf_counter()
        conversations = [json.loads(m) for m in batch["messages"]]
        results = self._run(conversations)
        out = _passthrough(batch)
        out.update({"text": [r[0] for r in results], "finish_reason": [r[1] for r in results],
                    "completion_tokens": [r[2] for r in results]})
        if self.judge:
            attempts = [1] * len(results)
            for _ in range(self.judge_retries):
                bad = [i for i, r in enumerate(results) if not _judge_fields(r[0], 1)["valid"]]
                if not bad:
                    break
                again = self._run([conversations[i] for i in bad])
                for i, r in zip(bad, again):
                    results[i], attempts[i] = r, attempts[i] + 1
            fields = [_judge_fields(r[0], a) for r, a in zip(results, attempts)]
            out["text"] = [r[0] for r in results]
            out.update({k: [f[k] for f in fields] for k in ("valid", "scores", "attempts")})
        out["batch_seconds"] = [round(time.perf_counter() - t0, 3)] * len(results)  # engine time of this batch
        out["torch_threads"] = [torch.get_num_threads()] * len(results)  # the compute width it ran with
        out["batch"] = [batch_id(batch["key"])] * len(results)
        return out


def _passthrough(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """The batch's columns except the prompt itself (ids and keys travel on)."""
    return {k: list(v) for k, v in batch.items() if k != "messages"}


def _with_images(conversation: list[dict]) -> list[dict]:
    """Replace `{"type": "image", "image_path": p}` parts by PIL images for vLLM's chat input."""
    from PIL import Image

    out = []
    for m in conversation:
        if isinstance(m["content"], list):
            parts = []
            for p in m["content"]:
                if p["type"] == "image":
                    parts.append({"type": "image_pil", "image_pil": Image.open(p["image_path"]).convert("RGB")})
                else:
                    parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


class RateLimiter:
    """At most one request start per `min_interval` seconds (thread-safe)."""

    def __init__(self, requests_per_second: float | None):
        self.min_interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self.lock = threading.Lock()
        self.next_time = 0.0

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_time)
            self.next_time = start + self.min_interval
        if start > now:
            time.sleep(start - now)


class OpenAIGenerator:
    """`map_batches` callable: messages -> text through an OpenAI-compatible chat endpoint.

    endpoint: base URL (`http://127.0.0.1:8000/v1`); `/chat/completions` is appended.
    api_key_env: the environment variable holding the key (sent as a Bearer token when set).
    cache_dir: responses cached as `<sha256 of request>.json` (shared by actors and reruns).
    """

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, endpoint: str, model: str, sampling: dict | None = None, cache_dir: str | None = None,
                 max_retries: int = 5, backoff_s: float = 1.0, requests_per_second: float | None = 2.0,
                 max_concurrency: int = 4, timeout_s: float = 300.0, api_key_env: str = "OPENAI_API_KEY",
                 judge: bool = False, judge_retries: int = 2, json_schema: dict | None = None):
        import requests

        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.sampling = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 1024, **(sampling or {})}
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self.limiter = RateLimiter(requests_per_second)
        self.max_concurrency = max_concurrency
        self.judge, self.judge_retries = judge, judge_retries
        self.json_schema = json_schema
        self.session = requests.Session()
        key = os.environ.get(api_key_env)
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    def _body(self, messages: list[dict], attempt: int) -> dict:
        body = {"model": self.model, "messages": messages, **self.sampling}
        if self.json_schema is not None:
            body["response_format"] = {"type": "json_object"}
        if attempt > 1:  # a judge retry must not come back from the cache
            body["seed"] = attempt
        return body

    def complete(self, messages: list[dict], attempt: int = 1) -> tuple[str, str | None, int]:
        """(text, finish_reason, completion tokens) for one conversation; cached on disk."""
        from mllmrec_ray.io import atomic_write_json
        from mllmrec_ray.stage1.store import content_hash

        body = self._body(messages, attempt)
        path = self.cache_dir / f"{content_hash([self.url, body])}.json" if self.cache_dir else None
        if path is not None and path.exists():
            self.stats["cache_hits"] += 1
            reply = json.loads(path.read_text())
        else:
            reply = self._post(body)
            if path is not None:
                atomic_write_json(path, reply)
        choice = reply["choices"][0]
        text = choice["message"].get("content") or ""
        return text, choice.get("finish_reason"), int((reply.get("usage") or {}).get("completion_tokens") or 0)

    def _post(self, body: dict) -> dict:
        import requests

        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            self.stats["requests"] += 1
            try:
                r = self.session.post(self.url, json=body, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as e:
                error, wait = f"{type(e).__name__}: {e}", None
            else:
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in self.RETRY_STATUS:
                    raise RuntimeError(f"{self.url} answered {r.status_code}: {r.text[:300]}")
                error, wait = f"HTTP {r.status_code}", r.headers.get("Retry-After")
            if attempt == self.max_retries:
                raise RuntimeError(f"{self.url}: giving up after {attempt + 1} tries ({error})")
            self.stats["retries"] += 1
            try:
                delay = float(wait) if wait is not None else self.backoff_s * 2 ** attempt
            except ValueError:
                delay = self.backoff_s * 2 ** attempt
            time.sleep(min(delay, 60.0))
        raise AssertionError("unreachable")

    def _complete_all(self, conversations: list[list[dict]], attempt: int) -> list[tuple[str, str | None, int]]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(lambda c: self.complete(c, attempt), conversations))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        t0 = time.perf_counter()
        conversations = [json.loads(m) for m in batch["messages"]]
        results = self._complete_all(conversations, 1)
        out = _passthrough(batch)
        if self.judge:
            attempts = [1] * len(results)
            for n in range(2, self.judge_retries + 2):
                bad = [i for i, r in enumerate(results) if not _judge_fields(r[0], 1)["valid"]]
                if not bad:
                    break
                for i, r in zip(bad, self._complete_all([conversations[i] for i in bad], n)):
                    results[i], attempts[i] = r, n
            fields = [_judge_fields(r[0], a) for r, a in zip(results, attempts)]
            out.update({k: [f[k] for f in fields] for k in ("valid", "scores", "attempts")})
        out.update({"text": [r[0] for r in results], "finish_reason": [r[1] for r in results],
                    "completion_tokens": [r[2] for r in results],
                    "batch_seconds": [round(time.perf_counter() - t0, 3)] * len(results),
                    "batch": [batch_id(batch["key"])] * len(results)})
        return out
