"""Latent memory: a small trainable adapter turning memory into soft-prompt embeddings.

Instead of spelling memory out as text, the retrieved episodic keys [B, k, D] and the working
memory summary [B, D] are mapped to ``M`` vectors [B, M, H] that are prepended to (or spliced
into) the LLM's input embeddings. The adapter:

1. projects keys to attention keys of width ``A`` and each entry to a value of width ``A``
   that carries what happened: its key's projection, plus its return times a learned
   vector, plus a learned embedding of the action it took (``num_actions`` candidates and
   one "unknown"); the values are pooled per soft-prompt slot by attention with a learned
   per-slot query (invalid entries get exactly zero weight), so the LLM can be told "last
   time here, action 1 paid -1";
2. adds a projection of the working-memory summary and a learned per-slot embedding;
3. applies a 2-layer GELU MLP to ``H`` and rescales every output vector to RMS ``embed_scale``
   (the RMS of the LLM's token embeddings), so soft prompts sit at the scale the LLM expects.

Parameters are a plain dict of arrays (``init_adapter``) so they can live in the train state
next to the LLM parameters and be updated by the same optimizer.

In the environment loop (``rollout.act``) the memory read of each turn is kept as
``AdapterInputs`` (retrieved keys, their validity, the working summary), never as the soft
prompt itself: ``train_step`` re-applies the *current* adapter to them, so gradients reach the
adapter. ``place_soft_prompt`` puts the vectors into the prompt's embedding sequence at the slot
positions the act call chose (see ``prompt.splice_slots``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

AdapterParams = dict[str, jax.Array]


@struct.dataclass
class LatentConfig:
    """Static configuration of the latent-memory adapter.

    Attributes:
      key_dim: ``D``, dimension of episodic keys and of the working summary.
      hidden_size: ``H``, LLM embedding width.
      num_slots: ``M``, soft-prompt vectors produced per row.
      adapter_dim: ``A``, width of the adapter's attention and MLP hidden layer.
    """

    key_dim: int = struct.field(pytree_node=False)
    hidden_size: int = struct.field(pytree_node=False)
    num_slots: int = struct.field(pytree_node=False, default=4)
    adapter_dim: int = struct.field(pytree_node=False, default=128)
    num_actions: int = struct.field(pytree_node=False, default=16)

    def __post_init__(self) -> None:
        for name in ("key_dim", "hidden_size", "num_slots", "adapter_dim", "num_actions"):
            if getattr(self, name) < 1:
                raise ValueError(f"LatentConfig.{name} must be >= 1, got {getattr(self, name)}")


@struct.dataclass
class AdapterInputs:
    """What the adapter reads for one turn, with leading axes ``[...]`` (e.g. [B] or [N, T]).

    Stored in the observation so a train step can recompute the soft prompt with the adapter
    parameters it is differentiating.

    Attributes:
      keys: [..., k, D] float32 retrieved episodic keys (zeros where invalid; ``k = 1`` and
        always invalid when episodic memory is off).
      valid: [..., k] bool.
      summary: [..., D] float32 working-memory summary, or None without working memory.
      summary_valid: [...] bool, whether the env had a step in working memory (None without).
      returns: [..., k] float32 the retrieved entries' returns (0 where invalid); None: 0.
      actions: [..., k] int32 the candidate index each took (-1: unknown); None: unknown.
    """

    keys: jax.Array
    valid: jax.Array
    summary: jax.Array | None = None
    summary_valid: jax.Array | None = None
    returns: jax.Array | None = None
    actions: jax.Array | None = None


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
    return jax.random.normal(key, (fan_in, fan_out), jnp.float32) / jnp.sqrt(fan_in)


def init_adapter(key: jax.Array, config: LatentConfig) -> AdapterParams:
    """Random adapter parameters (LeCun-normal weights, zero biases).

    Returns a dict: ``slot_query`` [M, A], ``slot_embed`` [M, A], ``w_key`` [D, A],
    ``w_value`` [D, A], ``w_return`` [A], ``action_embed`` [num_actions + 1, A] (row 0:
    unknown), ``w_working`` [D, A], ``w1`` [A, A], ``b1`` [A], ``w2`` [A, H], ``b2`` [H].
    """
    d, h, m, a = config.key_dim, config.hidden_size, config.num_slots, config.adapter_dim
    ks = jax.random.split(key, 9)
    return {
        "w_return": jax.random.normal(ks[7], (a,), jnp.float32),
        "action_embed": jax.random.normal(ks[8], (config.num_actions + 1, a), jnp.float32),
        "slot_query": jax.random.normal(ks[0], (m, a), jnp.float32),
        "slot_embed": jax.random.normal(ks[1], (m, a), jnp.float32),
        "w_key": _dense(ks[2], d, a),
        "w_value": _dense(ks[3], d, a),
        "w_working": _dense(ks[4], d, a),
        "w1": _dense(ks[5], a, a),
        "b1": jnp.zeros((a,), jnp.float32),
        "w2": _dense(ks[6], a, h),
        "b2": jnp.zeros((h,), jnp.float32),
    }


def apply_adapter(
    params: AdapterParams,
    retrieved_keys: jax.Array,
    retrieved_valid: jax.Array,
    wm_summary: jax.Array | None,
    embed_scale: float | jax.Array = 1.0,
    wm_valid: jax.Array | None = None,
    retrieved_returns: jax.Array | None = None,
    retrieved_actions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Soft-prompt vectors from retrieved episodic entries and the working-memory summary.

    Args:
      params: adapter parameters from ``init_adapter``.
      retrieved_keys: [B, k, D] keys of retrieved entries (``Retrieved.keys``).
      retrieved_valid: [B, k] bool; invalid entries have no influence on the output.
      wm_summary: [B, D] working-memory summary (``working.attention_read``), or None.
      embed_scale: target RMS of each output vector (RMS of the LLM token embeddings).
      wm_valid: [B] bool, whether the working summary carries information (e.g. the env has a
        valid step); defaults to all true when ``wm_summary`` is given.
      retrieved_returns: [B, k] the entries' returns (None: 0), added to their values.
      retrieved_actions: [B, k] int the candidate each entry took (-1 or None: unknown;
        indices past ``num_actions`` count as unknown), embedded into their values.

    Returns:
      soft_prompt: [B, M, H] float32, zeros on rows with nothing to remember.
      soft_mask: [B, M] bool, true on rows with at least one valid entry or a valid summary.
    """
    b, k, d = retrieved_keys.shape
    m, a = params["slot_query"].shape
    chex.assert_shape(retrieved_valid, (b, k))
    chex.assert_shape(params["w_key"], (d, a))
    valid = retrieved_valid.astype(bool)
    # Zero invalid keys first: even inf/NaN garbage there cannot leak through 0 * x.
    keys = jnp.where(valid[..., None], retrieved_keys.astype(jnp.float32), 0.0)

    att_keys = keys @ params["w_key"]  # [B, k, A]
    values = keys @ params["w_value"]  # [B, k, A]
    if retrieved_returns is not None:  # what the entry led to
        chex.assert_shape(retrieved_returns, (b, k))
        ret = jnp.where(valid, retrieved_returns.astype(jnp.float32), 0.0)
        values = values + ret[..., None] * params["w_return"]
    num_actions = params["action_embed"].shape[0] - 1
    acts = jnp.full((b, k), -1, jnp.int32) if retrieved_actions is None else retrieved_actions
    chex.assert_shape(acts, (b, k))
    row = jnp.where((acts >= 0) & (acts < num_actions), acts + 1, 0)  # 0: unknown
    values = values + params["action_embed"][row]
    logits = jnp.einsum("ma,bka->bmk", params["slot_query"], att_keys) / jnp.sqrt(a)
    mask = valid[:, None, :]
    top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    expd = jnp.where(mask, jnp.exp(jnp.where(mask, logits, top) - top), 0.0)
    total = jnp.sum(expd, axis=-1, keepdims=True)
    weights = expd / jnp.where(total > 0, total, 1.0)  # [B, M, k]
    pooled = jnp.einsum("bmk,bka->bma", weights, values)

    has_memory = jnp.any(valid, axis=-1)  # [B]
    hidden = pooled + params["slot_embed"][None]
    if wm_summary is not None:
        chex.assert_shape(wm_summary, (b, d))
        wm_ok = jnp.ones((b,), bool) if wm_valid is None else wm_valid.astype(bool)
        chex.assert_shape(wm_ok, (b,))
        summary = jnp.where(wm_ok[:, None], wm_summary.astype(jnp.float32), 0.0)
        hidden = hidden + (summary @ params["w_working"])[:, None, :]
        has_memory = has_memory | wm_ok

    hidden = jax.nn.gelu(hidden @ params["w1"] + params["b1"])
    out = hidden @ params["w2"] + params["b2"]  # [B, M, H]
    rms = jnp.sqrt(jnp.mean(jnp.square(out), axis=-1, keepdims=True) + 1e-6)
    out = out / rms * embed_scale
    soft_mask = jnp.broadcast_to(has_memory[:, None], (b, m))
    return jnp.where(soft_mask[..., None], out, 0.0), soft_mask


def has_memory(inputs: AdapterInputs) -> jax.Array:
    """[...] bool, rows with something to remember: exactly where ``apply_adapter``'s
    ``soft_mask`` is true (computable without the adapter parameters)."""
    present = jnp.any(inputs.valid.astype(bool), axis=-1)
    if inputs.summary is None:
        return present
    if inputs.summary_valid is None:
        return jnp.ones_like(present)
    return present | inputs.summary_valid.astype(bool)


def apply_to_inputs(
    params: AdapterParams, inputs: AdapterInputs, embed_scale: float | jax.Array = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``apply_adapter`` on stored ``AdapterInputs`` [B, ...]: (soft [B, M, H], mask [B, M])."""
    return apply_adapter(
        params, inputs.keys, inputs.valid, inputs.summary, embed_scale, inputs.summary_valid,
        inputs.returns, inputs.actions,
    )  # fmt: skip


def embedding_rms(embed_matrix: jax.Array) -> jax.Array:
    """[] RMS of the LLM's token embeddings [V, H]: the ``embed_scale`` soft prompts get.

    A constant of the model for the adapter (no gradient flows into the embedding table)."""
    x = jax.lax.stop_gradient(embed_matrix).astype(jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def place_soft_prompt(
    token_embeds: jax.Array, soft_prompt: jax.Array, slots: jax.Array
) -> jax.Array:
    """Input embeddings [B, L, H]: ``token_embeds`` with soft-prompt vector ``slots[b, t]``
    at every position where ``slots`` [B, L] is >= 0 (-1 marks ordinary tokens).

    soft_prompt: [B, M, H]; gradients flow into it through the gather."""
    b, length, h = token_embeds.shape
    chex.assert_shape(slots, (b, length))
    chex.assert_shape(soft_prompt, (b, None, h))
    picked = jnp.take_along_axis(
        soft_prompt.astype(token_embeds.dtype), jnp.maximum(slots, 0)[..., None], axis=1
    )
    return jnp.where((slots >= 0)[..., None], picked, token_embeds)
