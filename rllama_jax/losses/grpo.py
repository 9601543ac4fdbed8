"""Group relative policy optimisation (GRPO, Shao et al. 2024 "DeepSeekMath").

No value head: each episode's return is compared with the other episodes of its group
(same prompt / same environment seed), `A_i = (R_i - mean_g R) / (std_g R + eps)`, and
that advantage is spread over every token (or turn) of the episode. The loss is PPO's
clipped surrogate plus `beta * KL(pi || pi_ref)` estimated per token with k3.

Normalisation convention (`group_advantages`): defaults `ddof=1`, `eps=1e-4`. That is
what TRL's `GRPOTrainer` does (`rewards.view(-1, G).std(dim=1)` is torch's *unbiased*
std, then `/ (std + 1e-4)`), and verl likewise uses torch's unbiased std; the
DeepSeekMath paper only says "normalised by the group std". Matching TRL keeps results
comparable with the most used implementation. `ddof=0` (population std) is available.
A group whose returns are all equal gets advantage 0 (not NaN); a group of one gets 0.
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
)
from rllama_jax.losses.ppo import clipped_surrogate_loss, clipped_surrogate_per_token


@struct.dataclass
class GRPOConfig:
    """GRPO hyper-parameters (all static).

    `aggregation="sequence_mean"` is the paper's `1/G sum_i 1/|o_i| sum_t`; use
    "token_mean" for the DAPO variant.
    """

    clip_eps: float = struct.field(pytree_node=False, default=0.2)
    beta: float = struct.field(pytree_node=False, default=0.04)
    kl_estimator: KLEstimator = struct.field(pytree_node=False, default="k3")
    aggregation: Aggregation = struct.field(pytree_node=False, default="sequence_mean")
    ent_coef: float = struct.field(pytree_node=False, default=0.0)


def group_advantages(
    returns: Array,
    group_ids: Array | None = None,
    group_size: int | None = None,
    eps: float = 1e-4,
    ddof: int = 1,
    valid: Array | None = None,
) -> Array:
    """Group-normalised advantages `(R - mean_group) / (std_group + eps)`.

    Give either `group_size` (episodes laid out as consecutive groups of `G`, `B % G == 0`)
    or `group_ids` (`[B]` ints, any values and layout, e.g. env seeds; groups may differ
    in size).

    Args:
      returns: `[B]` episode returns.
      group_ids: `[B]` int group label of each episode, or `None`.
      group_size: `G`, or `None`.
      eps: added to the std (TRL: 1e-4).
      ddof: std delta degrees of freedom; 1 = unbiased (TRL/verl), 0 = population.
      valid: `[B]` bool/float, episodes to include (e.g. padding rows excluded); `None`
        means all. Invalid episodes get advantage 0 and do not enter group statistics.

    Returns:
      `[B]` advantages (stop-gradiented: they are a learning signal).
    """
    chex.assert_rank(returns, 1)
    batch = returns.shape[0]
    returns = jax.lax.stop_gradient(returns)
    if group_ids is None:
        if group_size is None:
            raise ValueError("give group_ids or group_size")
        if batch % group_size != 0:
            raise ValueError(f"batch {batch} is not a multiple of group_size {group_size}")
        group_ids = jnp.arange(batch) // group_size
    chex.assert_shape(group_ids, (batch,))
    # Relabel to dense ids in [0, B) (static size, so this stays jit-compatible).
    _, group_ids = jnp.unique(group_ids, return_inverse=True, size=batch)
    group_ids = group_ids.reshape(batch)
    w = jnp.ones_like(returns) if valid is None else valid.astype(returns.dtype)
    chex.assert_shape(w, (batch,))

    def group_sum(x: Array) -> Array:
        sums = jax.ops.segment_sum(x, group_ids, num_segments=batch)
        return sums[group_ids]

    count = group_sum(w)
    mean = group_sum(w * returns) / jnp.maximum(count, 1.0)
    sq_dev = group_sum(w * (returns - mean) ** 2)
    std = jnp.sqrt(sq_dev / jnp.maximum(count - ddof, 1.0))
    return jnp.where(w > 0, (returns - mean) / (std + eps), 0.0)


def grpo_loss(
    logp: Array,
    advantages: Array,
    mask: Array,
    old_logp: Array | None = None,
    ref_logp: Array | None = None,
    config: GRPOConfig | None = None,
    kl: Array | None = None,
    entropy: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """GRPO loss: per-token `-min(r A, clip(r) A) + beta * KL - ent_coef * H`, aggregated.

    Args:
      logp: `[B, T]` log pi_theta of the episode's tokens/actions.
      advantages: `[B]` (from `group_advantages`, spread over T) or `[B, T]`.
      mask: `[B, T]` validity.
      old_logp: `[B, T]` log pi_old; `None` means a single update per batch
        (`old_logp = stop_grad(logp)`, ratio 1, gradient = plain policy gradient).
      ref_logp: `[B, T]` log pi_ref; `None` drops the KL term.
      config: `GRPOConfig`; `None` for the defaults.
      kl: `[B, T]` per-position KL(pi || pi_ref) known exactly, used instead of the
        estimator on `ref_logp`.
      entropy: `[B, T]` entropy of the policy at each position; with `config.ent_coef > 0`
        its bonus keeps a group's rows from all playing alike (the exact KL's gradient
        vanishes once the policy is deterministic, and so does every group advantage).

    Returns:
      `(loss, metrics)`; metrics: loss, policy_loss, kl_ref, approx_kl, clip_fraction,
      ratio_mean, and entropy when given.
    """
    config = GRPOConfig() if config is None else config
    advantages = broadcast_to_tokens(advantages, logp)
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    _, metrics = clipped_surrogate_loss(
        logp, old_logp, advantages, mask, config.clip_eps, config.aggregation
    )
    ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
    per_token_pg = clipped_surrogate_per_token(ratio, advantages, config.clip_eps)
    if kl is not None:
        per_token_kl = kl
    elif ref_logp is None:
        per_token_kl = jnp.zeros_like(logp)
    else:
        per_token_kl = kl_estimate(logp, jax.lax.stop_gradient(ref_logp), config.kl_estimator)
    # One aggregation of the summed per-token loss, as in the paper.
    per_token = per_token_pg + config.beta * per_token_kl
    extra = {}
    if entropy is not None:
        per_token = per_token - config.ent_coef * entropy
        extra["entropy"] = masked_mean(entropy, mask, config.aggregation)
    elif config.ent_coef:
        raise ValueError("GRPOConfig.ent_coef > 0 needs the policy's entropy")
    loss = masked_mean(per_token, mask, config.aggregation)
    metrics = {
        **extra,
        "loss": loss,
        "policy_loss": masked_mean(per_token_pg, mask, config.aggregation),
        "kl_ref": masked_mean(per_token_kl, mask, config.aggregation),
        **metrics,
    }
    return loss, metrics
