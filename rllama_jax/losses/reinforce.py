"""REINFORCE (Williams 1992): Monte-Carlo returns with an optional baseline.

`loss = -logp * stop_grad(G - b) [+ vf_coef * 0.5 (G - V)^2] - ent_coef * H`

Baselines (`ReinforceConfig.baseline`):
  * "none":  b = 0.
  * "mean":  b = batch mean of the valid returns (stop-gradiented). It includes each
    sample's own return, so it carries an O(1/N) bias; fine for the batch sizes used.
  * "value": b = stop_grad(V(s)), a learned value head; its regression loss
    `0.5 (G - V)^2` is then added with weight `vf_coef`.
With `normalize_returns` the baselined returns `G - b` are standardised over the batch.

Compute `returns` with `common.discounted_returns(rewards, discounts, zeros)`.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rllama_jax.losses.a2c import policy_gradient_loss, value_loss
from rllama_jax.losses.common import (
    Aggregation,
    Array,
    broadcast_to_tokens,
    masked_mean,
    normalize,
    row_mask,
)

Baseline = Literal["none", "mean", "value"]


@struct.dataclass
class ReinforceConfig:
    """REINFORCE hyper-parameters (all static)."""

    baseline: Baseline = struct.field(pytree_node=False, default="mean")
    normalize_returns: bool = struct.field(pytree_node=False, default=False)
    vf_coef: float = struct.field(pytree_node=False, default=0.5)
    ent_coef: float = struct.field(pytree_node=False, default=0.0)
    aggregation: Aggregation = struct.field(pytree_node=False, default="token_mean")


def reinforce_loss(
    logp: Array,
    returns: Array,
    mask: Array,
    values: Array | None = None,
    entropy: Array | None = None,
    config: ReinforceConfig | None = None,
) -> tuple[Array, dict[str, Array]]:
    """REINFORCE loss and metrics.

    Args:
      logp: `[B, T]` log pi of taken tokens/actions.
      returns: `[B, T]` (one per position, score mode) or `[B]` (one per row, spread over
        the row's tokens, generate mode) Monte-Carlo returns.
      mask: `[B, T]` validity. For `[B]` returns a row counts if it has a valid token.
      values: same shape as `returns`; required iff `config.baseline == "value"`.
      entropy: `[B, T]` per-position entropy, or `None`.
      config: `ReinforceConfig`; `None` for the defaults.

    Returns:
      `(loss, metrics)`; metrics: loss, policy_loss, value_loss, entropy, baseline,
      return_mean.
    """
    config = ReinforceConfig() if config is None else config
    returns_mask = row_mask(mask) if returns.ndim == 1 and logp.ndim == 2 else mask
    chex.assert_equal_shape([returns, returns_mask])
    returns = jax.lax.stop_gradient(returns)
    zero = jnp.zeros((), logp.dtype)
    vl = zero
    if config.baseline == "none":
        baseline = jnp.zeros_like(returns)
    elif config.baseline == "mean":
        baseline = jnp.broadcast_to(masked_mean(returns, returns_mask), returns.shape)
    elif config.baseline == "value":
        if values is None:
            raise ValueError('baseline="value" needs values')
        chex.assert_equal_shape([values, returns])
        baseline = jax.lax.stop_gradient(values)
        vl = value_loss(values, returns, returns_mask)
    else:
        raise ValueError(f"unknown baseline {config.baseline!r}")
    advantages = returns - baseline
    if config.normalize_returns:
        advantages = normalize(advantages, returns_mask)
    pg = policy_gradient_loss(logp, broadcast_to_tokens(advantages, logp), mask, config.aggregation)
    ent = zero if entropy is None else masked_mean(entropy, mask, config.aggregation)
    loss = pg + config.vf_coef * vl - config.ent_coef * ent
    metrics = {
        "loss": loss,
        "policy_loss": pg,
        "value_loss": vl,
        "entropy": ent,
        "baseline": masked_mean(baseline, returns_mask),
        "return_mean": masked_mean(returns, returns_mask),
    }
    return loss, metrics
