"""Rank candidates with an LLM: by answer log-likelihood (score mode) or a parsed top-K list (generate mode).

Score mode ranks candidate c by  log P(answer_text(c) | prompt)  = the SUM of the answer
tokens' log-probabilities (no EOS). Sum, not mean: it is the model's actual likelihood of
the answer, and the length bias is small here because every answer starts with its
`[ITEM_<id>]` tag and the title after it is nearly free once the model has chosen the id
(the prompt lists every candidate with its title); a mean would instead reward long titles.

Both scorers read the shared prompt once and compute only the short answers on top of it
(SmolLM2-135M, ~390-token prompts, 2 quiet cores, bf16: HFScorer 9-12 candidates/s, VLLMScorer
5-8, one naive forward per candidate ~1-2.6; `mllmrec eval` defaults to HFScorer):
- `HFScorer`: one transformers forward over the prompt, then batched forwards of all answers
  over copies of the prompt's key/value cache. The head every prompt shares (system prompt and
  the instructions before the history, ~56 of the demo's ~594 tokens) is computed once and its
  cache reused by every later prompt that starts with it.
- `VLLMScorer`: vLLM prefix caching; each prompt is prefilled once, then every
  prompt+answer request reads the cached prompt blocks and returns prompt logprobs for the
  answer tokens only (V1 skips the cache for prompt-logprob requests unless told otherwise;
  a request whose cache hit swallowed answer positions is recomputed without the cache).

Answers are tokenized on their own and appended to the prompt ids (the prompt ends with the
assistant opener and a newline, so the joint tokenization splits at the same place).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from mllmrec_ray.prompting.prompts import is_output_constraint
from mllmrec_ray.runtime.models import flush_denormals, resolve_dtype

# Shorter common heads are not worth a second forward (the demo's prompts share ~56 tokens of ~594).
MIN_SHARED_PREFIX = 16

RANKING_INSTRUCTION = (
    "Output format (strict): rank the {k} candidate items you consider most likely to be "
    "watched next, best first, one per line, each written as [ITEM_<id>] <title>. "
    "Write nothing else."
)


def rank_by_scores(candidates: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Candidates sorted by score, best first (ties keep the candidate order)."""
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    return [str(candidates[i]) for i in order]


def answer_ids(tokenizer: Any, answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer text, without special tokens."""
    return [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]


def ranking_messages(messages: list[dict], k: int) -> list[dict]:
    """Generate-mode prompt: the answer prompt with its output constraint replaced by a top-k list request."""
    head, sep, last = messages[-1]["content"].rpartition("\n\n")
    if not sep or not is_output_constraint(last):
        raise ValueError("the prompt's last paragraph is not the output constraint; cannot build a ranking prompt")
    return [*messages[:-1], {**messages[-1], "content": f"{head}\n\n{RANKING_INSTRUCTION.format(k=k)}"}]


class HFScorer:
    """Answer log-likelihoods with transformers: prompts batched into one forward, then every
    answer of every prompt packed into one more forward over their KV caches."""

    def __init__(self, model: str, dtype: str = "auto", chunk: int = 32, threads: int | None = None,
                 adapter: bool = False, batch: int = 8, share_prefix: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        flush_denormals()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.dtype = dtype = resolve_dtype(dtype)
        if adapter:
            self.model = load_with_adapter(model, getattr(torch, dtype))
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.chunk = chunk  # answers per prompt per packed forward
        self.batch = batch  # prompts per forward
        self.share_prefix = share_prefix
        self._prefix: tuple[list[int], Any] | None = None  # (ids, their KV cache at batch 1)

    def score(self, prompt_ids: list[list[int]], answers: list[list[list[int]]]) -> list[list[float]]:
        """Per prompt, the summed log-probability of each answer (token ids) given the prompt."""
        # similar lengths share a batch: less padding (prompts here run 550-820 tokens)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        out: list[list[float]] = [[] for _ in prompt_ids]
        flush_denormals()  # Serve calls this from a worker thread of its own
        with self.torch.inference_mode():
            prefix = self._shared_prefix(prompt_ids) if self.share_prefix and prompt_ids else None
            for start in range(0, len(order), self.batch):
                idx = order[start:start + self.batch]
                batch = self._score_batch([prompt_ids[i] for i in idx], [answers[i] for i in idx], prefix)
                for i, sc in zip(idx, batch):
                    out[i] = sc
        return out

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[list[int], Any] | None:
        """The prompts' common head (system prompt and the instructions before the history) with its KV
        cache, computed once and kept while later prompts start with it; None when they share too little.

        Every prompt keeps at least one token of its own: its last position's logits come from its row.
        """
        shortest = min(len(p) for p in prompts) - 1
        n = 0
        while n < shortest and all(p[n] == prompts[0][n] for p in prompts):
            n += 1
        cached = self._prefix
        if cached is not None and len(cached[0]) <= n and prompts[0][:len(cached[0])] == cached[0]:
            return cached
        # one prompt shares everything with itself: a lone request reuses a head but never sets one
        if len(prompts) < 2 or n < MIN_SHARED_PREFIX:
            return None
        ids = prompts[0][:n]
        self._prefix = (ids, self.model(self.torch.tensor([ids]), use_cache=True, logits_to_keep=1).past_key_values)
        return self._prefix

    def _score_batch(self, prompts: list[list[int]], answers: list[list[list[int]]],
                     prefix: tuple[list[int], Any] | None = None) -> list[list[float]]:
        """One right-padded forward over the prompts (each row's last real position predicts its
        answers' first tokens), then the answers in packed forwards over the cache. With `prefix`
        (ids every prompt starts with, and their cache) the forward covers the rest of each prompt only.

        Measured on 2 cores, bf16, 590-token prompts: batching 8 prompts cut the prompt forward from
        0.37 to 0.29 s per prompt, and one packed answer forward for 8 prompts costs about what one
        prompt's did (small matmuls are bound by reading the weights).
        """
        torch = self.torch
        head = len(prefix[0]) if prefix else 0
        lens = [len(p) - head for p in prompts]  # what this forward computes of each prompt
        width = max(lens)
        real = torch.tensor([[1] * (head + n) + [0] * (width - n) for n in lens])
        ids = torch.tensor([p[head:] + [self.pad] * (width - n) for p, n in zip(prompts, lens)])
        past = None
        if prefix:
            past = copy.deepcopy(prefix[1])
            past.batch_repeat_interleave(len(prompts))
        # Right padding follows every real token, so causal attention alone keeps it out and no mask
        # is passed: sdpa runs its causal kernel (8 x ~700 tokens: 1.92 s vs 2.41 s left-padded with a
        # mask; over a cached head transformers builds the causal mask itself, and the head still paid). Logits only at each row's last prompt position: a full-vocabulary projection at
        # every position was ~25% of the forward (0.25 s -> 0.19 s on a 560-token prompt).
        last = sorted({n - 1 for n in lens})
        res = self.model(ids, past_key_values=past, use_cache=True, logits_to_keep=torch.tensor(last))
        col = torch.tensor([last.index(n - 1) for n in lens])
        first = torch.log_softmax(res.logits[torch.arange(len(prompts)), col].float(), -1)
        scores = [[float(first[b, a[0]]) for a in ans] for b, ans in enumerate(answers)]
        cache = res.past_key_values
        for start in range(0, max(len(a) for a in answers), self.chunk):
            added = self._packed(scores, cache, real, [a[start:start + self.chunk] for a in answers], start)
            if added:
                cache.crop(-added)  # drop this chunk's answers: the next chunk sees the prompts only
        return scores

    def _packed(self, scores: list[list[float]], cache, real, batch: list[list[list[int]]], offset: int) -> int:
        """Add to `scores` the log-probabilities of every answer token after the first, with each
        prompt's answers packed into its row over the prompt cache; returns the tokens added.

        A 4D mask lets each answer token see its row's real prompt tokens and the earlier tokens of
        its own answer only. Copying the prompt's cache once per answer cost as much as the prompt
        itself (0.25-0.3 s per 600-token prompt, measured on 2 cores).
        """
        from mllmrec_ray.runtime.policy import packed_rows

        pieces = [[a[:-1] for a in ans] for ans in batch]
        if not any(p for row in pieces for p in row):
            return 0
        inputs, pos, mask = packed_rows(real.sum(1).tolist(), real.shape[1], pieces, self.pad,
                                        next(self.model.parameters()).dtype)
        q = inputs.shape[1]
        logits = self.model(inputs, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True).logits
        logp = self.torch.log_softmax(logits.float(), -1)
        for b, ans in enumerate(batch):
            at = 0
            for k, a in enumerate(ans):
                for j, tok in enumerate(a[1:]):
                    scores[b][offset + k] += float(logp[b, at + j, tok])
                at += len(a) - 1
        return q


def load_with_adapter(model_dir: str, dtype):
    """The model of `model_dir` as its base model + its saved LoRA adapter, unmerged.

    A merged bf16 model rounds W + dW back to bf16 and loses most of a small update (GRPO at a
    low lr); the unmerged adapter adds B @ A x on the side and keeps all of it.
    """
    import json
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(model_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}/adapter_config.json not found: {model_dir} has no saved adapter")
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not Path(base_path).exists():
        raise FileNotFoundError(f"{adapter}/adapter_config.json: base model {base_path} does not exist here")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    # The adapter in the scoring dtype: PEFT's default fp32 adapter casts every activation on the way
    # (16 demo prompts: 8.5 s vs 6.9 s in bf16, merged bf16 4.9 s). B @ A x in bf16 is still exact to
    # bf16's precision of the update itself, not of W + dW.
    return PeftModel.from_pretrained(base, str(adapter), autocast_adapter_dtype=False).eval()


class VLLMScorer:
    """Answer log-likelihoods with a vLLM `Engine`, reading each prompt from the prefix cache."""

    def __init__(self, engine: Any, prompts_per_batch: int = 8):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.block_size = engine.block_size
        self.prompts_per_batch = prompts_per_batch  # bounds the cached prompts between prefill and use

    def score(self, prompt_ids: list[list[int]], answers: list[list[list[int]]]) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(prompt_ids), self.prompts_per_batch):
            p_batch = prompt_ids[start:start + self.prompts_per_batch]
            a_batch = answers[start:start + self.prompts_per_batch]
            self.engine.prefill(p_batch)
            requests = [p + a for p, a_ids in zip(p_batch, a_batch) for a in a_ids]
            results = self.engine.prompt_logprobs(requests, use_cache=True)
            # Logprobs exist only from the first recomputed position on. A cache hit reaching the last
            # prompt token (a prompt filling whole blocks, or candidates sharing a block of answer
            # tokens such as "[ITEM_1") loses some: recompute those requests without the cache.
            starts = [len(p) for p, a_ids in zip(p_batch, a_batch) for _ in a_ids]
            redo = [i for i, ((_, cached), n) in enumerate(zip(results, starts)) if cached > n - 1]
            if redo:
                for i, r in zip(redo, self.engine.prompt_logprobs([requests[i] for i in redo], use_cache=False)):
                    results[i] = r
            it = iter(zip(results, starts))
            for a_ids in a_batch:
                scores = []
                for a in a_ids:
                    (lps, _), n = next(it)
                    # lps[i - 1] is the log-prob of the token at position i
                    scores.append(sum(lps[pos - 1] for pos in range(n, n + len(a))))
                out.append(scores)
        return out


def vote_ranking(candidates: Sequence[str], chosen: Sequence[str | None], scores: Sequence[float]) -> list[str]:
    """Generate mode's full ranking: candidates by how many of n sampled answers chose them,
    ties (most candidates get no vote) by their score-mode score. Invalid answers (None) vote for nothing."""
    votes = {c: 0 for c in candidates}
    for c in chosen:
        if c in votes:
            votes[c] += 1
    order = sorted(range(len(candidates)), key=lambda i: (-votes[candidates[i]], -scores[i]))
    return [candidates[i] for i in order]


ITEM_PREFIX = "[ITEM_"
READOUTS = ("answer", "id", "calibrated")


def readout_tokens(tokenizer: Any, candidates: Sequence[str], titles: Sequence[str | None],
                   readout: str) -> tuple[list[int], list[list[int]]]:
    """(tokens appended to the prompt, one token list per candidate) for a readout.

    answer: nothing appended; each candidate's whole answer line `[ITEM_<id>] <title>`.
    id / calibrated: the shared `[ITEM_` tokens appended; each candidate's `<id>]`, so the score
    is the model's choice of id among the candidates, without the title's own string prior.
    The split point is the longest token prefix every `[ITEM_<id>]` shares, so a tokenizer that
    merges `_` with a digit still scores every candidate on the same context.
    """
    from mllmrec_ray.prompting.prompts import answer_text, item_tag

    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if readout == "answer":
        return [], answer_ids(tokenizer, [answer_text(c, t) for c, t in zip(candidates, titles)])
    tags = answer_ids(tokenizer, [item_tag(c) for c in candidates])
    n = 0
    while all(len(t) > n + 1 and t[n] == tags[0][n] for t in tags):  # keep >= 1 token per candidate
        n += 1
    return tags[0][:n], [t[n:] for t in tags]


def rank_samples(scorer: Any, tokenizer: Any, rows: Sequence[dict], messages_of: Any,
                 titles: dict[str, str | None], readout: str = "answer") -> tuple[list[list[str]], list[list[float]]]:
    """Rank each row's `candidates` with an LLM scorer; returns (rankings, scores in candidate order).

    messages_of(row, without_history) -> chat messages of the row's prompt. The calibrated readout
    subtracts the id score under the same prompt without the history: what the history adds.
    """
    from mllmrec_ray.prompting.prompts import render_prompt

    def ids_of(row: dict, without_history: bool, extra: list[int]) -> list[int]:
        text = render_prompt(tokenizer, messages_of(row, without_history))
        return tokenizer(text, add_special_tokens=False)["input_ids"] + extra

    prompts, answers, refs = [], [], []
    for row in rows:
        cands = [str(c) for c in row["candidates"]]
        extra, ans = readout_tokens(tokenizer, cands, [titles.get(c) for c in cands], readout)
        prompts.append(ids_of(row, False, extra))
        answers.append(ans)
        if readout == "calibrated":
            refs.append(ids_of(row, True, extra))
    scores = scorer.score(prompts, answers)
    if readout == "calibrated":
        scores = [[a - b for a, b in zip(s, r)] for s, r in zip(scores, scorer.score(refs, answers))]
    return [rank_by_scores(row["candidates"], s) for row, s in zip(rows, scores)], scores


def candidate_orders(row: dict, n: int, seed: int) -> list[list[str]]:
    """The stored candidate order and `n` shuffles of it, seeded by (seed, sample) so a sample always
    gets the same orders whatever else is scored with it."""
    import random

    cands = [str(c) for c in row["candidates"]]
    rng = random.Random(f"{seed}:{row.get('sample_id', '')}:{','.join(cands)}")
    return [cands] + [rng.sample(cands, len(cands)) for _ in range(n)]


def rank_samples_over_orders(scorer: Any, tokenizer: Any, rows: Sequence[dict], messages_of: Any,
                             titles: dict[str, str | None], readout: str = "answer", shuffles: int = 0,
                             seed: int = 0) -> tuple[list[list[str]], list[list[float]]]:
    """`rank_samples` with each candidate's score averaged over the stored order and `shuffles`
    shuffled orders of the candidate list in the prompt (permutation self-consistency): a small
    model's position bias averages out. Scores come back in the stored candidate order."""
    if shuffles == 0:
        return rank_samples(scorer, tokenizer, rows, messages_of, titles, readout)
    orders = [candidate_orders(row, shuffles, seed) for row in rows]
    total = [dict.fromkeys(o[0], 0.0) for o in orders]
    for k in range(shuffles + 1):
        moved = [{**row, "candidates": o[k]} for row, o in zip(rows, orders)]
        for t, row, sc in zip(total, moved, rank_samples(scorer, tokenizer, moved, messages_of, titles, readout)[1]):
            for c, v in zip(row["candidates"], sc):
                t[c] += v / (shuffles + 1)
    scores = [[t[c] for c in o[0]] for t, o in zip(total, orders)]
    return [rank_by_scores(o[0], s) for o, s in zip(orders, scores)], scores
