"""Test environment: offline, headless, random weights. Shared fixtures."""

import os
import tempfile

# Set before anything imports huggingface_hub / wandb / matplotlib.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="proxyclip-hf-"))
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_DISABLE_GIT"] = "true"
os.environ["WANDB_ERROR_REPORTING"] = "false"
os.environ["MPLBACKEND"] = "Agg"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One torch thread (unless set otherwise): the tests' models are tiny, and on a machine shared with other
# processes a thread pool waits more than it works (tests/test_corrclip.py at load 5 on 2 cores: 22 s with
# torch's 2 threads, 6-11 s with 1; test_cliper.py 55 s against 15 s). The eval subprocesses run so already
# (fixtures_eval.subprocess_env); the CLI and notebook subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the text-embedding disk cache (text_cache: auto) goes to a throwaway folder, never the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="proxyclip-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from proxyclip import Segmenter, compose_config  # noqa: E402

# Tiny random models and a small window (conf/experiment/tiny.yaml): fast, but every stage runs for real.
TINY = ["experiment=tiny"]


def tiny_config(*overrides: str):
    return compose_config(overrides=TINY + list(overrides))


@pytest.fixture(scope="session")
def tiny_segmenter() -> Segmenter:
    return Segmenter.from_config(tiny_config())


@pytest.fixture(scope="session")
def tiny_segmenter_novfm() -> Segmenter:
    return Segmenter.from_config(tiny_config("method=maskclip", "method.residual=false", "method.ffn=false"))


@pytest.fixture(scope="session")
def eval_segmenter() -> Segmenter:
    """The evaluation tests' Segmenter (built from the eval config, once per session)."""
    from fixtures_eval import eval_cfg

    return Segmenter.from_config(eval_cfg("voc21", "/nonexistent"))


@pytest.fixture
def rand_image():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 80, 112, generator=g)
