"""Host-side text <-> token arrays for the jitted acting functions (numpy only, no jax).

Everything here turns Python strings into fixed-shape integer arrays (and back) so that the
compiled calls in ``rllama_jax.sampling`` see a handful of shapes over a whole run:

* prompts are rendered with the tokenizer's chat template, **left**-padded (the last real
  token sits in the last column, where generation continues), and their width is rounded up
  to a length bucket;
* the shared part of every prompt (the system message, identical for all environments) can
  be split off, run once into a ``PrefixCache``, and only the per-row suffixes encoded;
* candidate actions are **right**-padded into ``[B, A, C]`` with a per-row action mask.

Shapes: ``B`` rows, ``L`` prompt width (a bucket), ``P`` shared-prefix tokens, ``A`` candidate
actions per row, ``C`` tokens per candidate, ``N`` generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Prompt widths are rounded up to one of these. Powers of two: a run whose prompts grow up to
# length n compiles each jitted function at most ceil(log2(n / 32)) + 1 times (8 buckets in
# all), and because the bucket above n is < 2n, a padded row is always less than half padding
# (attention/MLP cost wasted on padding < 50%, usually far less). The 32 bucket is for the
# per-row suffixes that follow a shared-prefix cache (~30 tokens for a Blackjack observation
# in the chat template), which would otherwise be half padding.
LENGTH_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)

Conversation = list[dict[str, str]]


def bucket_length(length: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= ``length``; raises ``ValueError`` past the largest one."""
    for b in sorted(buckets):
        if length <= b:
            return int(b)
    raise ValueError(f"prompt of {length} tokens exceeds the largest length bucket {max(buckets)}")


def default_pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0. The value never matters to the model
    (padding is masked out); it only has to be a valid embedding row."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(pad, int):
            return pad
    return 0


def left_pad(
    rows: Sequence[Sequence[int]], width: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligns integer rows in ``[B, width]``: returns (tokens int32, mask int32)."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        if n > width:
            raise ValueError(f"row {i} has {n} tokens, more than the width {width}")
        if n:
            tokens[i, width - n :] = row
            mask[i, width - n :] = 1
    return tokens, mask


def pad_after_prefix(
    rows: Sequence[Sequence[int]], width: int, prefix_len: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows that all start with the same ``prefix_len`` tokens, laid out as
    ``[prefix | padding | rest]`` in ``[B, width]``: the shared prefix sits unpadded in the
    first columns (so it can be computed once for all rows) and each row's own tokens are
    right-aligned as with ``left_pad``. Positions come from the mask, so the model sees
    exactly the left-padded sequence. Returns (tokens int32, mask int32).
    """
    if not rows:
        return left_pad(rows, width, pad_id)
    head = list(rows[0][:prefix_len])
    for i, row in enumerate(rows):
        if list(row[:prefix_len]) != head:
            raise ValueError(f"row {i} does not start with the shared {prefix_len}-token prefix")
    tokens, mask = left_pad([row[prefix_len:] for row in rows], width - prefix_len, pad_id)
    pre = np.broadcast_to(np.asarray(head, np.int32), (len(rows), prefix_len))
    ones = np.ones((len(rows), prefix_len), np.int32)
    return np.concatenate([pre, tokens], axis=1), np.concatenate([ones, mask], axis=1)


def render_chat(
    tokenizer: Any, conversation: Conversation, *, add_generation_prompt: bool = True
) -> str:
    """The chat template's text for one conversation (``[{"role", "content"}, ...]``)."""
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def chat_token_ids(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    *,
    add_generation_prompt: bool = True,
) -> list[list[int]]:
    """Token ids of each conversation, exactly ``apply_chat_template(..., tokenize=True)``'s.

    Rendered to text, then encoded in one batched call with ``add_special_tokens=False``: the
    template writes its own special tokens (BOS included when it has one), so the tokenizer
    must add none.
    """
    texts = [
        render_chat(tokenizer, c, add_generation_prompt=add_generation_prompt)
        for c in conversations
    ]
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_chat_batch(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    *,
    add_generation_prompt: bool = True,
    buckets: Sequence[int] = LENGTH_BUCKETS,
    pad_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Chat-templated prompts, left-padded to a length bucket.

    conversations: B lists of ``{"role", "content"}`` messages.
    Returns (tokens [B, L] int32, mask [B, L] int32) with L the smallest bucket >= the longest
    row; padding is ``pad_id`` (default ``default_pad_id(tokenizer)``) with mask 0.
    """
    rows = chat_token_ids(tokenizer, conversations, add_generation_prompt=add_generation_prompt)
    width = bucket_length(max((len(r) for r in rows), default=1), buckets)
    return left_pad(rows, width, default_pad_id(tokenizer) if pad_id is None else pad_id)


# ---------------------------------------------------------------------------- shared prefix
def split_shared_prefix(tokenizer: Any, system_prompt: str) -> np.ndarray:
    """Token ids ``[P]`` of the prefix every prompt with this system prompt starts with: the
    chat template's rendering of the system message alone (with the template's BOS).

    Run it once through ``sampling.build_prefix`` and encode each row with
    ``encode_chat_suffixes``; ``prefix + suffix`` is then exactly the full encoding (checked
    per row there, since a template may render a system message differently when more
    messages follow, or a tokenizer may merge across the boundary).
    """
    (ids,) = chat_token_ids(
        tokenizer, [[{"role": "system", "content": system_prompt}]], add_generation_prompt=False
    )
    return np.asarray(ids, np.int32)


def encode_chat_suffixes(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    prefix_ids: np.ndarray | Sequence[int],
    *,
    add_generation_prompt: bool = True,
    buckets: Sequence[int] = LENGTH_BUCKETS,
    pad_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """What follows the shared prefix in each conversation, left-padded to a length bucket.

    conversations: B conversations whose full encodings all start with ``prefix_ids`` [P]
    (normally: they start with the system message ``prefix_ids`` was made from).
    Returns (tokens [B, L] int32, mask [B, L] int32): row i's real tokens are its full
    encoding minus the first P ids, so ``concat(prefix_ids, row) == full encoding``.
    Raises ``ValueError`` for a row whose encoding does not start with the prefix.
    """
    prefix = [int(t) for t in np.asarray(prefix_ids).reshape(-1)]
    p = len(prefix)
    rows = chat_token_ids(tokenizer, conversations, add_generation_prompt=add_generation_prompt)
    suffixes = []
    for i, row in enumerate(rows):
        if row[:p] != prefix:
            raise ValueError(
                f"conversation {i} does not start with the shared prefix: its encoding begins "
                f"{row[: p + 4]} but the prefix is {prefix}"
            )
        suffixes.append(row[p:])
    width = bucket_length(max((len(r) for r in suffixes), default=1), buckets)
    return left_pad(suffixes, width, default_pad_id(tokenizer) if pad_id is None else pad_id)


# ---------------------------------------------------------------------------- candidates
def encode_candidates(
    tokenizer: Any,
    candidates: Sequence[Sequence[str]],
    *,
    max_actions: int | None = None,
    max_tokens: int | None = None,
    pad_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate action strings of every row, right-padded for ``score_candidates``.

    candidates: B lists of strings (rows may have different numbers of candidates).
    max_actions / max_tokens: fix A and C (keep them constant over a run so scoring
    compiles once); default to the largest count / length in this batch. A row or candidate
    that does not fit raises ``ValueError`` (truncating would silently change its score), as
    does a candidate that encodes to no token.
    Returns (tokens [B, A, C] int32, mask [B, A, C] int32, action_mask [B, A] bool).
    Candidates are encoded without special tokens, as the text that follows the prompt.
    """
    flat = [s for row in candidates for s in row]
    ids = [list(x) for x in tokenizer(flat, add_special_tokens=False)["input_ids"]] if flat else []
    for s, x in zip(flat, ids, strict=True):
        if not x:
            raise ValueError(f"candidate {s!r} encodes to no token")
    most_actions = max((len(row) for row in candidates), default=0)
    longest = max((len(x) for x in ids), default=1)
    a = most_actions if max_actions is None else max_actions
    c = longest if max_tokens is None else max_tokens
    if most_actions > a:
        raise ValueError(f"a row has {most_actions} candidates, more than max_actions={a}")
    if longest > c:
        raise ValueError(f"a candidate has {longest} tokens, more than max_tokens={c}")
    pad = default_pad_id(tokenizer) if pad_id is None else pad_id
    b = len(candidates)
    tokens = np.full((b, max(a, 1), max(c, 1)), pad, np.int32)
    mask = np.zeros(tokens.shape, np.int32)
    action_mask = np.zeros((b, max(a, 1)), bool)
    it = iter(ids)
    for i, row in enumerate(candidates):
        for j in range(len(row)):
            x = next(it)
            tokens[i, j, : len(x)] = x
            mask[i, j, : len(x)] = 1
            action_mask[i, j] = True
    return tokens, mask, action_mask


# ---------------------------------------------------------------------------- decoding
def decode_responses(
    tokenizer: Any,
    tokens: np.ndarray,
    mask: np.ndarray,
    *,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Text of each generated row: tokens [B, N] where mask [B, N] is set (the stop token, a
    special token, is dropped with ``skip_special_tokens``)."""
    tokens = np.asarray(tokens)
    mask = np.asarray(mask).astype(bool)
    rows = [tokens[i][mask[i]].tolist() for i in range(tokens.shape[0])]
    return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
