"""Shared pieces of the RL losses: masked reductions, returns, entropy, KL estimators.

Everything here is a pure function of arrays, safe under `jax.jit` and `jax.vmap`.

Conventions used by every loss in this package:

* `B` is the batch (episodes, or turns in generate mode), `T` the time axis of the
  per-token / per-turn quantity being reduced, `A` the number of candidate actions.
* Masks are float or bool arrays; a float mask acts as a per-element weight. Masked-out
  entries never contribute to a sum or a denominator, and they never produce NaN.
* For returns and advantages the time axis is *environment turns*: `rewards[b, t]` is the
  reward received after acting at turn `t`, `values[b, t] = V(s_t)`, and
  `discounts[b, t] = gamma * (1 - terminated[b, t])` multiplies the value of the state
  reached after turn `t`.

Termination vs truncation
-------------------------
A *terminated* step (the MDP really ended) has discount 0: nothing is bootstrapped.
A *truncated* step (a time limit, or simply the end of the collected rollout) keeps
discount `gamma` and bootstraps from the value of the next state. At the last column
`t = T - 1` that next value is the `bootstrap` / `bootstrap_value` argument (`V(s_T)`,
the value of the observation that follows the rollout). A truncation in the *middle* of a
row (vector envs auto-reset, so column `t + 1` already belongs to a new episode) must not
propagate across the boundary: fold the bootstrap into the reward with
`fold_truncation_bootstrap`, which returns `r + gamma * V(final_obs)` and discount 0 at
that step. That is exact for discounted, n-step and GAE returns. Padding columns after
an episode's end are harmless provided the episode's last real step has discount 0
(after folding) and the padding is masked out of the loss.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from rllama_jax.models import NEG_INF  # masked logits / Q-values (re-exported here)

Array = jax.Array
Aggregation = Literal["token_mean", "sequence_mean", "sequence_sum"]
KLEstimator = Literal["k1", "k2", "k3"]

AGGREGATIONS: tuple[str, ...] = ("token_mean", "sequence_mean", "sequence_sum")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


# --------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------


def _as_2d(x: Array) -> Array:
    """`[B]` -> `[B, 1]`; `[B, T]` unchanged (a per-turn scalar is a length-1 sequence)."""
    return x[:, None] if x.ndim == 1 else x


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """`numerator / denominator`, and 0 where the denominator is 0 (no NaN, no NaN grad)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def masked_sum_and_denominator(
    x: Array, mask: Array, aggregation: Aggregation = "token_mean"
) -> tuple[Array, Array]:
    """Masked reduction of `x [B, T]` returned as `(total, denominator)`, both scalars.

    The mean is `total / denominator`; keeping the two apart (as tunix does) makes
    gradient accumulation over micro-batches and means across devices exact: sum the
    totals, sum the denominators, divide once.

    Aggregation modes:
      * "token_mean":    total = sum of `x * mask` over all tokens; denominator = sum of
        the mask (number of valid tokens). Every token weighs the same, so long
        sequences weigh more (DAPO / tunix "token-mean").
      * "sequence_mean": per sequence, the masked mean over its tokens; total = sum of
        those means over sequences with at least one valid token, denominator = number
        of such sequences. Every sequence weighs the same (original GRPO).
      * "sequence_sum":  per sequence, the masked sum over its tokens; total = sum over
        sequences, denominator = number of sequences with at least one valid token.

    A fully-masked sequence contributes nothing to the total nor to the denominator.

    Args:
      x: `[B, T]` (or `[B]`, read as `[B, 1]`) per-token values.
      mask: same shape as `x`; bool or float weights.
      aggregation: one of `AGGREGATIONS`.

    Returns:
      `(total, denominator)`, float scalars.
    """
    chex.assert_equal_shape([x, mask])
    x, mask = _as_2d(x), _as_2d(mask).astype(x.dtype)
    chex.assert_rank(x, 2)
    masked = jnp.where(mask != 0, x * mask, 0.0)  # `where` so that masked NaN/inf vanish.
    if aggregation == "token_mean":
        return masked.sum(), mask.sum()
    per_seq_weight = mask.sum(axis=1)  # [B]
    has_tokens = (per_seq_weight > 0).astype(x.dtype)
    per_seq_sum = masked.sum(axis=1)  # [B]
    if aggregation == "sequence_mean":
        per_seq = safe_divide(per_seq_sum, per_seq_weight)
    elif aggregation == "sequence_sum":
        per_seq = per_seq_sum
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    return (per_seq * has_tokens).sum(), has_tokens.sum()


def masked_mean(x: Array, mask: Array, aggregation: Aggregation = "token_mean") -> Array:
    """Masked mean of `x [B, T]` under `aggregation` (see `masked_sum_and_denominator`).

    Returns 0 (not NaN) when nothing is valid.
    """
    total, denominator = masked_sum_and_denominator(x, mask, aggregation)
    return safe_divide(total, denominator)


def broadcast_to_tokens(x: Array, like: Array) -> Array:
    """Broadcast a per-sequence quantity `[B]` to `like`'s shape `[B, T]`.

    Used to spread one advantage / return per episode or turn over its tokens. An `x`
    that already has `like`'s shape is returned unchanged.
    """
    if x.shape == like.shape:
        return x
    chex.assert_rank(x, 1)
    chex.assert_axis_dimension(like, 0, x.shape[0])
    return jnp.broadcast_to(x.reshape(x.shape + (1,) * (like.ndim - 1)), like.shape)


def row_mask(mask: Array) -> Array:
    """`[B, T]` token mask -> `[B]` float: 1 where the row has at least one valid token."""
    return (_as_2d(mask).astype(jnp.float32).sum(axis=1) > 0).astype(jnp.float32)


def normalize(x: Array, mask: Array | None = None, eps: float = 1e-8) -> Array:
    """Standardise `x` to zero mean and unit std over its valid entries (advantage norm).

    Mean and (population, ddof=0) std are token-weighted over the mask. Masked-out entries
    are returned as 0. Statistics are stop-gradiented: normalisation rescales a learning
    signal, it is not something to differentiate through.

    Args:
      x: any shape, e.g. `[B, T]` or `[B]`.
      mask: same shape as `x` (bool or float weights); `None` means all valid.
      eps: added to the std.

    Returns:
      array of `x`'s shape.
    """
    if mask is None:
        mask = jnp.ones_like(x)
    chex.assert_equal_shape([x, mask])
    w = mask.astype(x.dtype)
    count = w.sum()
    mean = safe_divide(jnp.where(w != 0, x * w, 0.0).sum(), count)
    var = safe_divide(jnp.where(w != 0, w * (x - mean) ** 2, 0.0).sum(), count)
    mean, std = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(jnp.sqrt(var))
    return jnp.where(w != 0, (x - mean) / (std + eps), 0.0)


# --------------------------------------------------------------------------------------
# Returns and advantages (time axis = environment turns)
# --------------------------------------------------------------------------------------


def _reverse_scan_time(step, init: Array, *xs: Array) -> Array:
    """Reverse `lax.scan` over the time axis of batch-major `[B, T]` arrays."""
    time_major = tuple(jnp.swapaxes(x, 0, 1) for x in xs)  # [T, B]
    _, out = jax.lax.scan(step, init, time_major, reverse=True)
    return jnp.swapaxes(out, 0, 1)


def discounts_from_dones(terminated: Array, gamma: float) -> Array:
    """`gamma * (1 - terminated)`: the per-step discount. Truncation keeps `gamma`."""
    return gamma * (1.0 - terminated.astype(jnp.float32))


def fold_truncation_bootstrap(
    rewards: Array, discounts: Array, truncated: Array, final_values: Array
) -> tuple[Array, Array]:
    """Fold the bootstrap of a mid-rollout truncation into the reward.

    At a truncated step the next column of the rollout belongs to a new (auto-reset)
    episode, so the recursion must stop there while still bootstrapping from the value of
    the true final observation. Returns `rewards + discounts * final_values` and discount
    0 at truncated steps; unchanged elsewhere.

    Args:
      rewards: `[B, T]`.
      discounts: `[B, T]`, `gamma * (1 - terminated)`.
      truncated: `[B, T]` bool/float, 1 where the episode was cut by a time limit.
      final_values: `[B, T]`, `V(final_obs)` at truncated steps (ignored elsewhere).

    Returns:
      `(rewards, discounts)`, both `[B, T]`.
    """
    chex.assert_equal_shape([rewards, discounts, truncated, final_values])
    trunc = truncated.astype(rewards.dtype)
    return rewards + trunc * discounts * final_values, discounts * (1.0 - trunc)


def discounted_returns(rewards: Array, discounts: Array, bootstrap: Array) -> Array:
    """Discounted returns `G_t = r_t + d_t * G_{t+1}`, with `G_T = bootstrap`.

    Args:
      rewards: `[B, T]`, reward after acting at turn `t`.
      discounts: `[B, T]`, `gamma * (1 - terminated)` at turn `t`.
      bootstrap: `[B]`, value of the state after the last turn (0 for Monte-Carlo
        returns of finished episodes).

    Returns:
      `[B, T]` returns.
    """
    chex.assert_rank([rewards, discounts, bootstrap], [2, 2, 1])
    chex.assert_equal_shape([rewards, discounts])
    chex.assert_axis_dimension(bootstrap, 0, rewards.shape[0])

    def step(next_return, xs):
        r, d = xs
        g = r + d * next_return
        return g, g

    return _reverse_scan_time(step, bootstrap.astype(rewards.dtype), rewards, discounts)


def _next_values(values: Array, bootstrap_value: Array) -> Array:
    """`[B, T]` values of `s_{t+1}`: `values` shifted left, `bootstrap_value` appended."""
    return jnp.concatenate([values[:, 1:], bootstrap_value[:, None]], axis=1)


def n_step_returns(
    rewards: Array, discounts: Array, values: Array, bootstrap: Array, n: int
) -> Array:
    """n-step bootstrapped returns.

    `G_t = r_t + d_t r_{t+1} + ... + d_t...d_{t+n-2} r_{t+n-1} + d_t...d_{t+n-1} V(s_{t+n})`.
    Windows that run past the end of the row stop there and bootstrap from
    `bootstrap = V(s_T)`. `n = 1` is the TD(0) target; `n >= T` gives `discounted_returns`.

    Args:
      rewards: `[B, T]`.
      discounts: `[B, T]`.
      values: `[B, T]`, `V(s_t)`.
      bootstrap: `[B]`, `V(s_T)`.
      n: number of steps (static, >= 1).

    Returns:
      `[B, T]` n-step returns.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    chex.assert_rank([rewards, discounts, values, bootstrap], [2, 2, 2, 1])
    chex.assert_equal_shape([rewards, discounts, values])
    chex.assert_axis_dimension(bootstrap, 0, rewards.shape[0])

    # G^(0)_t = V(s_t); G^(k)_t = r_t + d_t * G^(k-1)_{t+1}, with G^(k-1)_T = V(s_T).
    def one_more_step(_, g):
        return rewards + discounts * _next_values(g, bootstrap)

    return jax.lax.fori_loop(0, n, one_more_step, values.astype(rewards.dtype))


def gae(
    rewards: Array,
    discounts: Array,
    values: Array,
    bootstrap_value: Array,
    lam: float,
) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016).

    `delta_t = r_t + d_t V(s_{t+1}) - V(s_t)`, `A_t = delta_t + d_t * lam * A_{t+1}`,
    `A_T = 0`, and `V(s_T) = bootstrap_value`. Returns are `A_t + V(s_t)` (the TD(lambda)
    target for the value head). Gradients flow through `values`; callers stop-gradient
    the outputs when they use them as targets.

    Args:
      rewards: `[B, T]`.
      discounts: `[B, T]`, `gamma * (1 - terminated)`.
      values: `[B, T]`, `V(s_t)`.
      bootstrap_value: `[B]`, `V(s_T)`.
      lam: GAE lambda.

    Returns:
      `(advantages, returns)`, both `[B, T]`.
    """
    chex.assert_rank([rewards, discounts, values, bootstrap_value], [2, 2, 2, 1])
    chex.assert_equal_shape([rewards, discounts, values])
    chex.assert_axis_dimension(bootstrap_value, 0, rewards.shape[0])
    deltas = rewards + discounts * _next_values(values, bootstrap_value) - values

    def step(next_advantage, xs):
        delta, d = xs
        advantage = delta + d * lam * next_advantage
        return advantage, advantage

    init = jnp.zeros(rewards.shape[:1], rewards.dtype)
    advantages = _reverse_scan_time(step, init, deltas, discounts)
    return advantages, advantages + values


# --------------------------------------------------------------------------------------
# Categorical distributions and KL estimators
# --------------------------------------------------------------------------------------


def masked_logits(logits: Array, mask: Array | None) -> Array:
    """Replace invalid actions' logits by `NEG_INF` (`[..., A]`); `None` keeps all."""
    if mask is None:
        return logits
    chex.assert_equal_shape([logits, mask])
    return jnp.where(mask.astype(bool), logits, NEG_INF)


def masked_log_softmax(logits: Array, mask: Array | None = None) -> Array:
    """Log-probabilities `[..., A]` of the softmax restricted to valid actions.

    Invalid actions get log-probability about `NEG_INF` (probability exactly 0). At least
    one action per row must be valid.
    """
    return jax.nn.log_softmax(masked_logits(logits, mask), axis=-1)


def masked_softmax(logits: Array, mask: Array | None = None) -> Array:
    """Probabilities `[..., A]` over valid actions; invalid actions get exactly 0."""
    probs = jax.nn.softmax(masked_logits(logits, mask), axis=-1)
    if mask is None:
        return probs
    return jnp.where(mask.astype(bool), probs, 0.0)


def categorical_entropy(logits: Array, mask: Array | None = None) -> Array:
    """Entropy `[...]` of the categorical `softmax(logits [..., A])` over valid actions.

    Invalid actions (mask 0) are excluded from the distribution; their `p log p` terms are
    dropped explicitly, so a row without any valid action (terminal padding) gets entropy
    0 rather than that of a uniform distribution.
    """
    log_probs = masked_log_softmax(logits, mask)
    plogp = jnp.exp(log_probs) * log_probs
    if mask is not None:
        plogp = jnp.where(mask.astype(bool), plogp, 0.0)
    return -plogp.sum(axis=-1)


def kl_estimate(logp: Array, ref_logp: Array, estimator: KLEstimator = "k3") -> Array:
    """Per-sample estimators of `KL(pi || pi_ref)` from log-probs of tokens sampled from pi.

    From J. Schulman, "Approximating KL divergence" (2020), with `log r = ref_logp - logp`:
      * "k1": `-log r = logp - ref_logp` — unbiased, high variance, can be negative.
      * "k2": `0.5 * (log r)^2` — biased (low bias near pi_ref), always >= 0.
      * "k3": `r - 1 - log r` — unbiased and always >= 0 (the GRPO choice).

    Args:
      logp: `[B, T]` (any shape) log pi(token).
      ref_logp: same shape, log pi_ref(token).
      estimator: "k1" | "k2" | "k3".

    Returns:
      per-token estimate, same shape.
    """
    chex.assert_equal_shape([logp, ref_logp])
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
