"""Tests for rllama_jax.losses.common: masked aggregation, returns, GAE, entropy, KL.

Parity tests compare values AND gradients with rlax on random float32 inputs. Tolerance
1e-6 (abs and rel): both sides run the same float32 arithmetic in a possibly different
order (sum order, fused multiply-adds), which moves results by a few ulps of O(1..10)
quantities, i.e. ~1e-7..1e-6; any modelling difference (off-by-one in time, a missing
discount) shows up at O(0.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rllama_jax.losses import common

TOL = 1e-6


def assert_close(actual, expected, tol: float = TOL) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def outputs_and_grads(fn, args, weights):
    """`fn(*args)` and the gradient of `sum(fn(*args) * weights)` w.r.t. every arg.

    One jitted call (one compilation instead of one per eager op keeps the file fast).
    """

    def scalar(*a):
        out = fn(*a)
        return jnp.sum(out * weights), out

    grad_fn = jax.grad(scalar, argnums=tuple(range(len(args))), has_aux=True)
    grads, out = jax.jit(grad_fn)(*args)
    return out, grads


def assert_parity(ours, theirs, args, weights, tol: float = TOL) -> None:
    """Values and input-gradients of two implementations agree."""
    out_ours, g_ours = outputs_and_grads(ours, args, weights)
    out_ref, g_ref = outputs_and_grads(theirs, args, weights)
    assert_close(out_ours, out_ref, tol)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert_close(a, b, tol)


def random_rollout(seed: int, batch: int = 4, time: int = 7):
    """Random rewards, discounts (with some terminations), values, bootstrap values."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, time)).astype(np.float32)
    terminated = rng.random((batch, time)) < 0.2
    discounts = (0.97 * (1.0 - terminated)).astype(np.float32)
    values = rng.normal(size=(batch, time)).astype(np.float32)
    bootstrap = rng.normal(size=(batch,)).astype(np.float32)
    return jnp.asarray(rewards), jnp.asarray(discounts), jnp.asarray(values), jnp.asarray(bootstrap)


# ---------------------------------------------------------------------------------------
# Masked aggregation
# ---------------------------------------------------------------------------------------


def _numpy_aggregate(x: np.ndarray, mask: np.ndarray, mode: str) -> float:
    """Loop reference: only rows with at least one valid token count."""
    if mode == "token_mean":
        return float((x * mask).sum() / mask.sum())
    per_row = []
    for b in range(x.shape[0]):
        if mask[b].sum() == 0:
            continue
        row_sum = sum(x[b, t] * mask[b, t] for t in range(x.shape[1]))
        per_row.append(row_sum / mask[b].sum() if mode == "sequence_mean" else row_sum)
    return float(np.mean(per_row))


@pytest.mark.parametrize("mode", common.AGGREGATIONS)
def test_masked_aggregation_matches_loop_reference(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    mask = (rng.random((5, 6)) < 0.6).astype(np.float32)
    mask[2] = 0.0  # fully masked row
    mask[0, 0] = 1.0
    got = common.masked_mean(jnp.asarray(x), jnp.asarray(mask), mode)
    assert_close(got, _numpy_aggregate(x, mask, mode))


def test_aggregation_modes_differ():
    """Guard against the three modes silently collapsing to one (unequal row lengths)."""
    x = jnp.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]], jnp.float32)
    got = [float(common.masked_mean(x, mask, m)) for m in common.AGGREGATIONS]
    assert got == pytest.approx([8.0 / 5.0, 2.5, 4.0])


@pytest.mark.parametrize("mode", common.AGGREGATIONS)
def test_fully_masked_row_does_not_count_or_nan(mode):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.ones((3, 5), np.float32)
    mask[1] = 0.0
    x_bad = x.copy()
    x_bad[1] = np.inf  # garbage in a masked row must not leak
    total, denom = common.masked_sum_and_denominator(jnp.asarray(x_bad), jnp.asarray(mask), mode)
    expected_denom = 10.0 if mode == "token_mean" else 2.0
    assert float(denom) == expected_denom
    full = common.masked_mean(jnp.asarray(x_bad), jnp.asarray(mask), mode)
    without_row = common.masked_mean(jnp.asarray(x[[0, 2]]), jnp.asarray(mask[[0, 2]]), mode)
    assert np.isfinite(float(full))
    assert_close(full, without_row)
    grad = jax.jit(jax.grad(lambda v: common.masked_mean(v, jnp.asarray(mask), mode)))(
        jnp.asarray(x_bad)
    )
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[1] == 0.0)


@pytest.mark.parametrize("mode", common.AGGREGATIONS)
def test_all_masked_is_zero_not_nan(mode):
    x = jnp.ones((2, 3))
    mask = jnp.zeros((2, 3))
    value, grad = jax.value_and_grad(lambda v: common.masked_mean(v, mask, mode))(x)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("mode", common.AGGREGATIONS)
def test_sum_and_denominator_accumulate_exactly(mode):
    """Splitting the batch (micro-batches / devices) and summing parts gives the full mean."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32))
    mask = jnp.asarray((rng.random((6, 5)) < 0.5).astype(np.float32))
    parts = [
        common.masked_sum_and_denominator(x[i : i + 2], mask[i : i + 2], mode) for i in (0, 2, 4)
    ]
    total = sum(p[0] for p in parts)
    denom = sum(p[1] for p in parts)
    assert_close(total / denom, common.masked_mean(x, mask, mode))


def test_masked_mean_accepts_per_turn_vectors():
    x = jnp.array([1.0, 2.0, 30.0])
    mask = jnp.array([1.0, 1.0, 0.0])
    for mode in common.AGGREGATIONS:
        assert float(common.masked_mean(x, mask, mode)) == pytest.approx(1.5)


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError):
        common.masked_mean(jnp.ones((2, 2)), jnp.ones((2, 2)), "mean_of_means")  # type: ignore[arg-type]


def test_normalize():
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 5.0, size=(4, 6)).astype(np.float32)
    mask = (rng.random((4, 6)) < 0.7).astype(np.float32)
    out = np.asarray(common.normalize(jnp.asarray(x), jnp.asarray(mask)))
    valid = mask > 0
    assert abs(out[valid].mean()) < 1e-5
    assert out[valid].std() == pytest.approx(1.0, abs=1e-4)
    assert np.all(out[~valid] == 0.0)
    expected = (x[valid] - x[valid].mean()) / (x[valid].std() + 1e-8)
    assert_close(out[valid], expected, 1e-5)


def test_broadcast_to_tokens():
    adv = jnp.array([1.0, -2.0])
    out = common.broadcast_to_tokens(adv, jnp.zeros((2, 3)))
    assert out.shape == (2, 3)
    assert np.all(np.asarray(out[1]) == -2.0)
    with pytest.raises(AssertionError):
        common.broadcast_to_tokens(jnp.ones((3,)), jnp.zeros((2, 3)))


# ---------------------------------------------------------------------------------------
# Returns and GAE vs rlax (rlax works on one trajectory [T]; we vmap over B)
# ---------------------------------------------------------------------------------------


def _rlax_gae(rewards, discounts, values, bootstrap, lam):
    # rlax: r_t, discount_t at times [1, T] (= our rewards/discounts at turn t-1),
    # values at times [0, T] (= our values with the bootstrap value appended).
    values_0_to_t = jnp.concatenate([values, bootstrap[:, None]], axis=1)
    return jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=(0, 0, None, 0))(
        rewards, discounts, lam, values_0_to_t
    )


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_rlax_values_and_grads(lam):
    rewards, discounts, values, bootstrap = random_rollout(4)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=rewards.shape).astype(np.float32))
    args = (rewards, discounts, values, bootstrap)
    assert_parity(
        lambda r, d, v, b: common.gae(r, d, v, b, lam)[0],
        lambda r, d, v, b: _rlax_gae(r, d, v, b, lam),
        args,
        weights,
    )
    # Returns = advantages + V(s_t) = rlax's TD(lambda) returns bootstrapped on V(s_{t+1}).
    next_values = jnp.concatenate([values[:, 1:], bootstrap[:, None]], axis=1)
    lambda_ret = jax.vmap(rlax.lambda_returns, in_axes=(0, 0, 0, None))(
        rewards, discounts, next_values, lam
    )
    assert_close(jax.jit(common.gae)(*args, lam)[1], lambda_ret)


def test_discounted_returns_matches_rlax_values_and_grads():
    rewards, discounts, _, bootstrap = random_rollout(6)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=rewards.shape).astype(np.float32))
    assert_parity(
        common.discounted_returns,
        jax.vmap(rlax.discounted_returns),
        (rewards, discounts, bootstrap),
        weights,
    )


@pytest.mark.parametrize("n", [1, 3, 9])
def test_n_step_returns_matches_rlax_values_and_grads(n):
    rewards, discounts, values, bootstrap = random_rollout(8, time=7)
    weights = jnp.asarray(np.random.default_rng(9).normal(size=rewards.shape).astype(np.float32))

    def theirs(r, d, v, b):
        # rlax bootstraps from v at times [1, T], i.e. V(s_{t+1}), padding with v[-1].
        next_values = jnp.concatenate([v[:, 1:], b[:, None]], axis=1)
        return jax.vmap(rlax.n_step_bootstrapped_returns, in_axes=(0, 0, 0, None))(
            r, d, next_values, n
        )

    assert_parity(
        lambda r, d, v, b: common.n_step_returns(r, d, v, b, n),
        theirs,
        (rewards, discounts, values, bootstrap),
        weights,
    )


def test_n_step_with_long_horizon_equals_discounted_returns():
    rewards, discounts, values, bootstrap = random_rollout(10)
    assert_close(
        common.n_step_returns(rewards, discounts, values, bootstrap, n=rewards.shape[1]),
        common.discounted_returns(rewards, discounts, bootstrap),
    )


def test_truncation_in_the_middle_of_a_row_is_folded_exactly():
    """Episode 1 truncated at t=2 (auto-reset), episode 2 runs t=3..5 to the rollout end."""
    gamma, lam = 0.9, 0.8
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    v = np.array([0.5, -0.5, 1.5, 2.0, -1.0, 0.25], np.float32)
    final_value, bootstrap = np.float32(10.0), np.float32(-3.0)
    truncated = np.array([0, 0, 1, 0, 0, 0], np.float32)
    discounts = common.discounts_from_dones(jnp.zeros((1, 6)), gamma)
    final_values = jnp.asarray(np.where(truncated > 0, final_value, 0.0)[None], jnp.float32)
    r_f, d_f = common.fold_truncation_bootstrap(
        jnp.asarray(r[None]), discounts, jnp.asarray(truncated[None]), final_values
    )

    # Loop reference, episode by episode.
    expected_ret = np.zeros(6, np.float32)
    expected_adv = np.zeros(6, np.float32)
    for start, end, v_end in ((0, 3, final_value), (3, 6, bootstrap)):
        g, a = v_end, 0.0
        for t in reversed(range(start, end)):
            v_next = v[t + 1] if t + 1 < end else v_end
            delta = r[t] + gamma * v_next - v[t]
            a = delta + gamma * lam * a
            g = r[t] + gamma * g
            expected_ret[t], expected_adv[t] = g, a
    ret = common.discounted_returns(r_f, d_f, jnp.asarray([bootstrap]))
    adv, _ = common.gae(r_f, d_f, jnp.asarray(v[None]), jnp.asarray([bootstrap]), lam)
    assert_close(ret[0], expected_ret, 1e-5)
    assert_close(adv[0], expected_adv, 1e-5)
    # Without folding the episodes would bleed into each other.
    unfolded = common.discounted_returns(jnp.asarray(r[None]), discounts, jnp.asarray([bootstrap]))
    assert not np.allclose(np.asarray(unfolded[0]), expected_ret, atol=1e-3)


def test_termination_stops_bootstrap():
    rewards = jnp.array([[1.0, 1.0, 1.0]])
    discounts = jnp.array([[0.5, 0.0, 0.5]])
    ret = common.discounted_returns(rewards, discounts, jnp.array([100.0]))
    assert_close(ret, [[1.5, 1.0, 51.0]])


# ---------------------------------------------------------------------------------------
# Entropy and KL estimators
# ---------------------------------------------------------------------------------------


def test_entropy_matches_rlax_values_and_grads():
    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.normal(size=(3, 4, 6)).astype(np.float32) * 2.0)
    mask = jnp.ones((3, 4))
    weights = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
    # Per-position entropy vs rlax's softmax distribution.
    assert_parity(
        common.categorical_entropy,
        lambda lg: rlax.softmax().entropy(lg),
        (logits,),
        weights,
    )

    # Entropy loss (negated mean entropy) vs rlax.entropy_loss.
    def ours(lg):
        return -common.masked_mean(common.categorical_entropy(lg), mask)

    def theirs(lg):
        flat = lg.reshape(-1, lg.shape[-1])
        return rlax.entropy_loss(flat, jnp.ones(flat.shape[0]))

    assert_parity(ours, theirs, (logits,), 1.0)


def test_masked_entropy_is_entropy_of_valid_subset():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    mask = rng.random((5, 7)) < 0.5
    mask[:, 0] = True
    got = common.categorical_entropy(jnp.asarray(logits), jnp.asarray(mask))
    for b in range(5):
        sub = logits[b, mask[b]].astype(np.float64)
        p = np.exp(sub - sub.max())
        p /= p.sum()
        assert float(got[b]) == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-5)
    grad = jax.jit(jax.grad(lambda lg: common.categorical_entropy(lg, jnp.asarray(mask)).sum()))(
        jnp.asarray(logits)
    )
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~mask] == 0.0)
    probs = common.masked_softmax(jnp.asarray(logits), jnp.asarray(mask))
    assert np.all(np.asarray(probs)[~mask] == 0.0)
    assert_close(np.asarray(probs).sum(-1), np.ones(5), 1e-6)


def test_kl_estimators_formulas_and_k3_nonnegative():
    rng = np.random.default_rng(13)
    logp = rng.normal(-2.0, 1.0, size=(4, 9)).astype(np.float32)
    ref = rng.normal(-2.0, 1.0, size=(4, 9)).astype(np.float32)
    lr = ref.astype(np.float64) - logp
    k1 = common.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), "k1")
    k2 = common.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), "k2")
    k3 = common.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), "k3")
    assert_close(k1, logp - ref, 1e-5)
    assert_close(k2, 0.5 * lr**2, 1e-5)
    assert_close(k3, np.exp(lr) - 1.0 - lr, 1e-5)
    assert np.all(np.asarray(k3) >= 0.0)
    assert np.all(np.asarray(common.kl_estimate(jnp.asarray(logp), jnp.asarray(logp), "k3")) == 0.0)


def test_kl_estimators_k1_k3_unbiased_monte_carlo():
    """Sample tokens from p; the sample means of k1 and k3 estimate KL(p || q).

    Tolerance: 4 standard errors of each estimator's sample mean (computed from the
    samples), with a fixed key, so the test is deterministic yet would catch a bias
    larger than ~4 SE (~0.003 here); true KL is ~0.27. k2 is biased and not checked.
    """
    p_logits = jnp.array([1.0, 0.5, -0.5, 0.0, -1.5])
    q_logits = jnp.array([0.0, 1.0, 0.2, -1.0, -0.5])
    log_p, log_q = jax.nn.log_softmax(p_logits), jax.nn.log_softmax(q_logits)
    true_kl = float(jnp.sum(jnp.exp(log_p) * (log_p - log_q)))
    n = 200_000
    samples = jax.random.categorical(jax.random.key(0), p_logits, shape=(n,))
    logp, ref = log_p[samples], log_q[samples]
    for est in ("k1", "k3"):
        k = np.asarray(common.kl_estimate(logp, ref, est), np.float64)
        se = k.std() / np.sqrt(n)
        assert abs(k.mean() - true_kl) < 4 * se, (est, k.mean(), true_kl, se)


def test_common_functions_jit():
    rewards, discounts, values, bootstrap = random_rollout(14)
    out = jax.jit(
        lambda r, d, v, b: (
            common.gae(r, d, v, b, 0.9),
            common.n_step_returns(r, d, v, b, 2),
            common.discounted_returns(r, d, b),
        )
    )(rewards, discounts, values, bootstrap)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
