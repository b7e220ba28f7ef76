"""Adapters to the ML runtimes: the vLLM inference Engine, the PEFT/DeepSpeed policy, the model cache."""
