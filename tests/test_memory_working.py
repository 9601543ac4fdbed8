"""Working memory: ring-buffer contents, chronological reads, resets and attention reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rllama_jax.memory import render_memory, working
from rllama_jax.memory.working import WorkingConfig

CFG = WorkingConfig(window=4, max_tokens=3, key_dim=5, pad_id=0)
E = 3

init = jax.jit(working.init, static_argnums=1)
write = jax.jit(working.write)
reset_where = jax.jit(working.reset_where)
read_text = jax.jit(working.read_text)
attention_read = jax.jit(working.attention_read)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _step(rng, density=0.7):
    tokens = rng.integers(1, 100, size=(E, CFG.max_tokens)).astype(np.int32)
    lengths = rng.integers(1, CFG.max_tokens + 1, size=E)
    token_mask = np.arange(CFG.max_tokens)[None] < lengths[:, None]
    keys = rng.normal(size=(E, CFG.key_dim)).astype(np.float32)
    importance = rng.random(E).astype(np.float32) + 0.5
    write_mask = rng.random(E) < density
    return tokens, token_mask, keys, importance, write_mask


class RefWorking:
    """Per-env Python lists of the steps of the current episode."""

    def __init__(self):
        self.steps = [[] for _ in range(E)]

    def write(self, tokens, token_mask, keys, importance, write_mask):
        for e in range(E):
            if write_mask[e]:
                text = np.where(token_mask[e], tokens[e], CFG.pad_id)
                self.steps[e].append((text, token_mask[e].copy(), keys[e], importance[e]))

    def reset(self, done):
        for e in range(E):
            if done[e]:
                self.steps[e] = []

    def last(self, e):
        return self.steps[e][-CFG.window :]


def _check_read(wm, ref):
    tokens, mask = _np(read_text(wm))
    assert tokens.shape == (E, CFG.window, CFG.max_tokens)
    for e in range(E):
        last = ref.last(e)
        n = len(last)
        empty = CFG.window - n
        # Oldest first, valid steps right-aligned, empty slots masked and padded.
        assert not mask[e, :empty].any()
        assert (tokens[e, :empty] == CFG.pad_id).all()
        for i, (text, tmask, _, _) in enumerate(last):
            np.testing.assert_array_equal(tokens[e, empty + i], text)
            np.testing.assert_array_equal(mask[e, empty + i], tmask)
        assert int(np.asarray(wm.valid[e]).sum()) == n


def test_ring_buffer_keeps_last_w_steps_in_order_and_clears_on_done():
    rng = np.random.default_rng(0)
    wm, ref = init(CFG, E), RefWorking()
    saw_wrap = saw_reset = False
    for t in range(40):
        step = _step(rng)
        wm = write(wm, *step)
        ref.write(*step)
        if t % 7 == 6:
            done = rng.random(E) < 0.5
            saw_reset |= bool(done.any())
            wm = reset_where(wm, done)
            ref.reset(done)
        saw_wrap |= any(len(s) > CFG.window + 1 for s in ref.steps)
        _check_read(wm, ref)
    assert saw_wrap and saw_reset
    np.testing.assert_array_equal(np.asarray(wm.count), [len(s) for s in ref.steps])


def test_reset_where_clears_only_done_envs():
    rng = np.random.default_rng(1)
    wm = init(CFG, E)
    for _ in range(3):
        wm = write(wm, *_step(rng, density=1.0))
    before = _np(wm)
    wm = _np(reset_where(wm, np.array([False, True, False])))
    assert not wm.valid[1].any() and not wm.token_mask[1].any()
    assert (wm.tokens[1] == CFG.pad_id).all() and (wm.keys[1] == 0).all()
    assert wm.pointer[1] == 0 and wm.count[1] == 0
    for e in (0, 2):
        jax.tree.map(lambda a, b, e=e: np.testing.assert_array_equal(a[e], b[e]), wm, before)


def _attention_reference(wm, query, temperature):
    wm = _np(wm)
    summary = np.zeros((E, CFG.key_dim))
    weights = np.zeros((E, CFG.window))
    for e in range(E):
        idx = np.flatnonzero(wm.valid[e])
        if idx.size == 0:
            continue
        imp = wm.importance[e, idx]
        weight = 1.0 + (imp / imp.max() if imp.max() > 0 else imp)
        logits = (wm.keys[e, idx].astype(np.float64) @ query[e]) * weight
        logits = logits / temperature
        p = np.exp(logits - logits.max())
        p /= p.sum()
        weights[e, idx] = p
        summary[e] = p @ wm.keys[e, idx]
    return summary, weights


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_attention_read_matches_numpy_formula(temperature):
    rng = np.random.default_rng(2)
    wm = init(CFG, E)
    for _ in range(6):
        wm = write(wm, *_step(rng))
    wm = reset_where(wm, np.array([False, False, True]))  # env 2 has no valid step
    wm = write(wm, *_step(rng, density=0.0))
    query = rng.normal(size=(E, CFG.key_dim)).astype(np.float32)
    summary, weights = attention_read(wm, query, temperature)
    ref_summary, ref_weights = _attention_reference(wm, query, temperature)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(summary), ref_summary, rtol=1e-5, atol=1e-6)
    assert np.asarray(wm.valid[:2]).any(axis=-1).all()
    assert (np.asarray(summary[2]) == 0).all() and (np.asarray(weights[2]) == 0).all()
    np.testing.assert_allclose(np.asarray(weights[:2]).sum(-1), 1.0, rtol=1e-6)


def test_attention_read_with_zero_rewards_prefers_the_most_similar_step():
    """Rewards are 0 on most steps: the read must still follow similarity (a plain
    importance factor made every logit 0 and the read a uniform average), and a large
    reward on a dissimilar step cannot outweigh a much more similar one (its weight is
    bounded by 2, whatever the reward's scale)."""
    d = CFG.key_dim
    keys = np.zeros((E, CFG.window, d), np.float32)
    keys[:, 0, 0], keys[:, 1, 1], keys[:, 2, 2] = 3.0, 1.0, -1.0
    wm = init(CFG, E).replace(
        keys=jnp.asarray(keys), valid=jnp.zeros((E, CFG.window), bool).at[:, :3].set(True)
    )
    query = np.zeros((E, d), np.float32)
    query[:, 0] = 1.0  # most similar to step 0
    _, weights = attention_read(wm.replace(importance=jnp.zeros((E, CFG.window))), query, 1.0)
    w = np.asarray(weights)
    assert (w[:, 0] > 0.9).all() and (w[:, 3:] == 0).all()
    # Step 1 (similarity 0) gets a reward of 1000, step 0 none: step 0 still wins.
    imp = np.zeros((E, CFG.window), np.float32)
    imp[:, 1] = 1000.0
    _, weights = attention_read(wm.replace(importance=jnp.asarray(imp)), query, 1.0)
    assert (np.asarray(weights)[:, 0] > 0.9).all()


def test_attention_read_empty_memory_has_finite_gradients():
    wm = init(CFG, E)
    query = np.ones((E, CFG.key_dim), np.float32)

    def loss(q, keys):
        summary, weights = working.attention_read(wm.replace(keys=keys), q, 1.0)
        return summary.sum() + weights.sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(query, wm.keys)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    summary, weights = attention_read(wm, query, 1.0)
    assert not np.asarray(summary).any() and not np.asarray(weights).any()


def test_jitted_loop_of_50_steps_traces_once_and_vmaps():
    traces = []

    @jax.jit
    def step(wm, tokens, token_mask, keys, importance, write_mask, done):
        traces.append(1)
        wm = working.write(wm, tokens, token_mask, keys, importance, write_mask)
        summary, _ = working.attention_read(wm, keys, CFG.temperature)
        text, _ = working.read_text(wm)
        return working.reset_where(wm, done), summary, text

    rng = np.random.default_rng(3)
    wm, ref = init(CFG, E), RefWorking()
    for _ in range(50):
        s = _step(rng)
        done = rng.random(E) < 0.1
        wm, summary, text = step(wm, *s, done)
        ref.write(*s)
        ref.reset(done)
    assert len(traces) == 1
    _check_read(wm, ref)

    # vmap over a batch of G working memories equals running each one alone.
    g = 2
    steps = [_step(rng) for _ in range(g)]
    stacked = [np.stack(x) for x in zip(*steps, strict=True)]
    wms = jax.tree.map(lambda x: np.stack([x] * g), _np(wm))
    out = jax.jit(jax.vmap(working.write))(wms, *stacked)
    for i in range(g):
        single = _np(write(wm, *steps[i]))
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), _np(out), single)


def test_config_validation_and_render():
    with pytest.raises(ValueError):
        WorkingConfig(window=0, max_tokens=2, key_dim=2)
    rng = np.random.default_rng(4)
    wm = init(CFG, E)
    steps = [_step(rng, density=1.0) for _ in range(CFG.window + 1)]
    for s in steps:
        wm = write(wm, *s)
    text = render_memory(wm, lambda ids: " ".join(f"w{i}" for i in ids))
    env0 = [ln for ln in text.splitlines()[2:] if ln.split("|")[0].strip() == "0"]
    assert len(env0) == CFG.window  # oldest step dropped
    for line, s in zip(env0, steps[1:], strict=True):
        tokens, token_mask = s[0][0], s[1][0]
        assert line.split("|")[-1].strip() == " ".join(f"w{i}" for i in tokens[token_mask])
