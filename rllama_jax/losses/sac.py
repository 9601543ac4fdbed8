"""Discrete soft actor-critic (Christodoulou 2019, arXiv 1910.07207) over candidate actions.

Score mode: the policy is a softmax over candidate-action scores `logits [B, A]` restricted
to valid actions (`mask [B, A]`; invalid actions get probability exactly 0), and two Q
heads give `q1, q2 [B, A]`. With a discrete action set every expectation over the policy
is an exact sum over actions, so no reparameterisation is needed.

* critic target `y = r + discount * sum_a pi(a|s') (min(q1t, q2t)(s', a) - alpha log pi(a|s'))`
  (target twin Q, current policy at s'); critic loss `0.5 (q1(s,a) - y)^2 + 0.5 (q2(s,a) - y)^2`.
* actor loss `sum_a pi(a|s) (alpha log pi(a|s) - min(q1, q2)(s, a))`, Q stop-gradiented.
* temperature loss on `log_alpha`: `-log_alpha * stop_grad(target_entropy - H(pi(.|s)))`.
  Sign convention: when the entropy is below target the gradient w.r.t. `log_alpha` is
  negative, so gradient descent raises alpha (more exploration), and vice versa. Optimising
  `log_alpha` (not alpha) keeps alpha positive and the step size scale-free.
* target entropy: `target_entropy` if given, else `target_entropy_ratio * log(n_valid(s))`
  per state (the paper's `0.98 * -log(1/|A|)`, with |A| = number of valid candidates).

`alpha = exp(log_alpha)` enters the critic and actor losses stop-gradiented, so summing
the three losses (`sac_loss`) gives each parameter group exactly its own gradient.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rllama_jax.losses.common import (
    Array,
    categorical_entropy,
    masked_log_softmax,
    masked_softmax,
)


@struct.dataclass
class SACConfig:
    """Discrete SAC hyper-parameters (all static)."""

    target_entropy_ratio: float = struct.field(pytree_node=False, default=0.98)
    target_entropy: float | None = struct.field(pytree_node=False, default=None)


def _weighted_mean(x: Array, weights: Array | None) -> Array:
    """Mean of `x [B]` with optional per-sample weights `[B]` (0 if all weights are 0)."""
    if weights is None:
        return x.mean()
    chex.assert_equal_shape([x, weights])
    w = weights.astype(x.dtype)
    return (w * x).sum() / jnp.maximum(w.sum(), 1e-8)


def _expect_under_policy(logits: Array, mask: Array | None, per_action: Array) -> Array:
    """`sum_a pi(a) * per_action(a)` `[B]`, invalid actions contributing exactly 0."""
    terms = masked_softmax(logits, mask) * per_action
    if mask is not None:
        terms = jnp.where(mask.astype(bool), terms, 0.0)
    return terms.sum(axis=-1)


def soft_state_value(
    logits: Array, mask: Array | None, q1: Array, q2: Array, alpha: Array | float
) -> Array:
    """Soft value `V(s) = sum_a pi(a|s) (min(q1, q2)(s, a) - alpha log pi(a|s))`, `[B]`.

    Args:
      logits: `[B, A]` policy scores.
      mask: `[B, A]` valid actions, or `None`.
      q1, q2: `[B, A]` twin Q-values.
      alpha: temperature.

    A state without any valid action (terminal padding in a replay buffer) gets value 0.
    """
    chex.assert_equal_shape([logits, q1, q2])
    log_pi = masked_log_softmax(logits, mask)
    return _expect_under_policy(logits, mask, jnp.minimum(q1, q2) - alpha * log_pi)


def target_entropy(mask: Array | None, num_actions: int, config: SACConfig) -> Array:
    """Per-state target entropy `[B]` or scalar, following `SACConfig`."""
    if config.target_entropy is not None:
        return jnp.asarray(config.target_entropy, jnp.float32)
    if mask is None:
        return jnp.asarray(config.target_entropy_ratio * jnp.log(num_actions), jnp.float32)
    n_valid = jnp.maximum(mask.astype(jnp.float32).sum(axis=-1), 1.0)
    return config.target_entropy_ratio * jnp.log(n_valid)


def sac_critic_loss(
    q1: Array,
    q2: Array,
    actions: Array,
    rewards: Array,
    discounts: Array,
    next_logits: Array,
    next_mask: Array | None,
    next_q1_target: Array,
    next_q2_target: Array,
    alpha: Array | float,
    weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Twin soft-Q regression on the taken action.

    Args:
      q1, q2: `[B, A]` online Q heads at `s` (differentiable).
      actions: `[B]` int taken actions.
      rewards: `[B]`.
      discounts: `[B]`, `gamma * (1 - terminated)`.
      next_logits: `[B, A]` policy scores at `s'`.
      next_mask: `[B, A]` valid actions at `s'`, or `None`.
      next_q1_target, next_q2_target: `[B, A]` target Q heads at `s'`.
      alpha: temperature (stop-gradiented).
      weights: `[B]` per-sample weights, or `None`.

    Returns:
      `(loss, metrics)`; metrics: critic_loss, q1, q2, target.
    """
    chex.assert_rank([q1, actions, rewards, discounts], [2, 1, 1, 1])
    chex.assert_equal_shape([actions, rewards, discounts])
    chex.assert_axis_dimension(q1, 0, actions.shape[0])
    chex.assert_equal_shape([q1, q2, next_logits, next_q1_target, next_q2_target])
    alpha = jax.lax.stop_gradient(alpha)
    next_v = soft_state_value(next_logits, next_mask, next_q1_target, next_q2_target, alpha)
    y = jax.lax.stop_gradient(rewards + discounts * next_v)
    idx = actions[:, None].astype(jnp.int32)
    q1_a = jnp.take_along_axis(q1, idx, axis=-1)[:, 0]
    q2_a = jnp.take_along_axis(q2, idx, axis=-1)[:, 0]
    per_sample = 0.5 * (q1_a - y) ** 2 + 0.5 * (q2_a - y) ** 2
    loss = _weighted_mean(per_sample, weights)
    metrics = {
        "critic_loss": loss,
        "q1": _weighted_mean(jax.lax.stop_gradient(q1_a), weights),
        "q2": _weighted_mean(jax.lax.stop_gradient(q2_a), weights),
        "target": _weighted_mean(y, weights),
    }
    return loss, metrics


def sac_actor_loss(
    logits: Array,
    mask: Array | None,
    q1: Array,
    q2: Array,
    alpha: Array | float,
    weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Policy loss `E_s sum_a pi(a|s) (alpha log pi(a|s) - min(q1, q2)(s, a))`.

    Q-values and alpha are stop-gradiented: only the policy logits learn here.

    Args:
      logits: `[B, A]` policy scores at `s` (differentiable).
      mask: `[B, A]` valid actions, or `None`.
      q1, q2: `[B, A]` Q heads at `s`.
      alpha: temperature.
      weights: `[B]` per-sample weights, or `None`.

    Returns:
      `(loss, metrics)`; metrics: actor_loss, entropy.
    """
    chex.assert_equal_shape([logits, q1, q2])
    alpha = jax.lax.stop_gradient(alpha)
    min_q = jax.lax.stop_gradient(jnp.minimum(q1, q2))
    log_pi = masked_log_softmax(logits, mask)
    per_sample = _expect_under_policy(logits, mask, alpha * log_pi - min_q)
    loss = _weighted_mean(per_sample, weights)
    entropy = jax.lax.stop_gradient(categorical_entropy(logits, mask))
    return loss, {"actor_loss": loss, "entropy": _weighted_mean(entropy, weights)}


def sac_temperature_loss(
    log_alpha: Array,
    entropy: Array,
    target: Array | float,
    weights: Array | None = None,
) -> Array:
    """`mean_s -log_alpha * stop_grad(target - entropy(s))` (see module doc for the sign).

    Args:
      log_alpha: scalar, the learned log temperature.
      entropy: `[B]` policy entropy per state.
      target: scalar or `[B]` target entropy.
      weights: `[B]` per-sample weights, or `None`.
    """
    chex.assert_rank([log_alpha, entropy], [0, 1])
    gap = jax.lax.stop_gradient(jnp.broadcast_to(target, entropy.shape) - entropy)
    return _weighted_mean(-log_alpha * gap, weights)


def sac_loss(
    logits: Array,
    mask: Array | None,
    q1: Array,
    q2: Array,
    actions: Array,
    rewards: Array,
    discounts: Array,
    next_logits: Array,
    next_mask: Array | None,
    next_q1_target: Array,
    next_q2_target: Array,
    log_alpha: Array,
    weights: Array | None = None,
    config: SACConfig | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Critic + actor + temperature losses, summed (disjoint gradients; see module doc).

    Shapes: `logits, mask, q1, q2, next_*`: `[B, A]`; `actions, rewards, discounts,
    weights`: `[B]`; `log_alpha`: scalar; `config`: `SACConfig`, `None` for the defaults.

    Returns:
      `(loss, metrics)`; metrics: loss, critic_loss, actor_loss, temperature_loss,
      entropy, target_entropy, alpha, q1, q2, target.
    """
    config = SACConfig() if config is None else config
    alpha = jnp.exp(log_alpha)
    critic, critic_metrics = sac_critic_loss(
        q1,
        q2,
        actions,
        rewards,
        discounts,
        next_logits,
        next_mask,
        next_q1_target,
        next_q2_target,
        alpha,
        weights,
    )
    actor, actor_metrics = sac_actor_loss(logits, mask, q1, q2, alpha, weights)
    entropy = categorical_entropy(logits, mask)
    target = target_entropy(mask, logits.shape[-1], config)
    temperature = sac_temperature_loss(log_alpha, entropy, target, weights)
    loss = critic + actor + temperature
    metrics = {
        "loss": loss,
        "temperature_loss": temperature,
        "target_entropy": jnp.mean(target),
        "alpha": jax.lax.stop_gradient(alpha),
        **critic_metrics,
        **actor_metrics,
    }
    return loss, metrics
