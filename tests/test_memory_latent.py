"""Latent memory adapter: shapes, scale, masking of invalid entries, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import rllama_jax.memory as memory
from rllama_jax.memory import latent
from rllama_jax.memory.episodic import EpisodicConfig
from rllama_jax.memory.latent import LatentConfig
from rllama_jax.memory.working import WorkingConfig

CFG = LatentConfig(key_dim=6, hidden_size=10, num_slots=3, adapter_dim=8)
B, K = 4, 5
SCALE = 0.7

apply = jax.jit(latent.apply_adapter)
init_adapter = jax.jit(latent.init_adapter)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(B, K, CFG.key_dim)).astype(np.float32)
    valid = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    summary = rng.normal(size=(B, CFG.key_dim)).astype(np.float32)
    wm_valid = np.array([True, True, False, False])
    return keys, valid, summary, wm_valid


def test_shapes_mask_and_scale():
    params = init_adapter(jax.random.key(0), CFG)
    keys, valid, summary, wm_valid = _inputs()
    soft, mask = apply(params, keys, valid, summary, SCALE, wm_valid)
    assert soft.shape == (B, CFG.num_slots, CFG.hidden_size) and soft.dtype == jnp.float32
    # A row has memory when it has a valid entry or a valid working summary.
    assert np.asarray(mask).tolist() == [[True] * 3, [True] * 3, [True] * 3, [False] * 3]
    soft = np.asarray(soft)
    rms = np.sqrt((soft[:3] ** 2).mean(-1))
    np.testing.assert_allclose(rms, SCALE, rtol=1e-3)
    assert (soft[3] == 0).all()
    # Slots differ (learned per-slot queries/embeddings), rows differ (different memories).
    assert not np.allclose(soft[0, 0], soft[0, 1]) and not np.allclose(soft[0], soft[2])


def test_invalid_entries_do_not_affect_output():
    params = init_adapter(jax.random.key(1), CFG)
    keys, valid, summary, wm_valid = _inputs()
    soft, mask = apply(params, keys, valid, summary, SCALE, wm_valid)
    garbage = np.where(valid[..., None], keys, np.float32(1e30))
    garbage[1, 2] = np.nan
    summary2 = np.where(wm_valid[:, None], summary, np.float32(7.0))
    soft2, mask2 = apply(params, garbage, valid, summary2, SCALE, wm_valid)
    np.testing.assert_array_equal(np.asarray(soft), np.asarray(soft2))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(mask2))
    # ...while changing a valid entry does change the output of its row.
    changed = keys.copy()
    changed[0, 0] += 1.0
    soft3, _ = apply(params, changed, valid, summary, SCALE, wm_valid)
    assert not np.allclose(np.asarray(soft3[0]), np.asarray(soft[0]))
    np.testing.assert_array_equal(np.asarray(soft3[1:]), np.asarray(soft[1:]))


def test_output_carries_each_entrys_return_and_action():
    """The soft prompt tells what happened: changing only a retrieved entry's return, or
    only the action it took, changes its row's output (and no other row); the return and
    action of an invalid entry change nothing."""
    params = init_adapter(jax.random.key(5), CFG)
    keys, valid, summary, wm_valid = _inputs()
    returns = np.zeros((B, K), np.float32)
    returns[0, 0] = 1.0
    actions = np.zeros((B, K), np.int32)

    def soft(r, a):
        return np.asarray(apply(params, keys, valid, summary, SCALE, wm_valid, r, a)[0])

    base = soft(returns, actions)
    for r, a in ((returns * -1.0, actions), (returns, np.where(np.eye(B, K) > 0, 1, actions))):
        out = soft(r, a)
        assert not np.allclose(out[0], base[0])  # entry (0, 0) is valid
        np.testing.assert_array_equal(out[1:], base[1:])  # rows 1-3 hold no such change
    # Row 0's entry 2 is invalid: its return and action are ignored.
    r, a = returns.copy(), actions.copy()
    r[0, 2], a[0, 2] = 100.0, 1
    np.testing.assert_array_equal(soft(r, a), base)
    # An action past num_actions counts as unknown (-1), never indexes out of the table.
    a = actions.copy()
    a[0, 0] = -1
    unknown = soft(returns, a)
    a[0, 0] = 10_000
    np.testing.assert_array_equal(soft(returns, a), unknown)


def test_gradients_nonzero_and_finite():
    params = init_adapter(jax.random.key(2), CFG)
    keys, valid, summary, wm_valid = _inputs()
    target = np.random.default_rng(3).normal(size=(B, CFG.num_slots, CFG.hidden_size))

    returns = np.random.default_rng(4).normal(size=(B, K)).astype(np.float32)
    actions = np.tile(np.arange(K, dtype=np.int32) % 3 - 1, (B, 1))  # -1 (unknown), 0, 1

    def loss(p):
        soft, mask = latent.apply_adapter(
            p, keys, valid, summary, SCALE, wm_valid, returns, actions
        )
        return jnp.sum(jnp.where(mask[..., None], (soft - target) ** 2, 0.0))

    grads = jax.jit(jax.grad(loss))(params)
    assert set(grads) == set(params)
    for name, g in grads.items():
        g = np.asarray(g)
        assert g.shape == params[name].shape
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 0, name


def test_soft_prompt_through_memory_config():
    ep = EpisodicConfig(capacity=4, key_dim=6, max_tokens=3, k=2)
    wk = WorkingConfig(window=3, max_tokens=3, key_dim=6)
    cfg = memory.MemoryConfig(
        mode="both", representation="latent", episodic=ep, working=wk, latent=CFG
    )
    params = init_adapter(jax.random.key(4), CFG)
    rng = np.random.default_rng(5)
    e = 2
    keys = rng.normal(size=(e, 6)).astype(np.float32)

    @jax.jit
    def run(params, keys):
        state = memory.init_memory(cfg, e)
        tokens, tmask = jnp.ones((e, 3), jnp.int32), jnp.ones((e, 3), bool)
        state = memory.record_experience(
            state, cfg, keys, tokens, tmask, jnp.array([1.0, -2.0]), jnp.array([True, False])
        )
        state = memory.record_step(
            state, cfg, tokens, tmask, keys, jnp.ones(e), jnp.array([True, False])
        )
        out = memory.soft_prompt(state, cfg, params, keys, SCALE)
        # Latent mode leaves the prompt itself untouched.
        same = memory.augment_prompt(state, cfg, tokens, tmask, jnp.zeros(e, int), keys)
        return out, same

    (soft, mask), (same_tokens, _) = run(params, keys)
    assert soft.shape == (e, CFG.num_slots, CFG.hidden_size)
    assert np.asarray(mask).all()  # both rows retrieve the one stored experience
    assert same_tokens.shape == (e, 3)
    np.testing.assert_allclose(np.sqrt((np.asarray(soft) ** 2).mean(-1)), SCALE, rtol=1e-3)
