"""Episodic memory: eviction and retrieval against loop-based numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rllama_jax.memory import episodic, render_memory
from rllama_jax.memory.episodic import EpisodicConfig

# Jitted once per (config, shapes): eager dispatch of many small ops is slow on CPU.
write = jax.jit(episodic.write)
retrieve = jax.jit(episodic.retrieve)
init = jax.jit(episodic.init)
decay = jax.jit(episodic.decay)


class RefEpisodic:
    """Loop-by-loop numpy model of the documented semantics (one row at a time)."""

    def __init__(self, cfg: EpisodicConfig):
        c, d, lm = cfg.capacity, cfg.key_dim, cfg.max_tokens
        self.cfg = cfg
        self.keys = np.zeros((c, d), np.float32)
        self.tokens = np.full((c, lm), cfg.pad_id, np.int32)
        self.token_mask = np.zeros((c, lm), bool)
        self.returns = np.zeros(c, np.float32)
        self.importance = np.zeros(c, np.float32)
        self.timestamps = np.full(c, -1, np.int32)
        self.valid = np.zeros(c, bool)
        self.counter = 0

    def write(self, keys, tokens, token_mask, returns, write_mask):
        cfg = self.cfg
        rows = [i for i in range(len(write_mask)) if write_mask[i]][-cfg.capacity :]
        if not rows:
            return
        self.importance[self.valid] *= np.float32(cfg.decay)
        written: set[int] = set()
        for i in rows:
            free = [s for s in range(cfg.capacity) if s not in written]
            empty = [s for s in free if not self.valid[s]]
            if empty:
                slot = empty[0]
            elif cfg.eviction == "fifo":
                slot = min(free, key=lambda s: self.timestamps[s])
            else:
                slot = min(free, key=lambda s: (self.importance[s], self.timestamps[s]))
            written.add(slot)
            self.keys[slot] = keys[i]
            self.token_mask[slot] = token_mask[i]
            self.tokens[slot] = np.where(token_mask[i], tokens[i], cfg.pad_id)
            self.returns[slot] = returns[i]
            self.importance[slot] = abs(np.float32(returns[i]))
            self.timestamps[slot] = self.counter
            self.valid[slot] = True
            self.counter += 1

    def retrieve(self, queries):
        """Brute force: score every valid slot in float64, sort by (-score, slot)."""
        cfg = self.cfg
        out = []
        kn = self.keys / np.maximum(np.linalg.norm(self.keys, axis=-1, keepdims=True), 1e-8)
        imp = self.importance.astype(np.float64)
        if cfg.normalize_importance and imp[self.valid].max(initial=0) > 0:
            imp = imp / imp[self.valid].max()
        for q in np.asarray(queries, np.float64):
            qn = q / max(np.linalg.norm(q), 1e-8)
            score = cfg.w_sim * (kn @ qn) + cfg.w_imp * imp
            cands = [s for s in range(cfg.capacity) if self.valid[s]]
            if cfg.score_threshold is not None:
                cands = [s for s in cands if score[s] >= cfg.score_threshold]
            cands.sort(key=lambda s: (-score[s], s))
            out.append([(s, score[s]) for s in cands[: cfg.k]])
        return out


N = 8  # rows per write call everywhere: one compilation per config
CAP = 5  # < N, so single calls can exceed the capacity
EVICT = {
    "fifo": EpisodicConfig(capacity=CAP, key_dim=3, max_tokens=4, k=2),
    "fifo_decay": EpisodicConfig(capacity=CAP, key_dim=3, max_tokens=4, k=2, decay=0.5),
    "importance": EpisodicConfig(capacity=CAP, key_dim=3, max_tokens=4, k=2, eviction="importance"),
    "importance_decay": EpisodicConfig(
        capacity=CAP, key_dim=3, max_tokens=4, k=2, eviction="importance", decay=0.5
    ),
}
RETRIEVE = EpisodicConfig(capacity=16, key_dim=4, max_tokens=3, k=5)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _batch(rng, cfg, density=0.7, int_returns=False, n=N):
    keys = rng.normal(size=(n, cfg.key_dim)).astype(np.float32)
    tokens = rng.integers(1, 50, size=(n, cfg.max_tokens)).astype(np.int32)
    lengths = rng.integers(1, cfg.max_tokens + 1, size=n)
    token_mask = np.arange(cfg.max_tokens)[None] < lengths[:, None]
    if int_returns:  # many exact importance ties: exercises the timestamp tie-break
        returns = rng.integers(-2, 3, size=n).astype(np.float32)
    else:
        returns = rng.normal(size=n).astype(np.float32)
    write_mask = rng.random(n) < density
    return keys, tokens, token_mask, returns, write_mask


def _rows(cfg, ids, returns, write_mask=None):
    """N rows with token ids ``ids`` (one token each) and the given returns; rest masked."""
    m = len(ids)
    tokens = np.zeros((N, cfg.max_tokens), np.int32)
    tokens[:m, 0] = ids
    token_mask = np.zeros((N, cfg.max_tokens), bool)
    token_mask[:, 0] = True
    rets = np.zeros(N, np.float32)
    rets[:m] = returns
    mask = np.zeros(N, bool)
    mask[:m] = True if write_mask is None else write_mask
    return np.ones((N, cfg.key_dim), np.float32), tokens, token_mask, rets, mask


def _assert_same(mem: episodic.EpisodicMemory, ref: RefEpisodic):
    mem = _np(mem)
    np.testing.assert_array_equal(mem.valid, ref.valid)
    np.testing.assert_array_equal(mem.timestamps, ref.timestamps)
    np.testing.assert_array_equal(mem.keys, ref.keys)
    np.testing.assert_array_equal(mem.tokens, ref.tokens)
    np.testing.assert_array_equal(mem.token_mask, ref.token_mask)
    np.testing.assert_array_equal(mem.returns, ref.returns)
    np.testing.assert_array_equal(mem.importance, ref.importance)
    assert int(mem.counter) == ref.counter


@pytest.mark.parametrize("name", sorted(EVICT))
def test_eviction_matches_loop_reference(name):
    cfg = EVICT[name]
    rng = np.random.default_rng(0)
    mem, ref = init(cfg), RefEpisodic(cfg)
    # Densities give empty calls, partial fills, overflow of the free space and more valid rows
    # than capacity in one call.
    for _ in range(25):
        density = float(rng.choice([0.0, 0.2, 0.5, 1.0]))
        batch = _batch(rng, cfg, density, int_returns=name.startswith("importance"))
        mem = write(mem, cfg, *batch)
        ref.write(*batch)
        _assert_same(mem, ref)
    assert ref.counter > cfg.capacity * 3  # many more writes than capacity really happened


def test_more_rows_than_capacity_last_rows_win():
    cfg = EVICT["fifo"]
    mem = write(init(cfg), cfg, *_rows(cfg, [1, 2], [1.0, 2.0]))
    # 8 valid rows but one masked out: the last 5 valid rows (30, 50, 60, 70, 80) win.
    ids = [10, 20, 30, 40, 50, 60, 70, 80]
    mask = [True, True, True, False, True, True, True, True]
    mem = _np(write(mem, cfg, *_rows(cfg, ids, np.arange(8.0), mask)))
    order = np.argsort(mem.timestamps)
    assert mem.tokens[order, 0].tolist() == [30, 50, 60, 70, 80]
    assert mem.valid.all()
    assert int(mem.counter) == 7


def test_importance_eviction_hand_case():
    cfg = EVICT["importance"]
    mem = write(init(cfg), cfg, *_rows(cfg, [1, 2, 3, 4, 5], [-5.0, 1.0, 1.0, 4.0, 0.5]))
    # Two new rows evict the two lowest-importance entries: 5 (0.5), then 2 (1.0, tie with 3
    # broken by age); the new rows do not evict each other even though they are less important.
    mem = write(mem, cfg, *_rows(cfg, [6, 7], [0.1, 0.2]))
    assert np.asarray(mem.tokens[:, 0]).tolist() == [1, 7, 3, 4, 6]
    # Now 6 (0.1) is lowest, then 7 (0.2); the |-5| entry survives.
    mem = write(mem, cfg, *_rows(cfg, [8, 9], [3.0, 3.0]))
    assert np.asarray(mem.tokens[:, 0]).tolist() == [1, 9, 3, 4, 8]


def test_decay_per_write_call_that_writes():
    cfg = EVICT["importance_decay"]
    mem = write(init(cfg), cfg, *_rows(cfg, [1], [-2.0]))
    assert float(mem.importance[0]) == 2.0  # new rows enter undecayed as |return|
    before = _np(mem)
    mem = write(mem, cfg, *_rows(cfg, [9], [9.0], [False]))  # nothing written: no decay
    jax.tree.map(np.testing.assert_array_equal, before, _np(mem))
    mem = write(mem, cfg, *_rows(cfg, [2, 3], [1.0, -1.0]))  # one call = one decay
    mem = write(mem, cfg, *_rows(cfg, [4], [1.0]))
    np.testing.assert_array_equal(np.asarray(mem.importance), [0.5, 0.5, 0.5, 1.0, 0.0])
    mem = decay(mem, cfg)
    np.testing.assert_array_equal(np.asarray(mem.importance), [0.25, 0.25, 0.25, 0.5, 0.0])


def _filled_memory(cfg, rng, num_valid=12, with_ties=True):
    keys, tokens, token_mask, returns, _ = _batch(rng, cfg, n=12)
    if with_ties:
        # Exact duplicates (same key, same |return|) give exactly tied scores.
        keys[1] = keys[0]
        returns[0], returns[1] = 3.0, -3.0
        keys[4] = keys[2]
        returns[2] = returns[4] = 2.5
    mask = np.arange(12) < num_valid
    mem = write(init(cfg), cfg, keys, tokens, token_mask, returns, mask)
    ref = RefEpisodic(cfg)
    ref.write(keys, tokens, token_mask, returns, mask)
    return mem, ref, keys


def _check_retrieval(got: episodic.Retrieved, expected, cfg):
    got = _np(got)
    for q, exp in enumerate(expected):
        n = len(exp)
        assert got.valid[q].tolist() == [True] * n + [False] * (cfg.k - n)
        assert got.indices[q, :n].tolist() == [s for s, _ in exp]
        np.testing.assert_allclose(got.scores[q, :n], [v for _, v in exp], atol=1e-5)
        # Invalid positions carry nothing.
        assert not got.token_mask[q, n:].any()
        assert (got.indices[q, n:] == -1).all()
        assert (got.keys[q, n:] == 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_retrieve_matches_bruteforce_topk_with_ties(normalize):
    cfg = RETRIEVE.replace(normalize_importance=normalize)
    rng = np.random.default_rng(1)
    mem, ref, keys = _filled_memory(cfg, rng)  # 4 of 16 slots stay invalid
    queries = np.concatenate([keys[[0, 2]], rng.normal(size=(6, 4))]).astype(np.float32)
    got = retrieve(mem, cfg, queries)
    expected = ref.retrieve(queries)
    # The tie pairs really are tied and both retrieved, lower slot first.
    assert [s for s, _ in expected[0][:2]] == [0, 1]
    assert float(got.scores[0, 0]) == float(got.scores[0, 1])
    assert np.asarray(got.indices[1, :2]).tolist() == [2, 4]
    _check_retrieval(got, expected, cfg)
    g, m = _np(got), _np(mem)
    np.testing.assert_array_equal(g.tokens[g.valid], m.tokens[g.indices[g.valid]])
    np.testing.assert_array_equal(g.returns[g.valid], m.returns[g.indices[g.valid]])


def test_normalised_importance_cannot_swamp_similarity():
    """By default importance is divided by the largest valid one, so its share of a score
    is at most w_imp: an entry with return 1000 and cosine 0 cannot outrank one with cosine
    1 and return 1 (0.3 < 0.7 + 0.3/1000), where raw importance (TextWorld-sized returns)
    would rank it first."""
    assert episodic.EpisodicConfig(capacity=4, key_dim=4, max_tokens=3).normalize_importance
    cfg = RETRIEVE.replace(k=1)
    keys = np.zeros((2, 4), np.float32)
    keys[0, 0], keys[1, 1] = 1.0, 1.0
    tokens = np.ones((2, cfg.max_tokens), np.int32)
    mem = episodic.write(init(cfg), cfg, jnp.asarray(keys), jnp.asarray(tokens),
                         jnp.ones_like(tokens, bool), jnp.asarray([1.0, 1000.0]),
                         jnp.ones(2, bool))  # fmt: skip
    query = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])
    got = retrieve(mem, cfg, query)
    assert int(got.indices[0, 0]) == 0
    score = np.asarray(episodic.scores(mem, cfg, query))[0, :2]
    assert score.max() <= cfg.w_sim + cfg.w_imp + 1e-6 and score[1] <= cfg.w_imp + 1e-6
    raw = cfg.replace(normalize_importance=False)
    assert int(retrieve(mem, raw, query).indices[0, 0]) == 1


def test_retrieve_fewer_valid_than_k_and_empty():
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(8, 4)).astype(np.float32)
    assert not np.asarray(retrieve(init(RETRIEVE), RETRIEVE, queries).valid).any()
    mem, ref, _ = _filled_memory(RETRIEVE, rng, num_valid=2, with_ties=False)
    got = retrieve(mem, RETRIEVE, queries)
    assert np.asarray(got.valid).sum(axis=-1).tolist() == [2] * 8
    _check_retrieval(got, ref.retrieve(queries), RETRIEVE)


def test_score_threshold():
    cfg = RETRIEVE.replace(score_threshold=0.6)
    rng = np.random.default_rng(3)
    mem, ref, _ = _filled_memory(cfg, rng, with_ties=False)
    queries = rng.normal(size=(8, 4)).astype(np.float32)
    got = retrieve(mem, cfg, queries)
    expected = ref.retrieve(queries)
    counts = [len(e) for e in expected]
    assert min(counts) < cfg.k  # the threshold really cuts something...
    assert max(counts) > 0  # ...but not everything
    _check_retrieval(got, expected, cfg)
    assert (np.asarray(got.scores)[np.asarray(got.valid)] >= 0.6).all()


def test_vmap_over_batch_of_memories():
    cfg = EVICT["importance"]
    rng = np.random.default_rng(4)
    g = 3
    batches = [_batch(rng, cfg) for _ in range(g)]
    stacked = [np.stack(x) for x in zip(*batches, strict=True)]
    empty = jax.tree.map(lambda x: np.stack([x] * g), _np(init(cfg)))
    mems = jax.jit(jax.vmap(episodic.write, in_axes=(0, None, 0, 0, 0, 0, 0)))(empty, cfg, *stacked)
    queries = rng.normal(size=(g, 2, 3)).astype(np.float32)
    got = jax.jit(jax.vmap(episodic.retrieve, in_axes=(0, None, 0)))(mems, cfg, queries)
    mems, got = _np(mems), _np(got)
    for i in range(g):
        single = write(init(cfg), cfg, *batches[i])
        jax.tree.map(
            np.testing.assert_array_equal, jax.tree.map(lambda x, i=i: x[i], mems), _np(single)
        )
        one = _np(retrieve(single, cfg, queries[i]))
        np.testing.assert_array_equal(got.indices[i], one.indices)
        np.testing.assert_allclose(got.scores[i], one.scores, rtol=1e-6)


def test_jitted_loop_of_50_steps_traces_once():
    cfg = EVICT["fifo_decay"]
    traces = []

    @jax.jit
    def step(mem, keys, tokens, token_mask, returns, write_mask):
        traces.append(1)
        mem = episodic.write(mem, cfg, keys, tokens, token_mask, returns, write_mask)
        return mem, episodic.retrieve(mem, cfg, keys)

    rng = np.random.default_rng(5)
    mem, ref = init(cfg), RefEpisodic(cfg)
    for _ in range(50):
        batch = _batch(rng, cfg, density=0.3)
        mem, got = step(mem, *batch)
        ref.write(*batch)
    assert len(traces) == 1
    _assert_same(mem, ref)
    assert got.tokens.shape == (N, 2, 4)


def test_config_validation():
    with pytest.raises(ValueError):
        EpisodicConfig(capacity=2, key_dim=2, max_tokens=2, k=3)
    with pytest.raises(ValueError):
        EpisodicConfig(capacity=2, key_dim=2, max_tokens=2, k=1, eviction="lru")
    with pytest.raises(ValueError, match="control_k"):
        EpisodicConfig(capacity=2, key_dim=2, max_tokens=2, k=1, control_k=0)
    with pytest.raises(ValueError, match="control"):
        EpisodicConfig(capacity=2, key_dim=2, max_tokens=2, k=1, control_temperature=0.0)
    assert hash(EpisodicConfig(4, 2, 2)) == hash(EpisodicConfig(4, 2, 2))
    assert jax.tree.leaves(EVICT["fifo"]) == []  # static: safe to pass through jit/vmap


def test_render_memory_lists_valid_entries():
    cfg = EVICT["fifo"]
    vocab = {1: "obs", 2: "left", 3: "won", 4: "right", 5: "lost"}
    keys, tokens, token_mask, returns, mask = _rows(cfg, [1, 1], [1.0, -1.0])
    tokens[:2, :3] = [[1, 2, 3], [1, 4, 5]]
    token_mask[:2, :3] = [[1, 1, 1], [1, 1, 0]]
    keys[1] = [0.0, 1.0, 0.0]
    mem = write(init(cfg), cfg, keys, tokens, token_mask, returns, mask)

    def decode(ids):
        return " ".join(vocab[i] for i in ids)

    lines = render_memory(mem, decode).splitlines()
    assert "2/5 valid" in lines[0]
    assert lines[3].split("|")[-1].strip() == "obs left won"
    assert lines[4].split("|")[-1].strip() == "obs right"
    assert len(lines) == 5
    got = retrieve(mem, cfg, keys[:1])
    assert "obs left won" in render_memory(got, decode)


def test_action_values_kernel_weighted_returns_per_action():
    """Episodic control against a hand computation: nearest ``control_k`` entries by cosine
    vote for their action with weight exp((cos - 1) / tau); one pseudo count at value 0;
    unknown actions (-1), invalid slots and entries beyond control_k do not vote."""
    tau = 0.1
    cfg = EpisodicConfig(capacity=8, key_dim=2, max_tokens=1, k=1, control_k=4,
                         control_temperature=tau)  # fmt: skip
    angle = np.deg2rad([0.0, 0.0, 30.0, 0.0, 90.0, 120.0])  # keys on the unit circle
    keys = np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32)
    actions = np.asarray([0, 1, 1, -1, 0, 2], np.int32)
    returns = np.asarray([1.0, -1.0, 0.5, 7.0, 9.0, 9.0], np.float32)
    n = len(keys)
    mem = write(init(cfg), cfg, keys, np.zeros((n, 1), np.int32), np.ones((n, 1), bool),
                returns, np.ones(n, bool), actions)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(mem.actions)[:n], actions)
    assert (np.asarray(mem.actions)[n:] == -1).all()
    values, weights = jax.jit(episodic.action_values, static_argnums=(1, 3))(
        mem, cfg, np.asarray([[1.0, 0.0]], np.float32), 3
    )
    # The 4 nearest: slots 0, 1, 3 (cos 1) and 2 (cos 0.866); slot 3 has no action.
    w30 = np.exp((np.cos(np.deg2rad(30.0)) - 1.0) / tau)
    want_w = np.asarray([[1.0, 1.0 + w30, 0.0]])
    want_v = np.asarray([[1.0 / 2.0, (-1.0 + 0.5 * w30) / (2.0 + w30), 0.0]])
    np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(values), want_v, rtol=1e-5, atol=1e-7)
    # An empty memory has no opinion.
    values, weights = episodic.action_values(init(cfg), cfg, np.ones((2, 2), np.float32), 3)
    assert not np.asarray(values).any() and not np.asarray(weights).any()


def _write_rows(cfg, mem, keys, returns, first_token):
    """Writes one call's rows (entry i's tokens are ``first_token + i``)."""
    n = len(returns)
    tokens = np.arange(first_token, first_token + n, dtype=np.int32)[:, None].repeat(
        cfg.max_tokens, axis=1
    )
    return episodic.write(mem, cfg, jnp.asarray(keys, jnp.float32), jnp.asarray(tokens),
                          jnp.ones(tokens.shape, bool), jnp.asarray(returns, jnp.float32),
                          jnp.ones(n, bool))  # fmt: skip


def test_centred_keys_separate_what_a_shared_direction_hides():
    """Keys of two situations that share a large common direction (raw cosine 0.995, as
    SmolLM2's hidden states do): raw, another situation's +1 entry outranks this situation's
    own 0 entry (0.7*0.995 + 0.3 > 0.7); centred, the cosine between the two situations is
    -1 and this situation's entry comes first."""
    common = np.array([10.0, 0.0, 0.0, 0.0], np.float32)
    a = common + np.array([0.0, 0.5, 0.0, 0.0], np.float32)
    b = common + np.array([0.0, -0.5, 0.0, 0.0], np.float32)
    cfg = RETRIEVE.replace(k=1, capacity=4)
    mem = _write_rows(cfg, init(cfg), [a, b], [0.0, 1.0], first_token=1)
    raw_cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert raw_cos > 0.99
    assert int(retrieve(mem, cfg, jnp.asarray([a])).tokens[0, 0, 0]) == 2  # b's +1 entry
    centred = cfg.replace(center_keys=True)
    got = retrieve(mem, centred, jnp.asarray([a]))
    assert int(got.tokens[0, 0, 0]) == 1  # a's own entry
    score = np.asarray(episodic.scores(mem, centred, jnp.asarray([a])))[0, :2]
    np.testing.assert_allclose(score, [0.7, -0.7 + 0.3], atol=1e-6)


def test_recency_ranks_a_fresh_outcome_above_a_stale_success():
    """The non-stationary bandit's case: the same situation's stale "+1" entry (written
    first) and fresh "0" entry (written last). Without recency the stale success wins (0.7 +
    0.3 > 0.7); with w_rec = 0.5 the fresh entry scores 0.7 + 0.5, the stale one 0.7 + 0.3 +
    0.5 * 0 and the one between them 0.7 + 0.5 * 0.5 (recency falls linearly from the newest
    entry to the oldest)."""
    key = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    cfg = RETRIEVE.replace(k=3, capacity=4)
    mem = _write_rows(cfg, init(cfg), [key], [1.0], first_token=1)  # stale success
    mem = _write_rows(cfg, mem, [key * 2], [0.0], first_token=2)  # same direction, newer
    mem = _write_rows(cfg, mem, [key * 3], [0.0], first_token=3)  # the newest
    assert np.asarray(retrieve(mem, cfg, jnp.asarray([key])).tokens[0, :, 0]).tolist() == [1, 2, 3]
    recent = cfg.replace(w_rec=0.5)
    got = retrieve(mem, recent, jnp.asarray([key]))
    assert np.asarray(got.tokens[0, :, 0]).tolist() == [3, 1, 2]
    np.testing.assert_allclose(np.asarray(got.scores[0]), [1.2, 1.0, 0.95], atol=1e-6)
    with pytest.raises(ValueError, match="w_rec"):
        cfg.replace(w_rec=-1.0)
