"""Memoized frozen-LLM features: skip the LLM when every prompt of a step was seen before.

With a frozen LLM (``TrainConfig.caches_features``: heads-only training in score mode) and no
memory spliced into the prompt, a row's ``ScoreFeatures`` (candidate log-likelihoods, candidate
hidden states, prompt hidden state) is a fixed function of its prompt and candidate tokens.
Environments with a small observation space (Blackjack has about 280 distinct states) revisit
the same prompts constantly, so after a short warm-up the step's LLM forward can be replaced
by a host-side lookup: ``act`` then runs only the heads and the action draw.

The cache is exact: a hit returns the features that the same compiled call computed for the
identical row. It is keyed by the bytes of the row's prompt tokens, prompt mask, candidate
tokens and candidate mask; least recently used rows are evicted beyond ``capacity``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from rllama_jax.train import Observation, ScoreFeatures


class FeatureCache:
    """Host-side LRU map from an observation row to its frozen-LLM ``ScoreFeatures``.

    capacity: rows kept (each costs ``(A + 1) * D + A`` float32 numbers: 7 KB for SmolLM2-135M
    with two candidates). ``lookup`` returns features for a whole batch only when every row
    hits; otherwise the caller computes the ``missing`` rows (``Rollout`` runs the LLM on just
    those, padded to a power of two) and ``insert``s them. ``hits`` / ``misses`` count act
    calls that did not / did run the LLM.
    """

    def __init__(self, capacity: int = 65536) -> None:
        if capacity <= 0:
            raise ValueError(f"FeatureCache capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._rows: OrderedDict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self.hits = 0  # batches served from the cache
        self.misses = 0  # batches that ran the LLM

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def _keys(obs: Observation) -> list[bytes]:
        if obs.candidate_tokens is None:
            raise ValueError("FeatureCache needs score-mode observations (candidate tokens)")
        parts = [
            np.asarray(obs.prompt_tokens),
            np.asarray(obs.prompt_mask),
            np.asarray(obs.candidate_tokens),
            np.asarray(obs.candidate_mask),
        ]
        return [b"".join(p[i].tobytes() for p in parts) for i in range(parts[0].shape[0])]

    def lookup(self, obs: Observation, count: bool = True) -> ScoreFeatures | None:
        """Features ``[B, A]``, ``[B, A, D]``, ``[B, D]`` for the batch ``obs`` [B, ...] if every
        row is cached, else None. count: add the call to ``hits`` / ``misses``."""
        keys = self._keys(obs)
        found = []
        for k in keys:
            row = self._rows.get(k)
            if row is None:
                self.misses += count
                return None
            found.append(row)
        for k in keys:
            self._rows.move_to_end(k)
        self.hits += count
        return ScoreFeatures(*(np.stack(parts) for parts in zip(*found, strict=True)))

    def missing(self, obs: Observation) -> list[int]:
        """Indices of the rows of ``obs`` that are not cached, one per distinct row."""
        seen: set[bytes] = set()
        out = []
        for i, k in enumerate(self._keys(obs)):
            if k not in self._rows and k not in seen:
                seen.add(k)
                out.append(i)
        return out

    def insert(self, obs: Observation, features: ScoreFeatures) -> None:
        """Stores every row of ``features`` (as computed for ``obs``)."""
        arrays = [
            np.asarray(f)
            for f in (features.scores, features.candidate_hidden, features.prompt_hidden)
        ]
        for i, k in enumerate(self._keys(obs)):
            self._rows[k] = tuple(a[i] for a in arrays)
            self._rows.move_to_end(k)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def save(self, path: str) -> None:
        """Writes every row to ``path`` (``.npz``), oldest first, so a later process (e.g.
        ``experiments/evaluate.py`` on the run's workdir) starts warm."""
        if not self._rows:
            return
        keys = list(self._rows)
        if len({len(k) for k in keys}) != 1:
            raise ValueError("FeatureCache.save needs rows of one layout (one run's prompts)")
        parts = list(zip(*self._rows.values(), strict=True))
        np.savez(
            path,
            keys=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1),
            scores=np.stack(parts[0]),
            candidate_hidden=np.stack(parts[1]),
            prompt_hidden=np.stack(parts[2]),
        )

    @classmethod
    def load(cls, path: str, capacity: int = 65536) -> FeatureCache:
        """A cache holding the rows ``save`` wrote to ``path`` (the newest ``capacity``).
        Only valid for the same model and prompt layout: keys are token ids."""
        cache = cls(capacity)
        with np.load(path) as data:
            rows = zip(
                data["keys"], data["scores"], data["candidate_hidden"], data["prompt_hidden"],
                strict=True,
            )  # fmt: skip
            for key, *features in rows:
                cache._rows[key.tobytes()] = tuple(features)
        while len(cache._rows) > capacity:
            cache._rows.popitem(last=False)
        return cache

    @property
    def hit_rate(self) -> float:
        """Fraction of act calls that skipped the LLM."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
