"""Advantage actor-critic (A2C) loss on generic `[B, T]` log-probabilities.

`loss = PG + vf_coef * V - ent_coef * H`, with
  PG = -logp * stop_grad(advantage)      (aggregated over the token mask)
  V  = 0.5 * (returns - values)^2        (mean over valid value entries)
  H  = entropy of the policy             (aggregated over the token mask)

Works for token-level policies (generate mode: `logp [B, L]` over generated tokens with
one advantage per turn `[B]` broadcast to the tokens) and action-level policies (score
mode: one log-prob per turn, `[B, T]` with a turn mask, or `[B, 1]`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rllama_jax.losses.common import (
    Aggregation,
    Array,
    broadcast_to_tokens,
    masked_mean,
    normalize,
)


@struct.dataclass
class A2CConfig:
    """A2C hyper-parameters (all static: changing one recompiles)."""

    vf_coef: float = struct.field(pytree_node=False, default=0.5)
    ent_coef: float = struct.field(pytree_node=False, default=0.01)
    aggregation: Aggregation = struct.field(pytree_node=False, default="token_mean")
    normalize_advantages: bool = struct.field(pytree_node=False, default=False)


def policy_gradient_loss(
    logp: Array, advantages: Array, mask: Array, aggregation: Aggregation = "token_mean"
) -> Array:
    """Score-function policy-gradient loss `-logp * stop_grad(advantages)`, aggregated.

    Args:
      logp: `[B, T]` log pi of the taken tokens/actions.
      advantages: `[B, T]` or `[B]` (broadcast over T). Never differentiated.
      mask: `[B, T]` validity (bool or float weights).
      aggregation: see `common.masked_sum_and_denominator`.

    Returns:
      scalar loss.
    """
    advantages = jax.lax.stop_gradient(broadcast_to_tokens(advantages, logp))
    chex.assert_equal_shape([logp, advantages, mask])
    return masked_mean(-logp * advantages, mask, aggregation)


def value_loss(values: Array, returns: Array, mask: Array | None = None) -> Array:
    """`0.5 * (returns - values)^2` averaged over valid entries; `returns` is a target.

    Args:
      values: `[B]` or `[B, T]` value predictions.
      returns: same shape, regression targets (stop-gradiented).
      mask: same shape or `None` (all valid).
    """
    chex.assert_equal_shape([values, returns])
    mask = jnp.ones_like(values) if mask is None else mask
    returns = jax.lax.stop_gradient(returns)
    return masked_mean(0.5 * (returns - values) ** 2, mask)


def a2c_loss(
    logp: Array,
    advantages: Array,
    mask: Array,
    values: Array,
    returns: Array,
    entropy: Array | None = None,
    value_mask: Array | None = None,
    config: A2CConfig | None = None,
) -> tuple[Array, dict[str, Array]]:
    """A2C loss and metrics.

    Args:
      logp: `[B, T]` log pi of taken tokens/actions (differentiable).
      advantages: `[B, T]` or `[B]`, e.g. from `common.gae` or `returns - values`.
      mask: `[B, T]` token/turn validity.
      values: `[B]` or `[B, T']` value predictions (differentiable).
      returns: same shape as `values`, targets.
      entropy: `[B, T]` per-position policy entropy, or `None` for no bonus.
      value_mask: same shape as `values`, or `None` (all valid).
      config: `A2CConfig`; `None` for the defaults.

    Returns:
      `(loss, metrics)`; metrics: loss, policy_loss, value_loss, entropy.
    """
    config = A2CConfig() if config is None else config
    advantages = broadcast_to_tokens(advantages, logp)
    if config.normalize_advantages:
        advantages = normalize(advantages, mask)
    pg = policy_gradient_loss(logp, advantages, mask, config.aggregation)
    vl = value_loss(values, returns, value_mask)
    ent = jnp.zeros(()) if entropy is None else masked_mean(entropy, mask, config.aggregation)
    loss = pg + config.vf_coef * vl - config.ent_coef * ent
    metrics = {"loss": loss, "policy_loss": pg, "value_loss": vl, "entropy": ent}
    return loss, metrics
