"""Human-readable views of memory contents, for notebooks and debugging (host side, not jit)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from rllama_jax.memory.config import MemoryState
from rllama_jax.memory.episodic import EpisodicMemory, Retrieved
from rllama_jax.memory.working import WorkingMemory

DecodeFn = Callable[[list[int]], str]


def _text(decode_fn: DecodeFn, tokens: np.ndarray, mask: np.ndarray, max_text: int) -> str:
    text = decode_fn([int(t) for t in tokens[mask.astype(bool)]])
    text = text.replace("\n", "\\n")
    return text if len(text) <= max_text else text[: max_text - 3] + "..."


def _table(header: Sequence[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]

    # The text column (last) is not padded so long texts do not widen the whole table.
    def line(cells: Sequence[str]) -> str:
        head = [c.rjust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return " | ".join([*head, cells[-1]])

    rule = "-+-".join("-" * w for w in widths[:-1]) + "-+-" + "-" * len(header[-1])
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _render_episodic(
    mem: EpisodicMemory, decode_fn: DecodeFn, scores: np.ndarray | None, max_text: int
) -> str:
    valid = np.asarray(mem.valid)
    header = ["slot", "score", "importance", "return", "time", "text"]
    if scores is None:
        header.remove("score")
    rows = []
    for slot in np.flatnonzero(valid):
        row = [str(slot)]
        if scores is not None:
            row.append(f"{float(scores[slot]):.4f}")
        row += [
            f"{float(mem.importance[slot]):.4f}",
            f"{float(mem.returns[slot]):.4f}",
            str(int(mem.timestamps[slot])),
            _text(decode_fn, mem.tokens[slot], mem.token_mask[slot], max_text),
        ]
        rows.append(row)
    title = f"EpisodicMemory: {valid.sum()}/{valid.size} valid, {int(mem.counter)} written"
    return title + "\n" + _table(header, rows)


def _render_working(wm: WorkingMemory, decode_fn: DecodeFn, max_text: int) -> str:
    e, w = wm.valid.shape
    rows = []
    for env in range(e):
        order = (int(wm.pointer[env]) + np.arange(w)) % w  # oldest first
        age = 0
        for slot in order:
            if not wm.valid[env, slot]:
                continue
            text = _text(decode_fn, wm.tokens[env, slot], wm.token_mask[env, slot], max_text)
            rows.append(
                [str(env), str(age), str(slot), f"{float(wm.importance[env, slot]):.4f}", text]
            )
            age += 1
    title = f"WorkingMemory: {e} envs, window {w}, steps per env {np.asarray(wm.count).tolist()}"
    return title + "\n" + _table(["env", "step", "slot", "importance", "text"], rows)


def _render_retrieved(got: Retrieved, decode_fn: DecodeFn, max_text: int) -> str:
    q, k = got.valid.shape
    rows = []
    for i in range(q):
        for j in range(k):
            if not got.valid[i, j]:
                continue
            text = _text(decode_fn, got.tokens[i, j], got.token_mask[i, j], max_text)
            rows.append(
                [
                    str(i),
                    str(j),
                    str(int(got.indices[i, j])),
                    f"{float(got.scores[i, j]):.4f}",
                    f"{float(got.returns[i, j]):.4f}",
                    text,
                ]
            )
    title = f"Retrieved: {q} queries, top-{k}, {int(np.asarray(got.valid).sum())} valid"
    return title + "\n" + _table(["query", "rank", "slot", "score", "return", "text"], rows)


def render_memory(
    memory: EpisodicMemory | WorkingMemory | Retrieved | MemoryState,
    decode_fn: DecodeFn,
    scores: jax.Array | None = None,
    max_text: int = 80,
) -> str:
    """A text table of the valid entries of a memory, for notebooks and logs.

    Args:
      memory: an episodic memory (one row per valid slot: slot, [score], importance, return,
        timestamp, text), a working memory (per env, oldest step first), a ``Retrieved``
        (per query, best first) or a ``MemoryState`` (its enabled parts).
      decode_fn: maps a list of token ids (padding removed) to text, e.g. ``tokenizer.decode``.
      scores: optional [C] retrieval scores to show for an episodic memory
        (e.g. ``episodic.scores(mem, config, query[None])[0]``).
      max_text: texts longer than this are cut with "...".

    Returns:
      The table as a string (newlines inside texts are shown as ``\\n``).
    """
    memory = jax.device_get(memory)
    if isinstance(memory, MemoryState):
        parts = []
        if memory.episodic is not None:
            parts.append(_render_episodic(memory.episodic, decode_fn, None, max_text))
        if memory.working is not None:
            parts.append(_render_working(memory.working, decode_fn, max_text))
        return "\n\n".join(parts) if parts else "MemoryState: memory off"
    if isinstance(memory, EpisodicMemory):
        s = None if scores is None else np.asarray(scores)
        return _render_episodic(memory, decode_fn, s, max_text)
    if isinstance(memory, WorkingMemory):
        return _render_working(memory, decode_fn, max_text)
    if isinstance(memory, Retrieved):
        return _render_retrieved(memory, decode_fn, max_text)
    raise TypeError(f"cannot render {type(memory).__name__}")
