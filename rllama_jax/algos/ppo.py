"""PPO (Schulman et al. 2017): GAE advantages, a clipped surrogate, a value head.

Per trajectory [N, T]: advantages and returns by GAE(lambda) along each row (a truncated
episode bootstraps from V(final observation), a row cut by the trajectory from the value of
the observation after it); then ``epochs`` passes of minibatch gradient steps on

    loss = clipped surrogate - ent_coef * entropy + vf_coef * value loss + kl_coef * KL(pi || ref)

The KL to the frozen reference (the base LLM's own policy) is exact in score mode (the full
categorical over the candidates) and the k3 estimate per reply token in generate mode, both
on the untruncated temperature-scaled distribution.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from rllama_jax.algos.base import Algorithm, LossInputs, Metrics, folded_rewards, register
from rllama_jax.losses import PPOConfig, gae, ppo_loss
from rllama_jax.trajectory import Trajectory


@register
@dataclasses.dataclass(frozen=True)
class PPO(Algorithm):
    """clip_eps: ratio clip; gae_lambda: GAE's lambda; epochs: passes over each trajectory;
    vf_coef, ent_coef: value-loss and entropy-bonus weights; kl_coef: weight of KL(pi ||
    reference) (0: no reference kept); kl_estimator: generate mode's per-token estimator;
    value_clip_eps: clip value updates around the acting-time values (None: off);
    normalize_advantages: standardise advantages per minibatch."""

    name: ClassVar[str] = "ppo"
    critic_heads: ClassVar[tuple[str, ...]] = ("value",)

    clip_eps: float = 0.2
    gae_lambda: float = 0.95
    epochs: int = 4  # type: ignore[assignment]  (a field here, a property on the base)
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    value_clip_eps: float | None = None
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def advantages(self, traj: Trajectory, gamma: float) -> tuple[jax.Array, jax.Array]:
        rewards, discounts = folded_rewards(traj, gamma)
        valid = traj.valid.astype(jnp.float32)
        values = traj.old_values.astype(jnp.float32) * valid
        adv, ret = gae(rewards, discounts, values, traj.bootstrap_value, self.gae_lambda)
        return adv * valid, ret * valid

    def loss(self, x: LossInputs) -> tuple[jax.Array, Metrics]:
        config = PPOConfig(
            clip_eps=self.clip_eps, vf_coef=self.vf_coef, ent_coef=self.ent_coef,
            kl_coef=self.kl_coef, kl_estimator=self.kl_estimator,
            value_clip_eps=self.value_clip_eps, normalize_advantages=self.normalize_advantages,
        )  # fmt: skip
        return ppo_loss(
            x.logp, x.old_logp, x.advantages, x.mask,
            values=x.values, returns=x.returns, old_values=x.old_values, value_mask=x.valid,
            entropy=x.entropy, ref_logp=x.ref_logp, kl=x.kl, config=config,
        )  # fmt: skip
