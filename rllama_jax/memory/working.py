"""Working memory: per-environment ring buffer of the last ``W`` steps of the current episode.

Every environment owns ``W`` slots holding the token ids of a short rendering of a step, a key
(pooled hidden state) and an importance. ``write`` fills the slot under the env's pointer and
advances it, so once full the buffer overwrites its oldest step; ``reset_where`` empties the
buffers of finished episodes. ``read_text`` returns the steps oldest first (ready to splice into
a prompt) and ``attention_read`` summarises them as ``softmax((K.q) * importance / T) . K``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class WorkingConfig:
    """Static configuration of a working memory (hashable; a pytree with no leaves).

    Attributes:
      window: ``W``, steps kept per environment.
      max_tokens: ``Lw``, fixed token length of one rendered step.
      key_dim: ``D``, key dimension.
      temperature: default softmax temperature of ``attention_read`` callers.
      pad_id: token id used to fill empty token positions.
    """

    window: int = struct.field(pytree_node=False)
    max_tokens: int = struct.field(pytree_node=False)
    key_dim: int = struct.field(pytree_node=False)
    temperature: float = struct.field(pytree_node=False, default=1.0)
    pad_id: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_tokens < 1 or self.key_dim < 1:
            raise ValueError(f"window, max_tokens, key_dim must be >= 1, got {self}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@struct.dataclass
class WorkingMemory:
    """State of the working memories of ``E`` environments.

    Attributes:
      tokens: [E, W, Lw] int32 token ids of each stored step (``pad_id`` where masked).
      token_mask: [E, W, Lw] bool.
      keys: [E, W, D] float32.
      importance: [E, W] float32.
      valid: [E, W] bool, true on slots holding a step of the current episode.
      pointer: [E] int32, slot the next step goes to (the oldest slot once the buffer is full).
      count: [E] int32, steps written since the last reset (not capped at ``W``).
      pad_id: static token id used when clearing slots.
    """

    tokens: jax.Array
    token_mask: jax.Array
    keys: jax.Array
    importance: jax.Array
    valid: jax.Array
    pointer: jax.Array
    count: jax.Array
    pad_id: int = struct.field(pytree_node=False, default=0)


def init(config: WorkingConfig, num_envs: int) -> WorkingMemory:
    """Empty working memories for ``num_envs`` environments."""
    e, w, lw, d = num_envs, config.window, config.max_tokens, config.key_dim
    return WorkingMemory(
        tokens=jnp.full((e, w, lw), config.pad_id, jnp.int32),
        token_mask=jnp.zeros((e, w, lw), bool),
        keys=jnp.zeros((e, w, d), jnp.float32),
        importance=jnp.zeros((e, w), jnp.float32),
        valid=jnp.zeros((e, w), bool),
        pointer=jnp.zeros((e,), jnp.int32),
        count=jnp.zeros((e,), jnp.int32),
        pad_id=config.pad_id,
    )


def write(
    wm: WorkingMemory,
    tokens: jax.Array,
    token_mask: jax.Array,
    keys: jax.Array,
    importance: jax.Array,
    write_mask: jax.Array,
) -> WorkingMemory:
    """Appends one step to the buffer of each env whose ``write_mask`` is true.

    Args:
      wm: current working memories.
      tokens: [E, Lw] int token ids of the step rendering.
      token_mask: [E, Lw] bool.
      keys: [E, D] step keys.
      importance: [E] step importance (e.g. ``|reward|`` or 1).
      write_mask: [E] bool; envs with false are left untouched.

    Returns:
      Updated memories; written envs' pointers advance by one (mod ``W``).
    """
    e, w, lw = wm.tokens.shape
    chex.assert_shape([tokens, token_mask], (e, lw))
    chex.assert_shape(keys, (e, wm.keys.shape[-1]))
    chex.assert_shape([importance, write_mask], (e,))

    write_mask = write_mask.astype(bool)
    here = jax.nn.one_hot(wm.pointer, w, dtype=bool) & write_mask[:, None]  # [E, W]
    token_mask = token_mask.astype(bool)
    tokens = jnp.where(token_mask, tokens, wm.pad_id).astype(jnp.int32)

    def put(dst: jax.Array, src: jax.Array) -> jax.Array:
        sel = here.reshape(here.shape + (1,) * (dst.ndim - 2))
        return jnp.where(sel, jnp.expand_dims(src, 1).astype(dst.dtype), dst)

    step = write_mask.astype(jnp.int32)
    return wm.replace(
        tokens=put(wm.tokens, tokens),
        token_mask=put(wm.token_mask, token_mask),
        keys=put(wm.keys, keys),
        importance=put(wm.importance, importance),
        valid=wm.valid | here,
        pointer=(wm.pointer + step) % w,
        count=wm.count + step,
    )


def reset_where(wm: WorkingMemory, done: jax.Array) -> WorkingMemory:
    """Empties the buffers of envs whose ``done`` [E] is true (new episode, nothing to recall)."""
    chex.assert_shape(done, wm.pointer.shape)
    done = done.astype(bool)

    def clear(x: jax.Array, fill: float | int | bool) -> jax.Array:
        sel = done.reshape(done.shape + (1,) * (x.ndim - 1))
        return jnp.where(sel, jnp.asarray(fill, x.dtype), x)

    return wm.replace(
        tokens=clear(wm.tokens, wm.pad_id),
        token_mask=clear(wm.token_mask, False),
        keys=clear(wm.keys, 0.0),
        importance=clear(wm.importance, 0.0),
        valid=clear(wm.valid, False),
        pointer=clear(wm.pointer, 0),
        count=clear(wm.count, 0),
    )


def chronological_slots(wm: WorkingMemory) -> jax.Array:
    """[E, W] slot indices ordered oldest first (slot ``pointer`` is the oldest once full)."""
    w = wm.valid.shape[1]
    return (wm.pointer[:, None] + jnp.arange(w)[None, :]) % w


def read_text(wm: WorkingMemory) -> tuple[jax.Array, jax.Array]:
    """Stored steps in chronological order, for splicing into a prompt.

    Returns:
      tokens: [E, W, Lw] int32, oldest step first; when fewer than ``W`` steps are stored the
        empty slots come first, so valid steps are right-aligned along ``W``.
      mask: [E, W, Lw] bool, false on empty slots and padding.
    """
    order = chronological_slots(wm)
    tokens = jnp.take_along_axis(wm.tokens, order[..., None], axis=1)
    mask = jnp.take_along_axis(wm.token_mask & wm.valid[..., None], order[..., None], axis=1)
    return jnp.where(mask, tokens, wm.pad_id), mask


def attention_read(
    wm: WorkingMemory, query: jax.Array, temperature: float | jax.Array = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Importance-weighted attention over the stored steps' keys.

    ``weights = softmax((K . q) * (1 + importance / max importance) / T)`` over valid steps,
    ``summary = weights . K``: similarity always counts (a step with reward 0 keeps weight
    1, where a plain ``importance`` factor would multiply its similarity away and turn the
    read into a uniform average), and a rewarded step's similarity is scaled by at most 2,
    whatever the reward's scale (the largest valid importance of the env normalises it).
    An env with no valid step gets zero weights and a zero summary (never NaN, also in gradients).

    Args:
      wm: working memories.
      query: [E, D] query per env.
      temperature: softmax temperature ``T > 0``.

    Returns:
      summary: [E, D] float32.
      weights: [E, W] float32, in slot order (use ``chronological_slots`` to reorder).
    """
    chex.assert_shape(query, (wm.keys.shape[0], wm.keys.shape[-1]))
    logits = jnp.einsum("ewd,ed->ew", wm.keys, query.astype(jnp.float32))
    top_imp = jnp.max(jnp.where(wm.valid, wm.importance, 0.0), axis=-1, keepdims=True)
    weight = 1.0 + wm.importance / jnp.where(top_imp > 0, top_imp, 1.0)
    logits = logits * weight / temperature
    top = jnp.max(jnp.where(wm.valid, logits, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    # Invalid logits are replaced by `top` before exp so no inf/NaN appears even in gradients.
    expd = jnp.where(wm.valid, jnp.exp(jnp.where(wm.valid, logits, top) - top), 0.0)
    total = jnp.sum(expd, axis=-1, keepdims=True)
    weights = expd / jnp.where(total > 0, total, 1.0)
    summary = jnp.einsum("ew,ewd->ed", weights, wm.keys)
    return summary, weights
