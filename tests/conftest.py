"""Shared fixtures: tiny random Llama checkpoints written with transformers."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")  # the launcher script

# A tiny PPO launcher run with working memory (so memory is part of what a checkpoint holds),
# a checkpoint every update: 4 updates of 4 envs x 4 steps.
SMALL_RUN = dict(
    model="tiny", env="tmaze", memory="working", trainable="lora", num_envs=4, steps_per_update=4,
    total_steps=64, epochs=1, minibatches=2, eval_every=0, eval_episodes=4, eval_envs=4,
    checkpoint_every=1, keep_checkpoints=2, learning_rate=1e-3,
)  # fmt: skip


# The modules that take longest (minutes of launcher subprocesses and compiles), collected
# first: under ``pytest -n 2 --dist loadfile`` (the README's test command) the two workers
# then start on them and the short modules fill in behind, instead of one long module
# running alone at the end.
LONGEST_FIRST = (
    "test_launcher_mesh.py", "test_spine.py", "test_sharding.py", "test_gpu_suite.py",
    "test_notebooks.py", "test_experiment.py", "test_first_hour.py", "test_blackjack_generate.py",
)  # fmt: skip


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (rank.get(it.path.name, len(rank)), order[id(it)]))


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Drops every compiled program after each test module. Each XLA CPU executable holds
    about six memory mappings, and the whole suite compiles thousands of programs in one
    process: past the kernel's ``vm.max_map_count`` (65,530 here) the compiler's next mmap
    fails and the process dies with a segmentation fault (it did, twice, inside
    test_spine.py, which passes when run alone)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def launcher_flags(**kw) -> list[str]:
    """``--name=value`` flags of the launcher."""
    return [f"--{k}={v}" for k, v in kw.items()]


TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def build_tiny_torch_llama(seed: int = 0, **overrides):
    """A random transformers ``LlamaForCausalLM`` (float32, eval mode) with TINY's shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).float().eval()
    # Default init leaves norms at 1; random norms catch a swapped or missing norm weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: ``path, torch_model = tiny_checkpoint(**config_overrides)``."""

    def make(seed: int = 0, subdir: str = "tiny", **overrides):
        model = build_tiny_torch_llama(seed, **overrides)
        path = tmp_path / subdir
        model.save_pretrained(path)
        return str(path), model

    return make


def left_padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int]):
    """Random token rows right-aligned in a [B, max(lengths)] array, with their mask."""
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, width - n :] = rng.integers(3, vocab, n)
        mask[i, width - n :] = 1
    return tokens, mask
