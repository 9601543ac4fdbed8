"""Tests for the per-algorithm losses: PPO, A2C, REINFORCE, GRPO, DQN, SAC.

rlax is the reference for PPO's clipped surrogate, the policy-gradient and entropy terms,
Q-learning / double Q-learning TD errors and the Huber loss (values AND gradients w.r.t.
the inputs); GRPO and SAC are checked against loop-based numpy references written here.

Tolerance 1e-6 (abs and rel) for rlax parity: both sides do the same float32 arithmetic
in a possibly different order, which moves O(1) results by a few ulps (~1e-7); a real
modelling difference (wrong sign, wrong normaliser, missing stop-gradient) is O(0.01+).
The numpy references run in float64, so they get 1e-5 (float32 rounding of a few dozen
accumulated terms of size O(1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rllama_jax import losses
from rllama_jax.losses import a2c, dqn, grpo, ppo, reinforce, sac

TOL = 1e-6
NP_TOL = 1e-5


def assert_close(actual, expected, tol: float = TOL) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def outputs_and_grads(fn, args, weights=1.0):
    """`fn(*args)` and the gradient of `sum(fn(*args) * weights)` w.r.t. every arg (jitted)."""

    def scalar(*a):
        out = fn(*a)
        return jnp.sum(out * weights), out

    grads, out = jax.jit(jax.grad(scalar, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


def assert_parity(ours, theirs, args, weights=1.0, tol: float = TOL) -> None:
    """Values and input-gradients of two implementations agree."""
    out_ours, g_ours = outputs_and_grads(ours, args, weights)
    out_ref, g_ref = outputs_and_grads(theirs, args, weights)
    assert_close(out_ours, out_ref, tol)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert_close(a, b, tol)


def f32(x) -> jnp.ndarray:
    return jnp.asarray(np.asarray(x, np.float32))


def random_mask(rng, shape, p_valid=0.7) -> np.ndarray:
    mask = (rng.random(shape) < p_valid).astype(np.float32)
    mask[:, 0] = 1.0
    return mask


def random_action_mask(rng, batch, num_actions, p_valid=0.6) -> np.ndarray:
    mask = rng.random((batch, num_actions)) < p_valid
    mask[np.arange(batch), rng.integers(0, num_actions, batch)] = True
    return mask


# ---------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------


def ppo_inputs(seed: int, batch: int = 4, time: int = 6):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.5, (batch, time))
    old_logp = logp + rng.normal(0.0, 0.3, (batch, time))  # ratios on both sides of the clip
    adv = rng.normal(size=(batch, time))
    return f32(logp), f32(old_logp), f32(adv), rng


@pytest.mark.parametrize("masked", [False, True])
def test_ppo_clipped_surrogate_matches_rlax(masked):
    logp, old_logp, adv, rng = ppo_inputs(0)
    mask = random_mask(rng, logp.shape) if masked else np.ones(logp.shape, np.float32)
    valid = np.flatnonzero(mask.ravel())  # static indices: rlax has no mask, feed it valid tokens
    eps = 0.2

    def ours(lp, a):
        return ppo.clipped_surrogate_loss(lp, old_logp, a, f32(mask), eps)[0]

    def theirs(lp, a):
        ratio = jnp.exp(lp - old_logp).ravel()[valid]
        return rlax.clipped_surrogate_pg_loss(ratio, a.ravel()[valid], eps)

    assert_parity(ours, theirs, (logp, adv))
    _, metrics = ppo.clipped_surrogate_loss(logp, old_logp, adv, f32(mask), eps)
    ratio = np.exp(np.asarray(logp, np.float64) - np.asarray(old_logp))
    clipped = (np.abs(ratio - 1.0) > eps)[mask > 0]
    assert 0.1 < clipped.mean() < 0.9  # the test exercises both branches of the clip
    assert float(metrics["clip_fraction"]) == pytest.approx(clipped.mean(), abs=1e-6)
    log_r = np.log(ratio)[mask > 0]
    assert float(metrics["approx_kl"]) == pytest.approx(np.mean(np.expm1(log_r) - log_r), abs=1e-5)


def test_clipped_value_loss_matches_loop_reference():
    rng = np.random.default_rng(1)
    values, returns, old_values = (rng.normal(size=(5, 3)) for _ in range(3))
    mask = random_mask(rng, (5, 3))
    e = 0.2
    got, grads = jax.value_and_grad(ppo.clipped_value_loss)(
        f32(values), f32(returns), f32(old_values), f32(mask), e
    )
    total, expected_grad = 0.0, np.zeros((5, 3))
    for i in range(5):
        for t in range(3):
            if not mask[i, t]:
                continue
            v, r, vo = values[i, t], returns[i, t], old_values[i, t]
            vc = vo + min(max(v - vo, -e), e)
            unclipped, clipped = (v - r) ** 2, (vc - r) ** 2
            total += 0.5 * max(unclipped, clipped)
            # d/dv: the unclipped branch, or the clipped one only while v - vo is inside.
            if unclipped >= clipped:
                expected_grad[i, t] = v - r
            elif abs(v - vo) < e:
                expected_grad[i, t] = vc - r
    n = mask.sum()
    assert float(got) == pytest.approx(total / n, abs=NP_TOL)
    assert_close(grads, expected_grad / n, NP_TOL)
    plain = ppo.clipped_value_loss(f32(values), f32(returns), mask=f32(mask))
    assert float(plain) == pytest.approx(
        0.5 * ((values - returns) ** 2 * mask).sum() / n, abs=NP_TOL
    )
    assert float(plain) != pytest.approx(float(got), abs=1e-3)


def test_ppo_loss_combines_terms():
    logp, old_logp, adv, rng = ppo_inputs(2)
    mask = f32(random_mask(rng, logp.shape))
    values, returns, old_values = (f32(rng.normal(size=(4,))) for _ in range(3))
    entropy = f32(rng.random(logp.shape))
    ref_logp = f32(np.asarray(logp) + rng.normal(0, 0.2, logp.shape))
    cfg = ppo.PPOConfig(vf_coef=0.7, ent_coef=0.05, kl_coef=0.3, value_clip_eps=0.1)
    loss, m = jax.jit(ppo.ppo_loss, static_argnames=("config",))(
        logp,
        old_logp,
        adv,
        mask,
        values=values,
        returns=returns,
        old_values=old_values,
        entropy=entropy,
        ref_logp=ref_logp,
        config=cfg,
    )
    pg, _ = ppo.clipped_surrogate_loss(logp, old_logp, adv, mask, 0.2)
    vl = ppo.clipped_value_loss(values, returns, old_values, clip_eps=0.1)
    ent = (np.asarray(entropy) * np.asarray(mask)).sum() / np.asarray(mask).sum()
    lr = np.asarray(ref_logp, np.float64) - np.asarray(logp)
    kl = ((np.exp(lr) - 1 - lr) * np.asarray(mask)).sum() / np.asarray(mask).sum()
    assert float(m["kl_ref"]) == pytest.approx(kl, abs=NP_TOL)
    assert float(m["entropy"]) == pytest.approx(ent, abs=NP_TOL)
    expected = float(pg) + 0.7 * float(vl) - 0.05 * ent + 0.3 * kl
    assert float(loss) == pytest.approx(expected, abs=NP_TOL)
    assert float(m["loss"]) == float(loss)


def test_per_turn_advantages_broadcast_over_tokens():
    """Generate mode: one advantage per turn `[B]` equals that advantage on every token."""
    logp, old_logp, _, rng = ppo_inputs(3)
    mask = f32(random_mask(rng, logp.shape))
    adv_turn = f32(rng.normal(size=(4,)))
    adv_tokens = jnp.broadcast_to(adv_turn[:, None], logp.shape)
    a = ppo.ppo_loss(logp, old_logp, adv_turn, mask)[0]
    b = ppo.ppo_loss(logp, old_logp, adv_tokens, mask)[0]
    assert float(a) == float(b)


# ---------------------------------------------------------------------------------------
# A2C and REINFORCE (policy gradient and entropy vs rlax)
# ---------------------------------------------------------------------------------------


def policy_inputs(seed: int, batch: int = 4, time: int = 5, num_actions: int = 6):
    rng = np.random.default_rng(seed)
    logits = f32(rng.normal(size=(batch, time, num_actions)) * 1.5)
    actions = jnp.asarray(rng.integers(0, num_actions, (batch, time)), jnp.int32)
    return logits, actions, rng


def taken_logp(logits, actions):
    return jnp.take_along_axis(jax.nn.log_softmax(logits), actions[..., None], -1)[..., 0]


def rlax_pg(logits, actions, adv, mask):
    """rlax policy-gradient loss renormalised from `/ N` to `/ sum(mask)` (token mean)."""
    num_actions = logits.shape[-1]
    flat_w = mask.ravel()
    loss = rlax.policy_gradient_loss(
        logits.reshape(-1, num_actions), actions.ravel(), adv.ravel(), flat_w
    )
    return loss * flat_w.shape[0] / jnp.sum(flat_w)


@pytest.mark.parametrize("masked", [False, True])
def test_policy_gradient_matches_rlax(masked):
    logits, actions, rng = policy_inputs(4)
    adv = f32(rng.normal(size=actions.shape))
    mask = f32(random_mask(rng, actions.shape) if masked else np.ones(actions.shape))

    def ours(lg, a):
        return a2c.policy_gradient_loss(taken_logp(lg, actions), a, mask)

    assert_parity(ours, lambda lg, a: rlax_pg(lg, actions, a, mask), (logits, adv))


def test_a2c_loss_matches_rlax_terms():
    logits, actions, rng = policy_inputs(5)
    mask = f32(random_mask(rng, actions.shape))
    values = f32(rng.normal(size=actions.shape))
    returns = f32(rng.normal(size=actions.shape))
    adv = returns - values
    cfg = a2c.A2CConfig(vf_coef=0.5, ent_coef=0.01)

    def ours(lg, v):
        ent = losses.categorical_entropy(lg)
        return a2c.a2c_loss(taken_logp(lg, actions), adv, mask, v, returns, ent, mask, cfg)[0]

    def theirs(lg, v):
        num_actions = lg.shape[-1]
        w = mask.ravel()
        scale = w.shape[0] / jnp.sum(w)
        pg = rlax_pg(lg, actions, adv, mask)
        ent_loss = rlax.entropy_loss(lg.reshape(-1, num_actions), w) * scale  # = -mean entropy
        td = (returns - v).ravel()
        value = jnp.mean(0.5 * td**2 * w) * scale
        return pg + 0.5 * value + 0.01 * ent_loss

    assert_parity(ours, theirs, (logits, values))


@pytest.mark.parametrize("baseline", ["none", "mean", "value"])
def test_reinforce_matches_rlax_policy_gradient(baseline):
    """Generate-mode layout: one return per row `[B]`, spread over the row's tokens."""
    logits, actions, rng = policy_inputs(6, batch=5)
    mask_np = random_mask(rng, actions.shape)
    mask_np[3] = 0.0  # a padding row: excluded from the mean baseline and the loss
    mask = f32(mask_np)
    returns = f32(rng.normal(1.0, 2.0, size=(5,)))
    values = f32(rng.normal(size=(5,)))
    cfg = reinforce.ReinforceConfig(baseline=baseline, vf_coef=0.5)

    def ours(lg, v):
        return reinforce.reinforce_loss(taken_logp(lg, actions), returns, mask, v, config=cfg)[0]

    valid_rows = mask_np.sum(1) > 0
    if baseline == "none":
        b = np.zeros(5)
    elif baseline == "mean":
        b = np.full(5, np.asarray(returns)[valid_rows].mean())
    else:
        b = None

    def theirs(lg, v):
        base = jax.lax.stop_gradient(v) if b is None else f32(b)
        adv = jnp.broadcast_to((returns - base)[:, None], actions.shape)
        loss = rlax_pg(lg, actions, adv, mask)
        if baseline == "value":
            row_w = f32(valid_rows)
            loss += 0.5 * jnp.sum(0.5 * (returns - v) ** 2 * row_w) / jnp.sum(row_w)
        return loss

    assert_parity(ours, theirs, (logits, values))


def test_reinforce_normalized_returns():
    logits, actions, rng = policy_inputs(7)
    mask = f32(np.ones(actions.shape))
    returns = f32(rng.normal(5.0, 3.0, size=actions.shape))  # score mode: [B, T] returns
    cfg = reinforce.ReinforceConfig(baseline="none", normalize_returns=True)
    got = reinforce.reinforce_loss(taken_logp(logits, actions), returns, mask, config=cfg)[0]
    r = np.asarray(returns, np.float64)
    adv = (r - r.mean()) / (r.std() + 1e-8)
    assert float(got) == pytest.approx(float(rlax_pg(logits, actions, f32(adv), mask)), abs=NP_TOL)
    raw = reinforce.reinforce_loss(
        taken_logp(logits, actions), returns, mask, config=reinforce.ReinforceConfig("none")
    )[0]
    assert abs(float(raw) - float(got)) > 1e-2


def test_reinforce_value_baseline_requires_values():
    with pytest.raises(ValueError):
        reinforce.reinforce_loss(
            jnp.zeros((2, 3)),
            jnp.zeros((2,)),
            jnp.ones((2, 3)),
            config=reinforce.ReinforceConfig("value"),
        )


# ---------------------------------------------------------------------------------------
# GRPO (numpy loop references)
# ---------------------------------------------------------------------------------------


def np_group_advantages(returns, groups, eps, ddof):
    out = np.zeros(len(returns))
    for i in range(len(returns)):
        members = [returns[j] for j in range(len(returns)) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        dof = len(members) - ddof
        var = sum((m - mean) ** 2 for m in members) / dof if dof > 0 else 0.0
        out[i] = (returns[i] - mean) / (np.sqrt(var) + eps)
    return out


@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages_match_loop_reference(ddof):
    rng = np.random.default_rng(8)
    returns = rng.normal(size=(12,))
    returns[4:8] = 0.5  # a group whose episodes all scored the same
    groups = np.repeat(np.arange(3), 4)
    expected = np_group_advantages(returns, groups, 1e-4, ddof)
    by_size = grpo.group_advantages(f32(returns), group_size=4, ddof=ddof)
    assert_close(by_size, expected, NP_TOL)
    assert np.all(np.asarray(by_size)[4:8] == 0.0)
    # Same groups given as ids, in shuffled order.
    perm = rng.permutation(12)
    by_ids = grpo.group_advantages(f32(returns[perm]), jnp.asarray(groups[perm]), ddof=ddof)
    assert_close(by_ids, expected[perm], NP_TOL)
    # Sanity: the ddof choice matters, and matches torch.std's default (unbiased) at ddof=1.
    if ddof == 1:
        g0 = returns[:4]
        torch_like = (g0 - g0.mean()) / (g0.std(ddof=1) + 1e-4)
        assert_close(np.asarray(by_size)[:4], torch_like, NP_TOL)
        assert not np.allclose(expected, np_group_advantages(returns, groups, 1e-4, 0))


def test_group_advantages_uneven_groups_and_invalid_rows():
    returns = np.array([1.0, 2.0, 3.0, 7.0, -1.0, 4.0, 100.0])
    groups = np.array([0, 0, 0, 1, 1, 2, 0]) * 1000 + 17  # arbitrary labels (e.g. env seeds)
    valid = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    got = jax.jit(grpo.group_advantages)(f32(returns), jnp.asarray(groups), valid=f32(valid))
    expected = np_group_advantages(returns[:6], groups[:6], 1e-4, 1)
    assert_close(np.asarray(got)[:6], expected, NP_TOL)
    assert float(got[6]) == 0.0
    assert float(got[5]) == 0.0  # a group of one has no spread


def np_grpo_loss_and_grad(logp, old_logp, ref_logp, adv, mask, eps, beta, aggregation):
    """Loop reference for the GRPO loss and its gradient w.r.t. logp."""
    batch, time = logp.shape
    per_token = np.zeros((batch, time))
    d_token = np.zeros((batch, time))
    for i in range(batch):
        for t in range(time):
            r = np.exp(logp[i, t] - old_logp[i, t])
            a = adv[i]
            unclipped, clipped = r * a, min(max(r, 1 - eps), 1 + eps) * a
            log_q = ref_logp[i, t] - logp[i, t]
            kl = np.exp(log_q) - log_q - 1.0
            per_token[i, t] = -min(unclipped, clipped) + beta * kl
            d_surrogate = r * a if unclipped <= clipped or abs(r - 1) < eps else 0.0
            d_token[i, t] = -d_surrogate + beta * (1.0 - np.exp(log_q))
    weights = np.zeros((batch, time))
    if aggregation == "token_mean":
        weights = mask / mask.sum()
    else:
        rows = [i for i in range(batch) if mask[i].sum() > 0]
        for i in rows:
            weights[i] = mask[i] / mask[i].sum() / len(rows)
    return (per_token * weights).sum(), d_token * weights


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize("on_policy", [True, False])
def test_grpo_loss_matches_loop_reference(aggregation, on_policy):
    rng = np.random.default_rng(9)
    batch, time = 6, 5
    logp = rng.normal(-1.5, 0.5, (batch, time))
    old_logp = logp if on_policy else logp + rng.normal(0, 0.3, (batch, time))
    ref_logp = logp + rng.normal(0, 0.3, (batch, time))
    adv = np.asarray(grpo.group_advantages(f32(rng.normal(size=batch)), group_size=3))
    mask = random_mask(rng, (batch, time))
    mask[2] = 0.0  # fully masked episode
    cfg = grpo.GRPOConfig(clip_eps=0.2, beta=0.04, aggregation=aggregation)

    def loss_fn(lp):
        old = None if on_policy else f32(old_logp)
        return grpo.grpo_loss(lp, f32(adv), f32(mask), old, f32(ref_logp), cfg)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(f32(logp))
    expected, expected_grad = np_grpo_loss_and_grad(
        logp, old_logp, ref_logp, adv, mask, 0.2, 0.04, aggregation
    )
    assert float(loss) == pytest.approx(expected, abs=NP_TOL)
    assert_close(grad, expected_grad, NP_TOL)
    assert float(metrics["policy_loss"] + 0.04 * metrics["kl_ref"]) == pytest.approx(
        float(loss), abs=1e-6
    )


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean"])
def test_grpo_entropy_bonus_is_aggregated_like_the_surrogate(aggregation):
    """loss(ent_coef=c, H) = loss(no bonus) - c * agg(H) with the same per-sequence weights,
    and its gradient w.r.t. H is -c * those weights (a bonus summed over tokens would differ
    under sequence_mean, where rows have different lengths)."""
    rng = np.random.default_rng(11)
    batch, time = 6, 5
    logp = f32(rng.normal(-1.5, 0.5, (batch, time)))
    adv = grpo.group_advantages(f32(rng.normal(size=batch)), group_size=3)
    mask = random_mask(rng, (batch, time))
    mask[1, 2:] = 0.0  # rows of different lengths
    entropy = f32(rng.uniform(0.1, 1.0, (batch, time)))
    base = grpo.GRPOConfig(beta=0.0, aggregation=aggregation)
    bonus = grpo.GRPOConfig(beta=0.0, aggregation=aggregation, ent_coef=0.3)
    loss0, _ = grpo.grpo_loss(logp, adv, f32(mask), config=base)
    loss1, metrics = grpo.grpo_loss(logp, adv, f32(mask), config=bonus, entropy=entropy)
    weights = np.where(mask > 0, 1.0, 0.0)
    if aggregation == "token_mean":
        weights = weights / weights.sum()
    else:
        rows = weights.sum(1) > 0
        weights = weights / np.maximum(weights.sum(1, keepdims=True), 1) / rows.sum()
    agg_h = float((np.asarray(entropy) * weights).sum())
    assert float(metrics["entropy"]) == pytest.approx(agg_h, abs=1e-6)
    assert float(loss1) == pytest.approx(float(loss0) - 0.3 * agg_h, abs=1e-6)
    grad_h = jax.grad(lambda h: grpo.grpo_loss(logp, adv, f32(mask), config=bonus, entropy=h)[0])(
        entropy
    )
    assert_close(grad_h, -0.3 * weights, 1e-7)
    with pytest.raises(ValueError, match="entropy"):
        grpo.grpo_loss(logp, adv, f32(mask), config=bonus)


# ---------------------------------------------------------------------------------------
# DQN
# ---------------------------------------------------------------------------------------


def q_inputs(seed: int, batch: int = 8, num_actions: int = 5):
    rng = np.random.default_rng(seed)
    q = f32(rng.normal(size=(batch, num_actions)))
    actions = jnp.asarray(rng.integers(0, num_actions, batch), jnp.int32)
    rewards = f32(rng.normal(size=batch))
    discounts = f32(0.99 * (rng.random(batch) > 0.25))
    next_q_target = f32(rng.normal(size=(batch, num_actions)))
    next_q_online = f32(rng.normal(size=(batch, num_actions)))
    return q, actions, rewards, discounts, next_q_target, next_q_online, rng


def test_q_learning_td_matches_rlax():
    q, actions, rewards, discounts, next_q_target, _, rng = q_inputs(10)
    weights = f32(rng.normal(size=q.shape[0]))

    def ours(q_, nq):
        return dqn.td_errors(q_, actions, rewards, discounts, nq, double=False)

    def theirs(q_, nq):
        return jax.vmap(rlax.q_learning)(q_, actions, rewards, discounts, nq)

    assert_parity(ours, theirs, (q, next_q_target), weights)


def test_double_q_learning_td_matches_rlax():
    q, actions, rewards, discounts, next_q_target, next_q_online, rng = q_inputs(11)
    weights = f32(rng.normal(size=q.shape[0]))

    def ours(q_, nqt, nqo):
        return dqn.td_errors(q_, actions, rewards, discounts, nqt, next_q_online=nqo)

    def theirs(q_, nqt, nqo):
        return jax.vmap(rlax.double_q_learning)(q_, actions, rewards, discounts, nqt, nqo)

    assert_parity(ours, theirs, (q, next_q_target, next_q_online), weights)
    # Double and plain targets differ on these inputs (the test can tell them apart).
    plain = dqn.td_errors(q, actions, rewards, discounts, next_q_target, double=False)
    assert not np.allclose(np.asarray(plain), np.asarray(ours(q, next_q_target, next_q_online)))


@pytest.mark.parametrize("delta", [1.0, 0.3])
def test_huber_matches_rlax(delta):
    x = f32(np.linspace(-3.0, 3.0, 61))
    assert_parity(
        lambda v: dqn.huber_loss(v, delta), lambda v: rlax.huber_loss(v, delta), (x,), x + 4.0
    )


def test_dqn_loss_matches_rlax_huber_of_double_q_td():
    q, actions, rewards, discounts, next_q_target, next_q_online, _ = q_inputs(12)

    def ours(q_):
        return dqn.dqn_loss(
            q_, actions, rewards, discounts, next_q_target, next_q_online=next_q_online
        )[0]

    def theirs(q_):
        td = jax.vmap(rlax.double_q_learning)(
            q_, actions, rewards, discounts, next_q_target, next_q_online
        )
        return jnp.mean(rlax.huber_loss(td, 1.0))

    assert_parity(ours, theirs, (q,))


def test_invalid_next_actions_are_never_bootstrapped():
    # Online net prefers invalid action 0; target net values it hugely. Must be ignored.
    next_q_online = f32([[10.0, 1.0, 2.0, 0.5], [9.0, -1.0, 3.0, 8.0]])
    next_q_target = f32([[1e6, 5.0, 7.0, 3.0], [1e6, 2.0, 4.0, 1e6]])
    next_mask = jnp.array([[False, True, True, True], [False, True, True, False]])
    rewards, discounts = f32([1.0, 0.0]), f32([0.5, 1.0])
    double = dqn.q_learning_target(rewards, discounts, next_q_target, next_mask, next_q_online)
    # a* = argmax over valid online: row 0 -> action 2 (2.0), row 1 -> action 2 (3.0).
    assert_close(double, [1.0 + 0.5 * 7.0, 4.0])
    plain = dqn.q_learning_target(rewards, discounts, next_q_target, next_mask, double=False)
    assert_close(plain, [1.0 + 0.5 * 7.0, 4.0])
    # A next state without any valid action bootstraps 0, not NEG_INF.
    none_valid = dqn.q_learning_target(
        rewards, discounts, next_q_target, jnp.zeros((2, 4), bool), next_q_online
    )
    assert_close(none_valid, rewards)


# One jitted sampler and one input shape for both epsilon-greedy tests: compiling the PRNG
# code dominates their runtime, so they share a single compilation.
_sample_epsilon_greedy = jax.jit(dqn.epsilon_greedy)
_EG_ROWS, _EG_ACTIONS = 6400, 7


def test_epsilon_greedy_only_picks_valid_actions():
    rng = np.random.default_rng(13)
    q = f32(rng.normal(size=(_EG_ROWS, _EG_ACTIONS)))
    mask = random_action_mask(rng, _EG_ROWS, _EG_ACTIONS, p_valid=0.4)
    q = jnp.where(jnp.asarray(mask), q, 100.0)  # invalid actions look best: must be skipped
    rows = np.arange(_EG_ROWS)
    for i, eps in enumerate((1.0, 0.5)):
        acts = np.asarray(_sample_epsilon_greedy(jax.random.key(i), q, jnp.asarray(mask), eps))
        assert np.all(mask[rows, acts])
    greedy = np.asarray(dqn.masked_argmax(q, jnp.asarray(mask)))
    assert np.all(mask[rows, greedy])
    # With epsilon 0.5 some actions are exploratory (not greedy), with 0 none is.
    acts_half = np.asarray(_sample_epsilon_greedy(jax.random.key(5), q, jnp.asarray(mask), 0.5))
    assert 0.05 < np.mean(acts_half != greedy) < 0.5
    acts0 = np.asarray(_sample_epsilon_greedy(jax.random.key(7), q, jnp.asarray(mask), 0.0))
    assert np.all(acts0 == greedy)


def test_epsilon_one_is_uniform_over_valid_actions():
    q = jnp.tile(f32([[5.0, 0.0, 1.0, 2.0, 3.0, 9.0, -1.0]]), (_EG_ROWS, 1))
    mask = jnp.tile(jnp.array([[True, False, True, True, False, False, False]]), (_EG_ROWS, 1))
    acts = np.asarray(_sample_epsilon_greedy(jax.random.key(1), q, mask, 1.0))
    freq = np.bincount(acts, minlength=_EG_ACTIONS) / acts.size
    # Binomial std of a 1/3 frequency over 6400 draws is 0.0059; 0.03 is > 5 std.
    assert_close(freq, [1 / 3, 0.0, 1 / 3, 1 / 3, 0.0, 0.0, 0.0], 0.03)


def test_linear_epsilon():
    sched = jax.jit(lambda s: dqn.linear_epsilon(s, 1.0, 0.1, 100))
    assert float(sched(0)) == pytest.approx(1.0)
    assert float(sched(50)) == pytest.approx(0.55)
    assert float(sched(100)) == pytest.approx(0.1)
    assert float(sched(10_000)) == pytest.approx(0.1)


def test_polyak_and_periodic_updates():
    target = {"w": jnp.array([1.0, 2.0]), "layer": {"b": jnp.array(3.0)}}
    online = {"w": jnp.array([5.0, -2.0]), "layer": {"b": jnp.array(7.0)}}
    polyak = jax.jit(dqn.polyak_update)
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), polyak(target, online, 1.0), online)
    )
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), polyak(target, online, 0.0), target)
    )
    half = polyak(target, online, 0.25)
    assert_close(half["w"], [2.0, 1.0])
    assert_close(half["layer"]["b"], 4.0)
    periodic = jax.jit(dqn.periodic_update, static_argnames="period")
    for step, expected in ((0, online), (3, target), (10, online), (11, target)):
        out = periodic(target, online, jnp.asarray(step), period=5)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out, expected))


# ---------------------------------------------------------------------------------------
# Discrete SAC (numpy loop references)
# ---------------------------------------------------------------------------------------


def np_masked_policy(logits_row, mask_row):
    """Softmax over the valid entries only; invalid entries get exactly 0."""
    probs = np.zeros(len(logits_row))
    valid = [a for a in range(len(logits_row)) if mask_row[a]]
    top = max(logits_row[a] for a in valid)
    z = sum(np.exp(logits_row[a] - top) for a in valid)
    for a in valid:
        probs[a] = np.exp(logits_row[a] - top) / z
    return probs, valid


def np_sac_losses(inp, alpha, log_alpha, ratio=0.98):
    batch = inp["q1"].shape[0]
    critic = actor = temperature = 0.0
    for b in range(batch):
        probs_next, valid_next = np_masked_policy(inp["next_logits"][b], inp["next_mask"][b])
        v_next = 0.0
        for a in valid_next:
            min_q = min(inp["next_q1_target"][b, a], inp["next_q2_target"][b, a])
            v_next += probs_next[a] * (min_q - alpha * np.log(probs_next[a]))
        y = inp["rewards"][b] + inp["discounts"][b] * v_next
        a_taken = inp["actions"][b]
        critic += 0.5 * (inp["q1"][b, a_taken] - y) ** 2 + 0.5 * (inp["q2"][b, a_taken] - y) ** 2
        probs, valid = np_masked_policy(inp["logits"][b], inp["mask"][b])
        entropy = 0.0
        for a in valid:
            min_q = min(inp["q1"][b, a], inp["q2"][b, a])
            actor += probs[a] * (alpha * np.log(probs[a]) - min_q)
            entropy -= probs[a] * np.log(probs[a])
        target = ratio * np.log(len(valid))
        temperature += -log_alpha * (target - entropy)
    return critic / batch, actor / batch, temperature / batch


def sac_inputs(seed: int, batch: int = 6, num_actions: int = 5):
    rng = np.random.default_rng(seed)

    def garbage_where_invalid(x, mask):
        return np.where(mask, x, 1e4)  # invalid entries must have no influence

    mask = random_action_mask(rng, batch, num_actions)
    next_mask = random_action_mask(rng, batch, num_actions)
    inp = {
        "logits": garbage_where_invalid(rng.normal(size=(batch, num_actions)), mask),
        "mask": mask,
        "q1": rng.normal(size=(batch, num_actions)),
        "q2": rng.normal(size=(batch, num_actions)),
        "actions": np.array([rng.choice(np.flatnonzero(m)) for m in mask]),
        "rewards": rng.normal(size=batch),
        "discounts": 0.99 * (rng.random(batch) > 0.2),
        "next_logits": garbage_where_invalid(rng.normal(size=(batch, num_actions)), next_mask),
        "next_mask": next_mask,
        "next_q1_target": garbage_where_invalid(rng.normal(size=(batch, num_actions)), next_mask),
        "next_q2_target": rng.normal(size=(batch, num_actions)),
    }
    return inp


def to_jax(inp):
    out = {}
    for k, v in inp.items():
        if k in ("mask", "next_mask"):
            out[k] = jnp.asarray(v)
        elif k == "actions":
            out[k] = jnp.asarray(v, jnp.int32)
        else:
            out[k] = f32(v)
    return out


def test_sac_losses_match_loop_reference():
    inp = sac_inputs(14)
    log_alpha = -1.2
    alpha = float(np.exp(np.float32(log_alpha)))
    critic, actor, temperature = np_sac_losses(inp, alpha, log_alpha)
    j = to_jax(inp)
    loss, m = jax.jit(sac.sac_loss)(log_alpha=jnp.float32(log_alpha), **j)
    assert float(m["critic_loss"]) == pytest.approx(critic, abs=NP_TOL)
    assert float(m["actor_loss"]) == pytest.approx(actor, abs=NP_TOL)
    assert float(m["temperature_loss"]) == pytest.approx(temperature, rel=NP_TOL, abs=NP_TOL)
    assert float(loss) == pytest.approx(critic + actor + temperature, abs=3 * NP_TOL)


def test_sac_gradients():
    inp = sac_inputs(15)
    j = to_jax(inp)
    log_alpha = jnp.float32(-0.7)
    alpha = float(jnp.exp(log_alpha))

    def total(logits, q1, next_q1_target, la):
        return sac.sac_loss(
            **{**j, "logits": logits, "q1": q1, "next_q1_target": next_q1_target}, log_alpha=la
        )[0]

    g_logits, g_q1, g_next, g_la = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))(
        j["logits"], j["q1"], j["next_q1_target"], log_alpha
    )
    batch = inp["q1"].shape[0]
    # Critic: d/dq1 = (q1(s, a) - y) / B on the taken action only; the actor's Q is frozen.
    expected_q1 = np.zeros_like(inp["q1"])
    y = np.zeros(batch)
    for b in range(batch):
        probs, valid = np_masked_policy(inp["next_logits"][b], inp["next_mask"][b])
        v = sum(
            probs[a]
            * (
                min(inp["next_q1_target"][b, a], inp["next_q2_target"][b, a])
                - alpha * np.log(probs[a])
            )
            for a in valid
        )
        y[b] = inp["rewards"][b] + inp["discounts"][b] * v
        expected_q1[b, inp["actions"][b]] = (inp["q1"][b, inp["actions"][b]] - y[b]) / batch
    assert_close(g_q1, expected_q1, NP_TOL)
    assert np.all(np.asarray(g_next) == 0.0)  # targets are stop-gradiented
    # Actor: central finite differences of the float64 loop reference.
    h = 1e-5
    fd = np.zeros_like(inp["logits"])
    for b in range(batch):
        for a in range(inp["logits"].shape[1]):
            plus, minus = dict(inp), dict(inp)
            plus["logits"] = inp["logits"].copy()
            minus["logits"] = inp["logits"].copy()
            plus["logits"][b, a] += h
            minus["logits"][b, a] -= h
            fd[b, a] = (
                np_sac_losses(plus, alpha, -0.7)[1] - np_sac_losses(minus, alpha, -0.7)[1]
            ) / (2 * h)
    assert_close(g_logits, fd, 1e-4)  # FD truncation ~h^2, float32 grads ~1e-7
    assert np.all(np.asarray(g_logits)[~inp["mask"]] == 0.0)
    # Temperature: d/dlog_alpha = -mean(target - H).
    entropies = np.asarray(losses.categorical_entropy(j["logits"], j["mask"]))
    targets = 0.98 * np.log(inp["mask"].sum(1))
    assert float(g_la) == pytest.approx(-np.mean(targets - entropies), abs=NP_TOL)


def test_sac_temperature_sign():
    """Entropy below target -> negative gradient -> descent raises alpha; and vice versa."""
    grad = jax.grad(sac.sac_temperature_loss)
    assert float(grad(jnp.float32(0.0), f32([0.1, 0.2]), 1.0)) < 0.0
    assert float(grad(jnp.float32(0.0), f32([1.5, 1.2]), 1.0)) > 0.0


def test_sac_masked_actions_get_zero_probability():
    inp = sac_inputs(16)
    j = to_jax(inp)
    probs = np.asarray(losses.masked_softmax(j["logits"], j["mask"]))
    assert np.all(probs[~inp["mask"]] == 0.0)
    assert_close(probs.sum(-1), np.ones(len(probs)))
    # Changing logits/Q of invalid actions does not change any loss.
    j2 = dict(j)
    for key, mask_key in (("logits", "mask"), ("q1", "mask"), ("next_q1_target", "next_mask")):
        j2[key] = jnp.where(j[mask_key], j[key], -777.0)
    _, m1 = sac.sac_loss(log_alpha=jnp.float32(0.0), **j)
    _, m2 = sac.sac_loss(log_alpha=jnp.float32(0.0), **j2)
    for k in ("actor_loss", "critic_loss", "temperature_loss", "entropy"):
        assert float(m1[k]) == pytest.approx(float(m2[k]), abs=1e-6)


def test_states_without_valid_actions_contribute_zero():
    """Terminal padding rows (no valid candidate) give soft value 0 and entropy 0."""
    logits = f32([[1.0, 2.0, 3.0], [0.5, 0.1, -0.3]])
    mask = jnp.array([[False, False, False], [True, True, False]])
    q = f32([[4.0, 5.0, 6.0], [1.0, 2.0, 3.0]])
    value = sac.soft_state_value(logits, mask, q, q, 0.5)
    entropy = losses.categorical_entropy(logits, mask)
    assert float(value[0]) == 0.0
    assert float(entropy[0]) == 0.0
    assert float(value[1]) != 0.0 and float(entropy[1]) > 0.0


def test_sac_target_entropy_config():
    mask = jnp.array([[True, True, False, False], [True, True, True, True]])
    per_state = sac.target_entropy(mask, 4, sac.SACConfig())
    assert_close(per_state, 0.98 * np.log([2.0, 4.0]))
    assert float(sac.target_entropy(mask, 4, sac.SACConfig(target_entropy=0.3))) == pytest.approx(
        0.3
    )


# ---------------------------------------------------------------------------------------
# Every loss jits and is finite
# ---------------------------------------------------------------------------------------


def _all_loss_calls():
    rng = np.random.default_rng(17)
    batch, time, num_actions = 4, 6, 5
    logp = f32(rng.normal(-1.0, 0.5, (batch, time)))
    mask = f32(random_mask(rng, (batch, time)))
    mask = mask.at[1].set(0.0)  # a fully masked row everywhere
    adv = f32(rng.normal(size=batch))
    values, returns = f32(rng.normal(size=batch)), f32(rng.normal(size=batch))
    entropy = f32(rng.random((batch, time)))
    q_args = q_inputs(18, batch, num_actions)[:6]
    j = to_jax(sac_inputs(19, batch, num_actions))
    return {
        "ppo": lambda: ppo.ppo_loss(
            logp,
            logp + 0.1,
            adv,
            mask,
            values,
            returns,
            values + 0.1,
            None,
            entropy,
            logp - 0.2,
            ppo.PPOConfig(kl_coef=0.1, value_clip_eps=0.2),
        ),  # fmt: skip
        "a2c": lambda: a2c.a2c_loss(logp, adv, mask, values, returns, entropy),
        "reinforce": lambda: reinforce.reinforce_loss(
            logp, returns, mask, values, entropy, reinforce.ReinforceConfig("value", True)
        ),
        "grpo": lambda: grpo.grpo_loss(
            logp, grpo.group_advantages(returns, group_size=2), mask, logp + 0.1, logp - 0.2
        ),
        "dqn": lambda: dqn.dqn_loss(*q_args[:5], None, q_args[5]),
        "dqn_plain": lambda: dqn.dqn_loss(*q_args[:5], config=dqn.DQNConfig(double=False)),
        "sac": lambda: sac.sac_loss(log_alpha=jnp.float32(-1.0), **j),
    }


@pytest.mark.parametrize("name", ["ppo", "a2c", "reinforce", "grpo", "dqn", "dqn_plain", "sac"])
def test_every_loss_jits_and_is_finite(name):
    loss, metrics = jax.jit(_all_loss_calls()[name])()
    assert loss.shape == ()
    assert np.isfinite(float(loss))
    for key, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), key
