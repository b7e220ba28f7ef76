"""The OpenAI-compatible refiner against a fake server on 127.0.0.1: retries, cache, rate limit, judge retries."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from actors.cot_generator import OpenAIGenerator
from mllmrec_ray.stage1.cot_prompts import JUDGE_DIMENSIONS

GOOD_JUDGE = json.dumps({d: {"score": 4, "evidence": "It says warm colours."} for d in JUDGE_DIMENSIONS})


class FakeOpenAI:
    """`script(n, body) -> (status, reply text or dict)` decides each answer; requests are recorded."""

    def __init__(self, script):
        self.script, self.requests, self.lock = script, [], threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization"),
                                          "t": time.monotonic()})
                    n = len(fake.requests)
                status, reply = fake.script(n, body)
                if isinstance(reply, str):
                    reply = {"choices": [{"message": {"role": "assistant", "content": reply},
                                          "finish_reason": "stop"}], "usage": {"completion_tokens": 5}}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(script):
        servers.append(FakeOpenAI(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def batch(*texts: str) -> dict:
    msgs = [json.dumps([{"role": "user", "content": t}]) for t in texts]
    return {"key": np.array([f"k{i}" for i in range(len(texts))]), "sample_id": np.array(["u1"] * len(texts)),
            "messages": np.array(msgs)}


def test_retries_on_429_and_500_then_cache_hit(fake, tmp_path, monkeypatch):
    statuses = {1: (429, {"error": "slow down"}), 2: (500, {"error": "boom"})}
    server = fake(lambda n, body: statuses.get(n, (200, "Step 1: warm.\nStep 4: a warm comedy.")))
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    gen = OpenAIGenerator(server.url, "deepseek-r1", cache_dir=str(tmp_path / "cache"), backoff_s=0.01,
                          requests_per_second=None, api_key_env="FAKE_KEY")
    out = gen(batch("refine this"))
    assert out["text"] == ["Step 1: warm.\nStep 4: a warm comedy."] and out["key"] == ["k0"]
    assert out["sample_id"] == ["u1"] and "messages" not in out
    assert len(server.requests) == 3 and gen.stats["retries"] == 2
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "deepseek-r1" and first["body"]["messages"][0]["content"] == "refine this"
    # the same request again: answered from the cache, the server sees nothing
    again = OpenAIGenerator(server.url, "deepseek-r1", cache_dir=str(tmp_path / "cache"), requests_per_second=None)
    assert again(batch("refine this"))["text"] == out["text"]
    assert len(server.requests) == 3 and again.stats["cache_hits"] == 1 and again.stats["requests"] == 0


def test_gives_up_after_max_retries_and_never_retries_a_400(fake):
    server = fake(lambda n, body: (503, {"error": "down"}))
    gen = OpenAIGenerator(server.url, "m", max_retries=2, backoff_s=0.01, requests_per_second=None)
    with pytest.raises(RuntimeError, match="giving up after 3 tries"):
        gen(batch("x"))
    assert len(server.requests) == 3
    bad = fake(lambda n, body: (400, {"error": "bad request"}))
    gen = OpenAIGenerator(bad.url, "m", backoff_s=0.01, requests_per_second=None)
    with pytest.raises(RuntimeError, match="400"):
        gen(batch("x"))
    assert len(bad.requests) == 1


def test_rate_limit_spaces_request_starts(fake):
    server = fake(lambda n, body: (200, "ok"))
    gen = OpenAIGenerator(server.url, "m", requests_per_second=10, max_concurrency=4)
    t0 = time.monotonic()
    gen(batch(*[f"prompt {i}" for i in range(5)]))
    # 5 starts at least 0.1 s apart (a lower bound: load on the machine can only stretch it;
    # server-side arrival gaps are not checked since a loaded server thread can bunch them)
    assert time.monotonic() - t0 >= 0.38
    assert len(server.requests) == 5


def test_judge_retries_invalid_replies_then_records_invalid(fake, tmp_path):
    # prompt "a": invalid first, valid second; prompt "b": always invalid
    def script(n, body):
        content = body["messages"][0]["content"]
        if content == "a" and body.get("seed") == 2:
            return 200, GOOD_JUDGE
        return 200, "Sure! Here are my scores: 4, 4, 5"

    server = fake(script)
    gen = OpenAIGenerator(server.url, "judge", cache_dir=str(tmp_path / "c"), judge=True, judge_retries=2,
                          requests_per_second=None, json_schema={"type": "object"})
    out = gen(batch("a", "b"))
    assert out["valid"] == [True, False]
    assert out["attempts"] == [2, 3]
    assert json.loads(out["scores"][0])["leakage_risk"] == {"score": 4, "evidence": "It says warm colours."}
    assert out["scores"][1] is None  # never guessed
    assert server.requests[0]["body"]["response_format"] == {"type": "json_object"}
    assert len(server.requests) == 5  # a: 2 tries, b: 3 tries
