"""Episodic memory: a fixed-capacity store of past experiences, shared across episodes.

Each entry holds a key (pooled LLM hidden state of an observation, supplied by the caller), the
token ids of a short rendering "observation -> action -> outcome", the return it led to, an
importance (``|return|`` when written, decayed afterwards), a timestamp and a validity flag. All
arrays have fixed shapes so the store lives inside a jitted ``train_step``/``act`` as a plain
pytree and every update is a pure function.

Conventions (decided here, relied on by the tests):

* **Decay timing** -- ``importance`` of the stored entries is multiplied by ``config.decay`` once
  per ``write`` call that stores at least one row, *before* the new rows are placed (new rows
  enter with their undecayed ``|return|``). A call whose ``write_mask`` is all false leaves the
  memory bit-for-bit unchanged. ``decay`` is public for callers that want to age the memory on
  another schedule (e.g. once per episode) with ``decay=1.0`` in the config.
* **Eviction** -- rows of one call never evict each other: the ``m`` rows written by a call go,
  in row order, to the ``m`` first slots of the victim order computed on the memory *before* the
  call. Victim order is: invalid slots first (lowest slot index first), then valid entries by
  ``fifo``: oldest timestamp first; ``importance``: lowest (decayed) importance first, ties
  broken by oldest timestamp (timestamps are unique, so the order is total).
* **More rows than capacity** -- if a call has ``n > capacity`` rows with ``write_mask`` true,
  only the *last* ``capacity`` of them (in row order) are stored; they replace every slot.
* **Timestamps** -- the ``i``-th row stored by a call gets ``counter + i``; ``counter`` then grows
  by the number of rows stored, so a larger timestamp always means a newer entry.
* **Retrieval score** -- ``w_sim * cosine(query, key) + w_imp * importance + w_rec *
  recency`` (the design's ``0.7*cos + 0.3*importance``; ``w_rec`` is 0 by default) with
  importance divided by the largest valid importance (``normalize_importance``, the
  default), so its share is at most ``w_imp`` whatever the scale of the returns (raw
  TextWorld scores of 10+ would otherwise swamp the cosine term); ``normalize_importance=False``
  uses the raw ``|return|``. Recency is 1 for the newest valid entry and falls linearly with
  the timestamp to 0 for the oldest (1 when there is one).
* **Centred keys** -- with ``center_keys`` the cosine is taken after subtracting the mean of
  the valid stored keys from the query and every key. An LLM's hidden states share a large
  common direction: SmolLM2's keys for "a red door" and "a blue box" have raw cosine
  0.992-0.997, so 0.3 of importance outranks any similarity; centred, different situations
  fall far apart while identical ones keep cosine 1 (with a single valid entry every
  centred cosine is 0).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

_EVICTIONS = ("fifo", "importance")


@struct.dataclass
class EpisodicConfig:
    """Static configuration of an episodic memory (hashable; a pytree with no leaves).

    Attributes:
      capacity: number of slots ``C``.
      key_dim: key dimension ``D`` (LLM hidden size of the pooled observation state).
      max_tokens: ``Lm``, fixed token length of one rendered entry.
      k: number of entries returned per query (``k <= capacity``).
      w_sim: weight of the cosine similarity in the retrieval score.
      w_imp: weight of the importance in the retrieval score.
      decay: factor applied to stored importances at each write call that stores a row.
      eviction: ``"fifo"`` (oldest first) or ``"importance"`` (lowest importance first).
      score_threshold: retrieved entries scoring strictly below it are marked invalid.
      normalize_importance: divide importance by the max valid importance before scoring.
      pad_id: token id used to fill empty token positions.
      control: weight of episodic control (``action_values``) in the policy's logits; 0 off.
      control_k: nearest entries (by cosine alone) that vote in ``action_values`` (at most
        ``capacity`` are used).
      control_temperature: ``tau`` of the similarity kernel ``exp((cosine - 1) / tau)``.
      w_rec: weight of recency (1 for the newest valid entry, 0 for the oldest).
      center_keys: cosine of mean-centred keys and queries (the mean of the valid keys).
    """

    capacity: int = struct.field(pytree_node=False)
    key_dim: int = struct.field(pytree_node=False)
    max_tokens: int = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False, default=4)
    w_sim: float = struct.field(pytree_node=False, default=0.7)
    w_imp: float = struct.field(pytree_node=False, default=0.3)
    decay: float = struct.field(pytree_node=False, default=1.0)
    eviction: str = struct.field(pytree_node=False, default="fifo")
    score_threshold: float | None = struct.field(pytree_node=False, default=None)
    normalize_importance: bool = struct.field(pytree_node=False, default=True)
    pad_id: int = struct.field(pytree_node=False, default=0)
    control: float = struct.field(pytree_node=False, default=0.0)
    control_k: int = struct.field(pytree_node=False, default=16)
    control_temperature: float = struct.field(pytree_node=False, default=1e-3)
    w_rec: float = struct.field(pytree_node=False, default=0.0)
    center_keys: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.key_dim < 1 or self.max_tokens < 1:
            raise ValueError(f"capacity, key_dim, max_tokens must be >= 1, got {self}")
        if self.control < 0 or self.control_temperature <= 0:
            raise ValueError(
                f"need control >= 0 and control_temperature > 0, got control={self.control}, "
                f"control_temperature={self.control_temperature}"
            )
        if not 0 < self.decay <= 1:
            raise ValueError(f"need 0 < decay <= 1, got {self.decay}")
        if self.w_rec < 0:
            raise ValueError(f"need w_rec >= 0, got {self.w_rec}")
        if self.control_k < 1:
            raise ValueError(f"need control_k >= 1, got {self.control_k}")
        if not 1 <= self.k <= self.capacity:
            raise ValueError(f"need 1 <= k <= capacity, got k={self.k}, C={self.capacity}")
        if self.eviction not in _EVICTIONS:
            raise ValueError(f"eviction must be one of {_EVICTIONS}, got {self.eviction!r}")


@struct.dataclass
class EpisodicMemory:
    """State of an episodic memory: fixed-shape arrays, one row per slot.

    Attributes:
      keys: [C, D] float32 retrieval keys.
      tokens: [C, Lm] int32 token ids of each entry's text (``pad_id`` where masked).
      token_mask: [C, Lm] bool, true on real tokens.
      returns: [C] float32 return the experience led to.
      importance: [C] float32, ``|return|`` at write time, decayed afterwards.
      timestamps: [C] int32 write order (-1 for never-written slots).
      valid: [C] bool, true where the slot holds an entry.
      counter: [] int32 number of rows stored so far.
      actions: [C] int32 candidate index of the action taken (-1: not known, e.g. generate
        mode), what ``action_values`` counts.
    """

    keys: jax.Array
    tokens: jax.Array
    token_mask: jax.Array
    returns: jax.Array
    importance: jax.Array
    timestamps: jax.Array
    valid: jax.Array
    counter: jax.Array
    actions: jax.Array


@struct.dataclass
class Retrieved:
    """Top-k entries for each query; everything is zero/pad where ``valid`` is false.

    Attributes:
      indices: [Q, k] int32 slot of each entry (-1 where invalid).
      scores: [Q, k] float32 retrieval score, descending along k (0 where invalid).
      valid: [Q, k] bool.
      tokens: [Q, k, Lm] int32.
      token_mask: [Q, k, Lm] bool (false everywhere in invalid entries).
      keys: [Q, k, D] float32.
      returns: [Q, k] float32.
      actions: [Q, k] int32 candidate index of the action each entry took (-1: unknown or
        invalid).
    """

    indices: jax.Array
    scores: jax.Array
    valid: jax.Array
    tokens: jax.Array
    token_mask: jax.Array
    keys: jax.Array
    returns: jax.Array
    actions: jax.Array


def init(config: EpisodicConfig) -> EpisodicMemory:
    """An empty memory: every slot invalid, tokens ``pad_id``, timestamps -1."""
    c, d, lm = config.capacity, config.key_dim, config.max_tokens
    return EpisodicMemory(
        keys=jnp.zeros((c, d), jnp.float32),
        tokens=jnp.full((c, lm), config.pad_id, jnp.int32),
        token_mask=jnp.zeros((c, lm), bool),
        returns=jnp.zeros((c,), jnp.float32),
        importance=jnp.zeros((c,), jnp.float32),
        timestamps=jnp.full((c,), -1, jnp.int32),
        valid=jnp.zeros((c,), bool),
        counter=jnp.zeros((), jnp.int32),
        actions=jnp.full((c,), -1, jnp.int32),
    )


def decay(mem: EpisodicMemory, config: EpisodicConfig) -> EpisodicMemory:
    """Multiplies the importance of valid entries by ``config.decay`` (invalid stay 0)."""
    importance = jnp.where(mem.valid, mem.importance * config.decay, 0.0)
    return mem.replace(importance=importance.astype(jnp.float32))


def victim_order(mem: EpisodicMemory, config: EpisodicConfig) -> jax.Array:
    """[C] slot indices in the order new rows overwrite them (see module docstring)."""
    valid = mem.valid.astype(jnp.int32)
    if config.eviction == "fifo":
        # lexsort: last key is primary; the sort is stable so slot index breaks remaining ties.
        return jnp.lexsort((mem.timestamps, valid))
    return jnp.lexsort((mem.timestamps, mem.importance, valid))


def write(
    mem: EpisodicMemory,
    config: EpisodicConfig,
    keys: jax.Array,
    tokens: jax.Array,
    token_mask: jax.Array,
    returns: jax.Array,
    write_mask: jax.Array,
    actions: jax.Array | None = None,
) -> EpisodicMemory:
    """Stores the rows of a batch whose ``write_mask`` is true, evicting as configured.

    Args:
      mem: current memory.
      config: its static configuration.
      keys: [N, D] keys of the new experiences.
      tokens: [N, Lm] int token ids of their renderings.
      token_mask: [N, Lm] bool, true on real tokens.
      returns: [N] returns; importance is ``|return|``.
      write_mask: [N] bool, which rows to store.
      actions: [N] candidate index of each row's action (None: -1, unknown).

    Returns:
      The updated memory. See the module docstring for decay timing, eviction order and the
      rule for more rows than capacity (the last ``capacity`` rows win).
    """
    n = keys.shape[0]
    c = config.capacity
    chex.assert_shape(keys, (n, config.key_dim))
    chex.assert_shape([tokens, token_mask], (n, config.max_tokens))
    chex.assert_shape([returns, write_mask], (n,))

    write_mask = write_mask.astype(bool)
    # Number of rows with write_mask true at or after each row; a row survives when it is among
    # the last `c` such rows.
    at_or_after = jnp.cumsum(write_mask[::-1].astype(jnp.int32))[::-1]
    num_written = jnp.minimum(at_or_after[0] if n else 0, c)
    keep = write_mask & (at_or_after <= c)
    # Chronological rank (0..num_written-1) of each kept row among the kept rows.
    rank = num_written - at_or_after

    any_written = num_written > 0
    aged = decay(mem, config)
    aged_importance = jnp.where(any_written, aged.importance, mem.importance)
    mem = mem.replace(importance=aged_importance)

    victims = victim_order(mem, config)
    slot = jnp.where(keep, victims[jnp.clip(rank, 0, c - 1)], c)  # c = out of bounds: dropped

    def put(dst: jax.Array, src: jax.Array) -> jax.Array:
        return dst.at[slot].set(src.astype(dst.dtype), mode="drop")

    token_mask = token_mask.astype(bool)
    tokens = jnp.where(token_mask, tokens, config.pad_id)
    returns = returns.astype(jnp.float32)
    if actions is None:
        actions = jnp.full((n,), -1, jnp.int32)
    chex.assert_shape(actions, (n,))
    return mem.replace(
        keys=put(mem.keys, keys),
        tokens=put(mem.tokens, tokens),
        token_mask=put(mem.token_mask, token_mask),
        returns=put(mem.returns, returns),
        importance=put(mem.importance, jnp.abs(returns)),
        timestamps=put(mem.timestamps, mem.counter + rank),
        valid=put(mem.valid, jnp.ones((n,), bool)),
        counter=mem.counter + num_written.astype(jnp.int32),
        actions=put(mem.actions, actions),
    )


def scores(mem: EpisodicMemory, config: EpisodicConfig, queries: jax.Array) -> jax.Array:
    """[Q, C] retrieval scores of every slot for each query ``[Q, D]`` (-inf on invalid slots)."""
    cosine = _cosine(mem, config, queries)
    importance = mem.importance
    if config.normalize_importance:
        top = jnp.max(jnp.where(mem.valid, importance, 0.0))
        importance = importance / jnp.where(top > 0, top, 1.0)
    score = config.w_sim * cosine + config.w_imp * importance[None, :]
    if config.w_rec:
        ts = mem.timestamps.astype(jnp.float32)
        newest = jnp.max(jnp.where(mem.valid, ts, -jnp.inf))
        oldest = jnp.min(jnp.where(mem.valid, ts, jnp.inf))
        span = newest - oldest
        recency = jnp.where(span > 0, (ts - oldest) / jnp.where(span > 0, span, 1.0), 1.0)
        score = score + config.w_rec * recency[None, :]
    return jnp.where(mem.valid[None, :], score, -jnp.inf)


def retrieve(mem: EpisodicMemory, config: EpisodicConfig, queries: jax.Array) -> Retrieved:
    """Top-``k`` valid entries for each query by ``w_sim*cosine + w_imp*importance``
    (``+ w_rec*recency`` when set).

    Ties are broken by lower slot index (``lax.top_k`` is stable). When fewer than ``k`` valid
    entries (or fewer than ``k`` scoring at least ``score_threshold``) exist, the remaining
    positions are marked invalid and zero/pad filled, so an invalid entry is never returned as
    valid.

    Args:
      mem: memory to read.
      config: its static configuration.
      queries: [Q, D] query keys.

    Returns:
      ``Retrieved`` with leading shape [Q, k].
    """
    score = scores(mem, config, queries)
    top_scores, top_idx = jax.lax.top_k(score, config.k)
    valid = mem.valid[top_idx] & jnp.isfinite(top_scores)
    if config.score_threshold is not None:
        valid = valid & (top_scores >= config.score_threshold)
    v1 = valid[..., None]
    token_mask = mem.token_mask[top_idx] & v1
    return Retrieved(
        indices=jnp.where(valid, top_idx, -1).astype(jnp.int32),
        scores=jnp.where(valid, top_scores, 0.0),
        valid=valid,
        tokens=jnp.where(token_mask, mem.tokens[top_idx], config.pad_id),
        token_mask=token_mask,
        keys=jnp.where(v1, mem.keys[top_idx], 0.0),
        returns=jnp.where(valid, mem.returns[top_idx], 0.0),
        actions=jnp.where(valid, mem.actions[top_idx], -1).astype(jnp.int32),
    )


def _cosine(mem: EpisodicMemory, config: EpisodicConfig, queries: jax.Array) -> jax.Array:
    chex.assert_shape(queries, (None, config.key_dim))
    eps = 1e-8
    q, k = queries.astype(jnp.float32), mem.keys
    if config.center_keys:
        count = jnp.maximum(jnp.sum(mem.valid), 1).astype(jnp.float32)
        mean = jnp.sum(jnp.where(mem.valid[:, None], k, 0.0), axis=0) / count
        q, k = q - mean, k - mean
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), eps)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), eps)
    return q @ k.T


def action_values(
    mem: EpisodicMemory, config: EpisodicConfig, queries: jax.Array, num_actions: int
) -> tuple[jax.Array, jax.Array]:
    """Episodic control: what the memory says each candidate action is worth, per query.

    The ``control_k`` valid entries nearest to each query by cosine alone (importance plays no
    part: a failure is as informative as a success) vote for the action they took with weight
    ``w = exp((cosine - 1) / control_temperature)`` (1 for an identical key). The value of
    action ``a`` is the kernel-weighted mean of their returns, shrunk toward 0 by one pseudo
    count: ``sum_i w_i r_i [a_i = a] / (1 + sum_i w_i [a_i = a])``. An action nobody took
    is worth 0; entries with an unknown action (-1) do not vote.

    Args:
      mem: memory to read.
      config: its static configuration.
      queries: [Q, D] query keys.
      num_actions: ``A``, candidates per query.

    Returns:
      ``(values [Q, A], weights [Q, A])``, weights the summed kernel mass behind each value.
    """
    k = min(config.control_k, config.capacity)
    cosine = jnp.where(mem.valid[None, :], _cosine(mem, config, queries), -jnp.inf)
    top_cos, top_idx = jax.lax.top_k(cosine, k)
    valid = mem.valid[top_idx] & jnp.isfinite(top_cos)
    w = jnp.where(valid, jnp.exp((jnp.minimum(top_cos, 1.0) - 1.0) / config.control_temperature),
                  0.0)  # fmt: skip
    votes = jax.nn.one_hot(mem.actions[top_idx], num_actions, dtype=jnp.float32)  # -1: no vote
    weights = jnp.einsum("qk,qka->qa", w, votes)
    total = jnp.einsum("qk,qka->qa", w * mem.returns[top_idx], votes)
    return total / (1.0 + weights), weights
