"""Deep Q-learning over candidate actions (score mode), with action masks.

In a text environment the candidate actions of a state are strings, scored by a Q-head on
the LLM's hidden states: `q [B, A]` with a validity mask `[B, A]` (padding candidates,
illegal moves). An invalid action must never be the greedy choice nor a bootstrap target.

Pieces: masked Q-values / argmax, the (double) Q-learning target and TD error, Huber
loss, epsilon-greedy exploration over valid actions, a linear epsilon schedule, and the
Polyak / periodic target-network updates on parameter pytrees.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rllama_jax.losses.common import NEG_INF, Array, masked_logits


@struct.dataclass
class DQNConfig:
    """DQN hyper-parameters (all static).

    `double=True`: double DQN (van Hasselt et al. 2016), the online network picks the
    next action and the target network evaluates it. `double=False`: plain Q-learning,
    max of the target network. `huber_delta=None` uses the squared error `0.5 td^2`.
    `epsilon`: exploration of the acting policy, epsilon-greedy over the Q-values (the
    greedy action with probability 1 - epsilon, otherwise a uniformly random valid one).
    """

    double: bool = struct.field(pytree_node=False, default=True)
    huber_delta: float | None = struct.field(pytree_node=False, default=1.0)
    epsilon: float = struct.field(pytree_node=False, default=0.1)


def epsilon_greedy_logits(q: Array, mask: Array | None, epsilon: float) -> Array:
    """Log-probabilities `[B, A]` of the epsilon-greedy policy over `q [B, A]` (valid
    actions only; ties go to the first maximum)."""
    q = masked_q_values(q, mask)
    valid = jnp.ones(q.shape, bool) if mask is None else mask.astype(bool)
    n = valid.sum(-1, keepdims=True).astype(jnp.float32)
    best = jax.nn.one_hot(jnp.argmax(q, axis=-1), q.shape[-1], dtype=jnp.float32)
    probs = (1.0 - epsilon) * best + epsilon * valid / n
    return jnp.where(valid, jnp.log(jnp.maximum(probs, 1e-30)), NEG_INF)


def masked_q_values(q: Array, mask: Array | None) -> Array:
    """`q [B, A]` with invalid actions set to `NEG_INF` (finite, so `0 * q` stays 0)."""
    return masked_logits(q, mask)


def masked_argmax(q: Array, mask: Array | None) -> Array:
    """Greedy action `[B]` among valid actions of `q [B, A]` (ties: lowest index)."""
    return jnp.argmax(masked_q_values(q, mask), axis=-1)


def huber_loss(x: Array, delta: float = 1.0) -> Array:
    """Elementwise Huber loss: `0.5 x^2` for `|x| <= delta`, `delta (|x| - delta/2)` beyond."""
    abs_x = jnp.abs(x)
    quadratic = jnp.minimum(abs_x, delta)
    return 0.5 * quadratic**2 + delta * (abs_x - quadratic)


def q_learning_target(
    rewards: Array,
    discounts: Array,
    next_q_target: Array,
    next_mask: Array | None = None,
    next_q_online: Array | None = None,
    double: bool = True,
) -> Array:
    """Bootstrapped target `r + discount * Q_target(s', a*)`, stop-gradiented.

    `a* = argmax_valid Q_online(s', .)` when `double`, else `argmax_valid Q_target(s', .)`
    (i.e. the masked max). A next state with no valid action contributes 0 (it can only
    be terminal; its discount should already be 0).

    Args:
      rewards: `[B]`.
      discounts: `[B]`, `gamma * (1 - terminated)`.
      next_q_target: `[B, A]` target-network Q at `s'`.
      next_mask: `[B, A]` valid actions at `s'`, or `None` (all valid).
      next_q_online: `[B, A]` online-network Q at `s'`; required iff `double`.
      double: double-DQN action selection.

    Returns:
      `[B]` targets.
    """
    chex.assert_rank([rewards, discounts, next_q_target], [1, 1, 2])
    chex.assert_equal_shape([rewards, discounts])
    chex.assert_axis_dimension(next_q_target, 0, rewards.shape[0])
    if double:
        if next_q_online is None:
            raise ValueError("double Q-learning needs next_q_online")
        chex.assert_equal_shape([next_q_online, next_q_target])
        selector = next_q_online
    else:
        selector = next_q_target
    a_star = masked_argmax(selector, next_mask)
    next_value = jnp.take_along_axis(next_q_target, a_star[:, None], axis=-1)[:, 0]
    if next_mask is not None:
        next_value = jnp.where(next_mask.astype(bool).any(axis=-1), next_value, 0.0)
    return jax.lax.stop_gradient(rewards + discounts * next_value)


def td_errors(
    q: Array,
    actions: Array,
    rewards: Array,
    discounts: Array,
    next_q_target: Array,
    next_mask: Array | None = None,
    next_q_online: Array | None = None,
    double: bool = True,
) -> Array:
    """TD errors `target - Q(s, a)` `[B]` (also what a prioritised replay stores).

    Args:
      q: `[B, A]` online Q at `s` (differentiable).
      actions: `[B]` int taken actions.
      (rest as in `q_learning_target`).
    """
    chex.assert_rank([q, actions], [2, 1])
    chex.assert_equal_shape([actions, rewards])
    chex.assert_equal_shape([q, next_q_target])
    q_taken = jnp.take_along_axis(q, actions[:, None].astype(jnp.int32), axis=-1)[:, 0]
    target = q_learning_target(rewards, discounts, next_q_target, next_mask, next_q_online, double)
    return target - q_taken


def dqn_loss(
    q: Array,
    actions: Array,
    rewards: Array,
    discounts: Array,
    next_q_target: Array,
    next_mask: Array | None = None,
    next_q_online: Array | None = None,
    weights: Array | None = None,
    config: DQNConfig | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Mean Huber (or squared) TD loss and metrics.

    Args:
      q: `[B, A]` online Q at `s`.
      actions: `[B]` taken actions.
      rewards: `[B]`.
      discounts: `[B]`.
      next_q_target: `[B, A]` target-network Q at `s'`.
      next_mask: `[B, A]` valid actions at `s'`.
      next_q_online: `[B, A]` online Q at `s'` (double DQN).
      weights: `[B]` per-sample weights (replay validity, importance weights), or `None`.
      config: `DQNConfig`; `None` for the defaults.

    Returns:
      `(loss, metrics)`; metrics: loss, td_abs, q_taken, target.
    """
    config = DQNConfig() if config is None else config
    td = td_errors(
        q, actions, rewards, discounts, next_q_target, next_mask, next_q_online, config.double
    )
    per_sample = 0.5 * td**2 if config.huber_delta is None else huber_loss(td, config.huber_delta)
    w = jnp.ones_like(td) if weights is None else weights.astype(td.dtype)
    chex.assert_equal_shape([td, w])
    denom = jnp.maximum(w.sum(), 1e-8)
    loss = (w * per_sample).sum() / denom
    q_taken = jnp.take_along_axis(q, actions[:, None].astype(jnp.int32), axis=-1)[:, 0]
    metrics = {
        "loss": loss,
        "td_abs": jax.lax.stop_gradient((w * jnp.abs(td)).sum() / denom),
        "q_taken": jax.lax.stop_gradient((w * q_taken).sum() / denom),
        "target": jax.lax.stop_gradient((w * (td + q_taken)).sum() / denom),
    }
    return loss, metrics


def epsilon_greedy(key: Array, q: Array, mask: Array | None, epsilon: float | Array) -> Array:
    """Epsilon-greedy actions `[B]`: uniform over *valid* actions w.p. epsilon, else greedy.

    Args:
      key: PRNG key.
      q: `[B, A]` Q-values.
      mask: `[B, A]` valid actions (at least one per row), or `None`.
      epsilon: exploration probability (scalar, may be traced).
    """
    chex.assert_rank(q, 2)
    explore_key, action_key = jax.random.split(key)
    greedy = masked_argmax(q, mask)
    uniform_logits = (
        jnp.zeros_like(q) if mask is None else jnp.where(mask.astype(bool), 0.0, NEG_INF)
    )
    random = jax.random.categorical(action_key, uniform_logits, axis=-1)
    explore = jax.random.uniform(explore_key, greedy.shape) < epsilon
    return jnp.where(explore, random, greedy)


def linear_epsilon(
    step: int | Array, start: float = 1.0, end: float = 0.05, decay_steps: int = 10_000
) -> Array:
    """Epsilon decaying linearly from `start` to `end` over `decay_steps`, then constant."""
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / max(decay_steps, 1), 0.0, 1.0)
    return start + fraction * (end - start)


def polyak_update(
    target: chex.ArrayTree, online: chex.ArrayTree, tau: float | Array
) -> chex.ArrayTree:
    """Soft target update `(1 - tau) * target + tau * online`, leafwise.

    `tau = 1` copies `online`, `tau = 0` keeps `target` (both exactly).
    """
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


def periodic_update(
    target: chex.ArrayTree, online: chex.ArrayTree, step: int | Array, period: int
) -> chex.ArrayTree:
    """Hard target update: `online` when `step % period == 0`, else `target`.

    `step` may be traced; the choice is a `jnp.where`, so there is no Python branch.
    """
    do_update = jnp.asarray(step) % period == 0
    return jax.tree.map(lambda t, o: jnp.where(do_update, o, t), target, online)
