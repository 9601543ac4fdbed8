"""Our Flax Llama against transformers' PyTorch LlamaForCausalLM on tiny random checkpoints.

Tolerance: 1e-4 max abs on float32 logits. Both sides compute in float32 but sum in different
orders (XLA vs oneDNN); on logits of order 1 that leaves ~1e-6 differences, so 1e-4 is tight
enough to catch any real mistake (a wrong RoPE half, norm or head grouping moves logits by 1e-2
or more) without flaking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rllama_jax.models import forward, init_cache, load_pretrained, positions_from_mask
from rllama_jax.models.llama import stack_cache, unstack_cache, unstack_layers
from rllama_jax.models.lora import LoraConfig, init_lora, with_lora
from tests.conftest import left_padded_batch

TOL = 1e-4

CONFIGS = {
    "gqa_untied": {},
    "mha": dict(num_key_value_heads=4),
    "gqa_tied": dict(tie_word_embeddings=True),
    "rope_theta": dict(rope_theta=500000.0),
    "llama3_scaling": dict(
        rope_theta=50000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "explicit_head_dim": dict(head_dim=32, num_attention_heads=4, num_key_value_heads=1),
}


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tiny_checkpoint, name):
    path, model = tiny_checkpoint(**CONFIGS[name])
    config, params, _ = load_pretrained(path, tokenizer=False)
    rng = np.random.default_rng(0)
    # Positions up to ~100 so llama3's low/medium/high frequency bands all matter.
    tokens, mask = left_padded_batch(rng, config.vocab_size, [100, 37, 64])
    ours = forward(params, config, tokens, positions_from_mask(mask), mask).logits
    ref = torch_logits(model, tokens, mask)
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[valid] - ref[valid]).max()
    assert diff < TOL, f"{name}: max abs logit difference {diff}"


def test_config_reads_transformers4_layout(tiny_checkpoint):
    import json

    from rllama_jax.models import LlamaConfig

    hf4 = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
        head_dim=32,
    )
    cfg = LlamaConfig.from_hf_dict(json.loads(json.dumps(hf4)))
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_factor) == (500000.0, "llama3", 8.0)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.tie_word_embeddings) == (32, 2, True)
    # The transformers-5 layout of the same model reads identically.
    hf5 = {k: v for k, v in hf4.items() if k not in ("rope_theta", "rope_scaling")}
    hf5["rope_parameters"] = {**hf4["rope_scaling"], "rope_theta": 500000.0}
    assert LlamaConfig.from_hf_dict(hf5) == cfg


@pytest.mark.parametrize(
    "name,layout",
    [
        ("gqa_untied", "scan"),
        ("llama3_scaling", "scan"),
        ("gqa_untied", "unrolled"),
        ("gqa_tied", "per_layer"),
        ("llama3_scaling", "per_layer"),
    ],
)
def test_cached_decode_matches_full_forward(tiny_checkpoint, name, layout):
    """Prefill a left-padded batch into the cache, then decode token by token: with the
    layer scan, unrolled over the stacks, or (what ``generate`` does) on per-layer weights
    and cache buffers split off after the prefill."""
    path, _ = tiny_checkpoint(**CONFIGS[name])
    config, params, _ = load_pretrained(path, tokenizer=False)
    rng = np.random.default_rng(1)
    prompt_len, steps = 12, 6
    tokens, mask = left_padded_batch(rng, config.vocab_size, [12, 5, 9])
    new = rng.integers(3, config.vocab_size, (3, steps)).astype(np.int32)
    full_tokens = np.concatenate([tokens, new], 1)
    full_mask = np.concatenate([mask, np.ones_like(new)], 1)
    full = forward(params, config, full_tokens, positions_from_mask(full_mask), full_mask).logits

    cache = init_cache(config, batch=3, size=prompt_len + steps + 3)
    scan = None if layout == "scan" else False
    step = jax.jit(lambda p, t, pos, m, c: forward(p, config, t, pos, m, c, scan_layers=scan))
    out = step(params, tokens, positions_from_mask(mask), mask, cache)
    logits = [out.logits]
    cache = out.cache
    if layout == "per_layer":
        params, cache = unstack_layers(params), unstack_cache(cache)
        assert len(params["layers"]) == len(cache.k) == config.num_layers
    next_pos = mask.sum(1)
    for i in range(steps):
        out = step(params, new[:, i : i + 1], (next_pos + i)[:, None], np.ones((3, 1)), cache)
        logits.append(out.logits)
        cache = out.cache
    assert int(cache.index) == prompt_len + steps
    if layout == "per_layer":
        assert cache.per_layer
        restacked = stack_cache(cache)
        assert restacked.k.shape == (
            config.num_layers,
            3,
            cache.size,
            config.num_kv_heads,
            config.head_dim,
        )
        np.testing.assert_array_equal(unstack_cache(restacked).k[1], cache.k[1])
    cached = jnp.concatenate(logits, 1)
    valid = full_mask.astype(bool)
    diff = np.abs(np.asarray(cached)[valid] - np.asarray(full)[valid]).max()
    assert diff < 1e-5, diff


def test_layer_loop_forms_agree_with_lora(tiny_checkpoint):
    """The layer scan, the unrolled loop over the stacks and the per-layer form compute the
    same thing, adapters included."""
    path, _ = tiny_checkpoint()
    config, params, _ = load_pretrained(path, tokenizer=False)
    lora = LoraConfig(rank=2, targets=("wq", "wv", "w_down"))
    adapters = init_lora(jax.random.key(0), config, lora)
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # b = 0 would hide a wrong layer
    params = with_lora(params, adapters, lora)
    tokens, mask = left_padded_batch(np.random.default_rng(2), config.vocab_size, [9, 4])
    pos = positions_from_mask(mask)
    ref = forward(params, config, tokens, pos, mask).logits
    unrolled = forward(params, config, tokens, pos, mask, scan_layers=False).logits
    split = forward(unstack_layers(params), config, tokens, pos, mask).logits
    np.testing.assert_allclose(unrolled, ref, atol=1e-5)
    np.testing.assert_allclose(split, ref, atol=1e-5)
    with pytest.raises(ValueError, match="stacked"):
        forward(unstack_layers(params), config, tokens, pos, mask, scan_layers=True)


def test_hidden_states_and_logits_consistent(tiny_checkpoint):
    from rllama_jax.models import lm_head

    path, model = tiny_checkpoint()
    config, params, _ = load_pretrained(path, tokenizer=False)
    tokens = np.arange(3, 19, dtype=np.int32)[None]
    mask = np.ones_like(tokens)
    out = forward(params, config, tokens, positions_from_mask(mask), mask)
    assert out.hidden.shape == (1, 16, config.hidden_size)
    np.testing.assert_allclose(lm_head(params, out.hidden, config), out.logits, atol=1e-6)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True)
    np.testing.assert_allclose(out.hidden, ref.hidden_states[-1].numpy(), atol=TOL)
