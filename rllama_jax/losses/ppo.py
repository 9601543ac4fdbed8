"""Proximal policy optimisation (clipped surrogate) on generic `[B, T]` log-probabilities.

`loss = PG_clip + vf_coef * V_clip - ent_coef * H + kl_coef * KL(pi || pi_ref)`

* `PG_clip`: `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)` per token, with
  `ratio = exp(logp - old_logp)`, aggregated over the token mask.
* `V_clip`: `0.5 * (V - R)^2`, or with `value_clip_eps` the pessimistic clipped form
  `0.5 * max((V - R)^2, (V_old + clip(V - V_old, -e, e) - R)^2)`.
* `H`: entropy passed in as an array (the model is never called here).
* `KL`: an estimator (`common.kl_estimate`) of the KL to a frozen reference policy, for
  keeping an LLM close to its pre-trained self (optional, `kl_coef=0` disables).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rllama_jax.losses.common import (
    Aggregation,
    Array,
    KLEstimator,
    broadcast_to_tokens,
    kl_estimate,
    masked_mean,
    normalize,
)


@struct.dataclass
class PPOConfig:
    """PPO hyper-parameters (all static: changing one recompiles).

    `value_clip_eps=None` disables value clipping (then `old_values` is not needed).
    """

    clip_eps: float = struct.field(pytree_node=False, default=0.2)
    vf_coef: float = struct.field(pytree_node=False, default=0.5)
    ent_coef: float = struct.field(pytree_node=False, default=0.01)
    kl_coef: float = struct.field(pytree_node=False, default=0.0)
    kl_estimator: KLEstimator = struct.field(pytree_node=False, default="k3")
    value_clip_eps: float | None = struct.field(pytree_node=False, default=None)
    aggregation: Aggregation = struct.field(pytree_node=False, default="token_mean")
    normalize_advantages: bool = struct.field(pytree_node=False, default=False)


def clipped_surrogate_per_token(ratio: Array, advantages: Array, clip_eps: float) -> Array:
    """Per-token clipped surrogate loss `-min(ratio * A, clip(ratio, 1±eps) * A)`.

    Args:
      ratio: `[B, T]` importance ratio pi / pi_old (differentiable).
      advantages: `[B, T]`, stop-gradiented here.
      clip_eps: clipping epsilon.

    Returns:
      `[B, T]` per-token loss (not yet masked).
    """
    chex.assert_equal_shape([ratio, advantages])
    advantages = jax.lax.stop_gradient(advantages)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -jnp.minimum(ratio * advantages, clipped * advantages)


def clipped_surrogate_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip_eps: float = 0.2,
    aggregation: Aggregation = "token_mean",
) -> tuple[Array, dict[str, Array]]:
    """PPO clipped policy loss, aggregated over the mask.

    Args:
      logp: `[B, T]` log pi_theta of the taken tokens/actions.
      old_logp: `[B, T]` log pi_old (behaviour policy at collection time).
      advantages: `[B, T]` or `[B]` (broadcast over T).
      mask: `[B, T]` validity.
      clip_eps: clipping epsilon.
      aggregation: see `common.masked_sum_and_denominator`.

    Returns:
      `(loss, metrics)`; metrics: approx_kl (k3 estimate of KL(pi_old || pi)),
      clip_fraction (share of valid tokens whose ratio left [1-eps, 1+eps]), ratio_mean.
    """
    advantages = broadcast_to_tokens(advantages, logp)
    chex.assert_equal_shape([logp, old_logp, advantages, mask])
    log_ratio = logp - jax.lax.stop_gradient(old_logp)
    ratio = jnp.exp(log_ratio)
    loss = masked_mean(clipped_surrogate_per_token(ratio, advantages, clip_eps), mask, aggregation)
    sg_log_ratio = jax.lax.stop_gradient(log_ratio)
    metrics = {
        # Samples come from pi_old, so this k3 estimates KL(pi_old || pi).
        "approx_kl": masked_mean(jnp.expm1(sg_log_ratio) - sg_log_ratio, mask),
        "clip_fraction": masked_mean(
            (jnp.abs(jnp.expm1(sg_log_ratio)) > clip_eps).astype(logp.dtype), mask
        ),
        "ratio_mean": masked_mean(jnp.exp(sg_log_ratio), mask),
    }
    return loss, metrics


def clipped_value_loss(
    values: Array,
    returns: Array,
    old_values: Array | None = None,
    mask: Array | None = None,
    clip_eps: float | None = None,
) -> Array:
    """Value regression `0.5 * (V - R)^2`, optionally PPO-clipped around `old_values`.

    Args:
      values: `[B]` or `[B, T]` predictions (differentiable).
      returns: same shape, targets (stop-gradiented).
      old_values: same shape, predictions at collection time; required iff `clip_eps`.
      mask: same shape or `None` (all valid).
      clip_eps: `None` for the plain squared error.

    Returns:
      scalar loss.
    """
    chex.assert_equal_shape([values, returns])
    mask = jnp.ones_like(values) if mask is None else mask
    returns = jax.lax.stop_gradient(returns)
    err = (values - returns) ** 2
    if clip_eps is not None:
        if old_values is None:
            raise ValueError("value clipping needs old_values")
        chex.assert_equal_shape([values, old_values])
        old_values = jax.lax.stop_gradient(old_values)
        clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        err = jnp.maximum(err, (clipped_values - returns) ** 2)
    return masked_mean(0.5 * err, mask)


def ppo_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    values: Array | None = None,
    returns: Array | None = None,
    old_values: Array | None = None,
    value_mask: Array | None = None,
    entropy: Array | None = None,
    ref_logp: Array | None = None,
    config: PPOConfig | None = None,
    kl: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Full PPO loss and metrics.

    Args:
      logp: `[B, T]` log pi_theta of taken tokens/actions.
      old_logp: `[B, T]` log pi_old.
      advantages: `[B, T]` or `[B]`.
      mask: `[B, T]` token/turn validity.
      values: `[B]` or `[B, T']` value predictions, or `None` (no critic).
      returns: same shape as `values`, value targets.
      old_values: same shape as `values`, needed when `config.value_clip_eps` is set.
      value_mask: same shape as `values`, or `None` (all valid).
      entropy: `[B, T]` per-position entropy, or `None` (no bonus).
      ref_logp: `[B, T]` log pi_ref of the same tokens, or `None` (no KL penalty).
      config: `PPOConfig`; `None` for the defaults.
      kl: `[B, T]` per-position KL(pi || pi_ref) known exactly (e.g. over a small set of
        candidate actions), used instead of estimating it from `ref_logp`.

    Returns:
      `(loss, metrics)`; metrics: loss, policy_loss, value_loss, entropy, approx_kl,
      clip_fraction, ratio_mean, kl_ref.
    """
    config = PPOConfig() if config is None else config
    advantages = broadcast_to_tokens(advantages, logp)
    if config.normalize_advantages:
        advantages = normalize(advantages, mask)
    pg, metrics = clipped_surrogate_loss(
        logp, old_logp, advantages, mask, config.clip_eps, config.aggregation
    )
    zero = jnp.zeros((), logp.dtype)
    if values is None:
        vl = zero
    else:
        if returns is None:
            raise ValueError("values given without returns")
        vl = clipped_value_loss(values, returns, old_values, value_mask, config.value_clip_eps)
    ent = zero if entropy is None else masked_mean(entropy, mask, config.aggregation)
    if kl is not None:
        kl = masked_mean(kl, mask, config.aggregation)
    elif ref_logp is None:
        kl = zero
    else:
        ref_logp = jax.lax.stop_gradient(ref_logp)
        kl = masked_mean(kl_estimate(logp, ref_logp, config.kl_estimator), mask, config.aggregation)
    loss = pg + config.vf_coef * vl - config.ent_coef * ent + config.kl_coef * kl
    metrics = {
        "loss": loss,
        "policy_loss": pg,
        "value_loss": vl,
        "entropy": ent,
        "kl_ref": kl,
        **metrics,
    }
    return loss, metrics
