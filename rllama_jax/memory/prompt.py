"""Pure token operations that turn memory contents into a fixed-size prompt region and splice it
into left-padded prompts, inside ``jit`` (static shapes, no host round trip).

Layout of a memory region (``build_memory_region``)::

    [pad ... pad] <episodic header> <e1> <e2> ... <ek> <working header> <s1> ... <sW>

Valid tokens keep their order and are compacted to the RIGHT end of the ``R`` slots, padding
(masked out) on the left, so a region composes with left-padded prompts. A header is dropped when
its section has no valid token. Entries/steps bring their own separators (e.g. a trailing
newline in their rendering). If more than ``R`` valid tokens are present, the *earliest* ones
are dropped (the most recent working steps survive); use ``region_capacity`` to size ``R`` so
nothing is ever truncated.

After ``splice`` every row is again left-padded: its valid tokens are contiguous and right
aligned. The model's positions are then ``positions_from_mask(mask) = cumsum(mask) - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

# Texts of the default headers and of the end of one rendered entry: every entry and step
# sits on its own line, under its header, and the observation starts on a fresh line.
EPISODIC_HEADER = "Relevant past experience:\n"
WORKING_HEADER = "Recent steps:\n"
ENTRY_END = "\n"


def flatten_entries(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Concatenates ``n`` entries: tokens/mask [..., n, L] -> [..., n*L] (entry order kept)."""
    chex.assert_equal_shape([tokens, mask])
    shape = tokens.shape[:-2] + (tokens.shape[-2] * tokens.shape[-1],)
    return tokens.reshape(shape), mask.reshape(shape).astype(bool)


def _compact(tokens: jax.Array, mask: jax.Array, pad_id: int, valid_first: bool):
    mask = mask.astype(bool)
    # Stable argsort of a 0/1 key keeps the relative order of valid (and of invalid) tokens.
    sort_key = (~mask if valid_first else mask).astype(jnp.int32)
    order = jnp.argsort(sort_key, axis=-1, stable=True)
    new_mask = jnp.take_along_axis(mask, order, axis=-1)
    new_tokens = jnp.take_along_axis(tokens, order, axis=-1)
    return jnp.where(new_mask, new_tokens, pad_id), new_mask


def compact_left(
    tokens: jax.Array, mask: jax.Array, pad_id: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Moves the valid tokens of [..., T] to the front, in order; padding (``pad_id``) after."""
    chex.assert_equal_shape([tokens, mask])
    return _compact(tokens, mask, pad_id, valid_first=True)


def compact_right(
    tokens: jax.Array, mask: jax.Array, pad_id: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Moves the valid tokens of [..., T] to the end, in order; padding (``pad_id``) before."""
    chex.assert_equal_shape([tokens, mask])
    return _compact(tokens, mask, pad_id, valid_first=False)


def region_capacity(
    episodic_header_len: int,
    episodic_shape: tuple[int, int] | None,
    working_header_len: int,
    working_shape: tuple[int, int] | None,
) -> int:
    """Smallest region size ``R`` that can never truncate: headers + ``k*Lm`` + ``W*Lw``.

    ``episodic_shape`` is ``(k, Lm)`` and ``working_shape`` ``(W, Lw)``; ``None`` for an absent
    section (its header is then not counted either).
    """
    total = 0
    if episodic_shape is not None:
        total += episodic_header_len + episodic_shape[0] * episodic_shape[1]
    if working_shape is not None:
        total += working_header_len + working_shape[0] * working_shape[1]
    return total


def _section(
    header: Sequence[int] | jax.Array, tokens: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    flat, flat_mask = flatten_entries(tokens, mask)
    b = flat.shape[0]
    header = jnp.asarray(header, jnp.int32).reshape(-1)
    header_tokens = jnp.broadcast_to(header, (b, header.shape[0]))
    header_mask = jnp.broadcast_to(jnp.any(flat_mask, axis=-1, keepdims=True), header_tokens.shape)
    return (
        jnp.concatenate([header_tokens, flat.astype(jnp.int32)], axis=-1),
        jnp.concatenate([header_mask, flat_mask], axis=-1),
    )


def build_memory_region(
    episodic_header: Sequence[int] | jax.Array,
    episodic_tokens: jax.Array | None,
    episodic_mask: jax.Array | None,
    working_header: Sequence[int] | jax.Array,
    working_tokens: jax.Array | None,
    working_mask: jax.Array | None,
    region_size: int,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Renders retrieved experiences and recent steps as one right-aligned token region.

    Args:
      episodic_header: [H1] token ids, e.g. "Relevant past experience:".
      episodic_tokens: [B, k, Lm] retrieved entries (best first), or None to omit the section.
      episodic_mask: [B, k, Lm] bool.
      working_header: [H2] token ids, e.g. "Recent steps:".
      working_tokens: [B, W, Lw] recent steps, oldest first (``working.read_text``), or None.
      working_mask: [B, W, Lw] bool.
      region_size: ``R``, static size of the region.
      pad_id: token id of padding.

    Returns:
      region: [B, R] int32, valid tokens right-aligned (see module docstring for the layout).
      region_mask: [B, R] bool.
    """
    parts = []
    if episodic_tokens is not None:
        chex.assert_rank(episodic_tokens, 3)
        parts.append(_section(episodic_header, episodic_tokens, episodic_mask))
    if working_tokens is not None:
        chex.assert_rank(working_tokens, 3)
        parts.append(_section(working_header, working_tokens, working_mask))
    if not parts:
        raise ValueError("build_memory_region needs episodic and/or working tokens")
    if len(parts) == 2:
        chex.assert_equal_shape_prefix([parts[0][0], parts[1][0]], 1)
    tokens = jnp.concatenate([p[0] for p in parts], axis=-1)
    mask = jnp.concatenate([p[1] for p in parts], axis=-1)
    tokens, mask = compact_right(tokens, mask, pad_id)
    total = tokens.shape[-1]
    if total >= region_size:
        return tokens[:, total - region_size :], mask[:, total - region_size :]
    fill = region_size - total
    b = tokens.shape[0]
    return (
        jnp.concatenate([jnp.full((b, fill), pad_id, jnp.int32), tokens], axis=-1),
        jnp.concatenate([jnp.zeros((b, fill), bool), mask], axis=-1),
    )


def splice(
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    region: jax.Array,
    region_mask: jax.Array,
    insert_at: jax.Array,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Inserts a memory region into each prompt and re-left-pads the result.

    Args:
      prompt_tokens: [B, L] left-padded prompts.
      prompt_mask: [B, L] bool, true on real tokens.
      region: [B, R] memory regions (any padding layout; only ``region_mask`` tokens are used).
      region_mask: [B, R] bool.
      insert_at: [B] int, number of valid prompt tokens placed before the region (an offset
        into the unpadded prompt, e.g. the system prompt's length; clipped to the valid length).
        Padding does not count, so the same offset works for every padding amount.
      pad_id: token id written on padding.

    Returns:
      tokens: [B, L+R] = prompt[:insert_at] + region + prompt[insert_at:], valid tokens
        contiguous and right-aligned, ``pad_id`` on the left.
      mask: [B, L+R] bool.
    """
    b, seq = prompt_tokens.shape
    r = region.shape[1]
    chex.assert_shape(prompt_mask, (b, seq))
    chex.assert_shape([region, region_mask], (b, r))
    chex.assert_shape(insert_at, (b,))
    prompt_mask = prompt_mask.astype(bool)
    region_mask = region_mask.astype(bool)

    prompt_rank = jnp.cumsum(prompt_mask, axis=-1) - 1  # order among valid prompt tokens
    region_rank = jnp.cumsum(region_mask, axis=-1) - 1
    at = jnp.clip(insert_at, 0, jnp.sum(prompt_mask, axis=-1))[:, None]
    # Destination order of each valid token: the prompt tokens after the cut move past the
    # region's r slots. Invalid tokens get -1 so a stable sort puts them first (left padding).
    prompt_key = jnp.where(prompt_rank < at, prompt_rank, prompt_rank + r)
    region_key = at + region_rank
    key = jnp.concatenate(
        [jnp.where(prompt_mask, prompt_key, -1), jnp.where(region_mask, region_key, -1)], axis=-1
    )
    tokens = jnp.concatenate([prompt_tokens, region], axis=-1).astype(jnp.int32)
    mask = key >= 0
    order = jnp.argsort(key, axis=-1, stable=True)
    new_mask = jnp.take_along_axis(mask, order, axis=-1)
    new_tokens = jnp.take_along_axis(tokens, order, axis=-1)
    return jnp.where(new_mask, new_tokens, pad_id), new_mask


def splice_slots(
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    slot_mask: jax.Array,
    insert_at: jax.Array,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inserts ``M`` placeholder slots for soft-prompt vectors, exactly where ``splice`` would
    put a text region, and re-left-pads.

    Args:
      prompt_tokens, prompt_mask: [B, L] left-padded prompts.
      slot_mask: [B, M] bool, which slots exist (a row with nothing to remember has none).
      insert_at: [B] valid prompt tokens placed before the slots (see ``splice``).
      pad_id: token id written on padding and on the slots.

    Returns:
      tokens: [B, L+M] with ``pad_id`` on the slots; mask: [B, L+M] bool, true on real tokens
      and existing slots; slots: [B, L+M] int32, the soft-prompt index ``j`` at slot
      positions, -1 elsewhere (see ``latent.place_soft_prompt``).
    """
    b, m = slot_mask.shape
    placeholders = jnp.full((b, m), pad_id, jnp.int32)
    tokens, mask = splice(prompt_tokens, prompt_mask, placeholders, slot_mask, insert_at, pad_id)
    # The same splice (same masks, so the same stable order) on slot indices instead of ids.
    index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
    no_slot = jnp.full(prompt_tokens.shape, -1, jnp.int32)
    slots, _ = splice(no_slot, prompt_mask, index, slot_mask, insert_at, -1)
    return tokens, mask, slots


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """[B, T] int32 positions for a left-padded row: ``cumsum(mask) - 1``, 0 on padding."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
