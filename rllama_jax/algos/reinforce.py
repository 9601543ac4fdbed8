"""REINFORCE (Williams 1992): Monte-Carlo returns of whole episodes, one pass per batch.

The rollout lays out one episode per row (``whole_episodes``): every row starts a fresh
episode and plays it to its end or to the trajectory's last turn, so the return-to-go of a
turn is the sum of the rewards that really followed it; nothing is bootstrapped (there is
no critic to bootstrap from). An episode longer than the trajectory is cut there: size the
trajectory (``steps_per_update`` / the agent's ``max_episode_turns``) to the episodes.

    loss = -logp * (G_t - baseline) - ent_coef * entropy [+ vf_coef * 0.5 (V - G_t)^2]

baseline: "mean" (the minibatch's mean return), "value" (a learned value head) or "none".
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from rllama_jax.algos.base import Algorithm, LossInputs, Metrics, register
from rllama_jax.losses import (
    ReinforceConfig,
    discounted_returns,
    discounts_from_dones,
    reinforce_loss,
)
from rllama_jax.trajectory import Trajectory


@register
@dataclasses.dataclass(frozen=True)
class Reinforce(Algorithm):
    """baseline: "mean" | "value" | "none"; normalize_advantages: standardise the baselined
    returns; vf_coef: value-head loss weight (baseline "value"); ent_coef: entropy bonus."""

    name: ClassVar[str] = "reinforce"
    whole_episodes: ClassVar[bool] = True

    baseline: str = "mean"
    normalize_advantages: bool = False
    vf_coef: float = 0.5
    ent_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.baseline not in ("mean", "value", "none"):
            raise ValueError(f"baseline={self.baseline!r} is not mean, value or none")

    def head_names(self, trainable: str) -> tuple[str, ...]:
        value = ("value",) if self.baseline == "value" else ()
        return value + super().head_names(trainable)

    def advantages(self, traj: Trajectory, gamma: float) -> tuple[jax.Array, jax.Array]:
        valid = traj.valid.astype(jnp.float32)
        rewards = traj.rewards.astype(jnp.float32) * valid
        discounts = discounts_from_dones(traj.terminated, gamma) * valid
        ret = discounted_returns(rewards, discounts, jnp.zeros_like(traj.bootstrap_value))
        return ret * valid, ret * valid

    def loss(self, x: LossInputs) -> tuple[jax.Array, Metrics]:
        config = ReinforceConfig(
            baseline=self.baseline, normalize_returns=self.normalize_advantages,
            vf_coef=self.vf_coef, ent_coef=self.ent_coef,
        )  # fmt: skip
        values = x.values if self.baseline == "value" else None
        return reinforce_loss(
            x.logp, x.returns, x.mask, values=values, entropy=x.entropy, config=config
        )
