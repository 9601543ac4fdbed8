"""Memory reaches the model: spliced text changes the logits, latent soft prompts are trained
through the LLM.

Uses the embedded SmolLM2 tokenizer (real text) with a small random Llama of the same
vocabulary, so the test is about plumbing, not about what a trained model would answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rllama_jax.memory import (
    EpisodicConfig,
    LatentConfig,
    MemoryConfig,
    WorkingConfig,
    augment_prompt,
    init_memory,
    latent,
    record_experience,
    record_step,
    soft_prompt,
)
from rllama_jax.models import LlamaConfig, embed, forward, init_params, positions_from_mask
from rllama_jax.models.loading import default_model_dir, load_tokenizer

LM = 8  # tokens per memory entry


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir())


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    return config, init_params(config, jax.random.key(0), std=0.2)


def encode_fixed(tok, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [N, length] ids of each text (no special tokens)."""
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
        row = tok(t, add_special_tokens=False)["input_ids"][:length]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def text_memory(tok) -> MemoryConfig:
    return MemoryConfig(
        mode="both",
        representation="text",
        episodic=EpisodicConfig(capacity=8, key_dim=4, max_tokens=LM, k=2),
        working=WorkingConfig(window=2, max_tokens=LM, key_dim=4),
        episodic_header=tuple(tok(" Past:", add_special_tokens=False)["input_ids"]),
        working_header=tuple(tok(" Recent:", add_special_tokens=False)["input_ids"]),
    )


def test_spliced_prompt_holds_memories_in_order_and_changes_logits(tok, model):
    config, params = model
    mcfg = text_memory(tok)
    state = init_memory(mcfg, num_envs=1)
    keys = jnp.asarray([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1.0, 0]])
    texts = [" hand 19 stay won", " hand 12 hit lost", " hand 5 hit won"]
    ids, mask = encode_fixed(tok, texts, LM)
    returns = jnp.asarray([1.0, -1.0, 1.0])
    state = record_experience(state, mcfg, keys, ids, mask, returns, jnp.ones(3, bool))
    step_ids, step_mask = encode_fixed(tok, [" saw 14 chose hit"], LM)
    state = record_step(state, mcfg, step_ids, step_mask, keys[:1], jnp.ones(1), jnp.ones(1, bool))

    prompt_ids, prompt_mask = encode_fixed(tok, ["Rules first. Now: hand 18?"], 16)
    # right-padded -> left-padded
    n = int(prompt_mask.sum())
    prompt = np.zeros((1, 16), np.int32)
    prompt[0, 16 - n :] = prompt_ids[0, :n]
    pmask = (np.arange(16) >= 16 - n).astype(np.int32)[None]
    insert_at = jnp.asarray([len(tok("Rules first.", add_special_tokens=False)["input_ids"])])
    query = jnp.asarray([[1.0, 0.05, 0, 0]])
    tokens, tmask = jax.jit(augment_prompt, static_argnums=1)(
        state, mcfg, jnp.asarray(prompt), jnp.asarray(pmask), insert_at, query
    )
    text = tok.decode(np.asarray(tokens[0])[np.asarray(tmask[0]).astype(bool)])
    # Top-2 by 0.7 cos + 0.3 |return|: entries 0 and 1 (closest keys), in score order.
    order = [text.find(s) for s in ("Rules first.", "Past:", "hand 19 stay won",
                                    "hand 12 hit lost", "Recent:", "saw 14 chose hit",
                                    "Now: hand 18?")]  # fmt: skip
    assert all(i >= 0 for i in order) and order == sorted(order), text
    assert "hand 5 hit won" not in text
    assert np.asarray(tmask[0, -1]) == 1  # still left-padded: last slot is a real token

    def last_logits(tok_arr, m):
        out = forward(params, config, tok_arr, positions_from_mask(m), m)
        return np.asarray(out.logits[0, -1])

    before = last_logits(tokens, tmask)
    # Same memory layout, different remembered outcome: the model's output must change.
    other_ids, other_mask = encode_fixed(tok, [" hand 19 stay lost"], LM)
    ids2 = ids.copy()
    ids2[0] = other_ids[0]
    state2 = init_memory(mcfg, num_envs=1)
    state2 = record_experience(state2, mcfg, keys, ids2, mask, returns, jnp.ones(3, bool))
    state2 = record_step(
        state2, mcfg, step_ids, step_mask, keys[:1], jnp.ones(1), jnp.ones(1, bool)
    )
    tokens2, tmask2 = augment_prompt(
        state2, mcfg, jnp.asarray(prompt), jnp.asarray(pmask), insert_at, query
    )
    assert np.abs(last_logits(tokens2, tmask2) - before).max() > 1e-3
    # Without memory the prompt (and so the logits) differ from the memory-augmented one.
    assert np.abs(last_logits(jnp.asarray(prompt), jnp.asarray(pmask)) - before).max() > 1e-3


def test_latent_soft_prompt_trains_adapter_through_the_llm():
    # No tokenizer needed here: a small vocabulary keeps the backward pass cheap.
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
    )  # fmt: skip
    params = init_params(config, jax.random.key(0), std=0.2)
    d = 4
    mcfg = MemoryConfig(
        mode="both",
        representation="latent",
        episodic=EpisodicConfig(capacity=8, key_dim=d, max_tokens=2, k=2),
        working=WorkingConfig(window=2, max_tokens=2, key_dim=d),
        latent=LatentConfig(key_dim=d, hidden_size=config.hidden_size, num_slots=3, adapter_dim=16),
    )
    state = init_memory(mcfg, num_envs=2)
    keys = jax.random.normal(jax.random.key(1), (3, d))
    state = record_experience(
        state, mcfg, keys, jnp.ones((3, 2), jnp.int32), jnp.ones((3, 2), jnp.int32),
        jnp.asarray([1.0, 0.5, -1.0]), jnp.ones(3, bool),
    )  # fmt: skip
    state = record_step(
        state, mcfg, jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2), jnp.int32), keys[:2],
        jnp.ones(2), jnp.ones(2, bool),
    )  # fmt: skip
    adapter = latent.init_adapter(jax.random.key(2), mcfg.latent)
    prompt = jnp.asarray([[0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]], jnp.int32)
    pmask = (prompt > 0).astype(jnp.int32)
    query = keys[:2]
    target = jnp.asarray([7, 9])

    def loss(adapter_params):
        soft, smask = soft_prompt(state, mcfg, adapter_params, query, embed_scale=1.0)
        embeds = jnp.concatenate([soft, embed(params, prompt, config)], axis=1)
        mask = jnp.concatenate([smask.astype(jnp.int32), pmask], axis=1)
        out = forward(params, config, None, positions_from_mask(mask), mask, embeds=embeds)
        logp = jax.nn.log_softmax(out.logits[:, -1])
        return -jnp.mean(jnp.take_along_axis(logp, target[:, None], -1))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(adapter)
    norms = {k: float(jnp.linalg.norm(g)) for k, g in grads.items()}
    assert np.isfinite(float(value))
    assert all(np.isfinite(v) for v in norms.values())
    assert norms["w2"] > 0 and norms["w_key"] > 0 and norms["w_working"] > 0, norms
    # One gradient step on the adapter lowers the LLM's loss: the soft prompt is trainable.
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, adapter, grads)
    assert float(value_and_grad(stepped)[0]) < float(value)
