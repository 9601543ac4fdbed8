"""A fixed-capacity replay buffer that lives inside the train state (a pytree of arrays).

Items are any pytree whose leaves share a leading batch axis; the buffer stores them in
ring order. ``add`` and ``sample`` are pure and jit-compatible, so an off-policy
``train_step`` writes the new transitions and samples minibatches in the same compiled call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReplayBuffer:
    """data: the item pytree with leading [capacity]; valid: [capacity] bool;
    next: [] int32 slot to write next; count: [] int32 items ever written."""

    data: Any
    valid: jax.Array
    next: jax.Array
    count: jax.Array

    @property
    def capacity(self) -> int:
        return self.valid.shape[0]


def init_replay(example: Any, capacity: int) -> ReplayBuffer:
    """An empty buffer for items shaped like one row of ``example`` (leading axis dropped)."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + x.shape[1:], x.dtype), example)
    return ReplayBuffer(
        data=data,
        valid=jnp.zeros((capacity,), bool),
        next=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def add(buffer: ReplayBuffer, items: Any, mask: jax.Array) -> ReplayBuffer:
    """Writes the rows of ``items`` (leading [N]) where ``mask`` [N] is True, in order,
    overwriting the oldest slots once full."""
    mask = mask.astype(bool)
    offsets = jnp.cumsum(mask) - 1
    slots = (buffer.next + offsets) % buffer.capacity
    # Rows not written go to an out-of-range slot and are dropped by the scatter.
    slots = jnp.where(mask, slots, buffer.capacity)
    data = jax.tree.map(lambda d, x: d.at[slots].set(x, mode="drop"), buffer.data, items)
    valid = buffer.valid.at[slots].set(True, mode="drop")
    n = jnp.sum(mask).astype(jnp.int32)
    return ReplayBuffer(
        data=data, valid=valid, next=(buffer.next + n) % buffer.capacity, count=buffer.count + n
    )


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> tuple[Any, jax.Array]:
    """``batch_size`` items drawn uniformly (with replacement) from the valid slots, and a
    [batch_size] weight that is 0 when the buffer is still empty."""
    logits = jnp.where(buffer.valid, 0.0, -jnp.inf)
    any_valid = jnp.any(buffer.valid)
    logits = jnp.where(any_valid, logits, 0.0)
    idx = jax.random.categorical(key, logits, shape=(batch_size,))
    items = jax.tree.map(lambda d: d[idx], buffer.data)
    weights = jnp.where(any_valid, 1.0, 0.0) * jnp.ones((batch_size,), jnp.float32)
    return items, weights
