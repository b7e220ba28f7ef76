"""Shared test setup: offline hubs, in-process vLLM engines, cached DeepSpeed ops, tiny models."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mllmrec" / "torch_extensions"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

from jobs.common import bind_to_loopback  # noqa: E402

# The tests' own clusters (plain ray.init) listen on 127.0.0.1 like the product's, not on the machine's address.
bind_to_loopback()

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
POSTERS_DIR = (REPO_ROOT / ".." / "shared" / "data" / "ml-100k-posters").resolve()
sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(autouse=True)
def _restore_environ():
    """Undo env changes a test makes in-process (e.g. `submit` turning on RAY_AUTH_MODE=token
    when ~/.ray/auth_token exists): a later ray.init would start a GCS that demands a token
    the driver, configured earlier, never sends (CI failure, session 5)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3")


@pytest.fixture(scope="session")
def posters_dir() -> Path:
    if not POSTERS_DIR.is_dir():
        pytest.skip(f"real posters folder {POSTERS_DIR} is absent")
    return POSTERS_DIR
