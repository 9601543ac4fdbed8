"""A2C (Mnih et al. 2016, synchronous): n-step returns, one policy-gradient step per batch.

Per trajectory [N, T]: the n-step return of every turn, bootstrapped from the value head
(``n_step`` turns ahead, or earlier where the episode ends or the trajectory stops), the
advantage ``return - V``; then ONE pass of gradient steps (vanilla policy gradient has no
importance correction, so a second pass over the same data would be off-policy):

    loss = -logp * advantage - ent_coef * entropy + vf_coef * 0.5 (V - return)^2
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from rllama_jax.algos.base import Algorithm, LossInputs, Metrics, folded_rewards, register
from rllama_jax.losses import A2CConfig, a2c_loss, n_step_returns
from rllama_jax.trajectory import Trajectory


@register
@dataclasses.dataclass(frozen=True)
class A2C(Algorithm):
    """n_step: bootstrapping horizon; vf_coef, ent_coef: value-loss and entropy weights;
    normalize_advantages: standardise advantages per minibatch."""

    name: ClassVar[str] = "a2c"
    critic_heads: ClassVar[tuple[str, ...]] = ("value",)

    n_step: int = 5
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.n_step}")

    def advantages(self, traj: Trajectory, gamma: float) -> tuple[jax.Array, jax.Array]:
        rewards, discounts = folded_rewards(traj, gamma)
        valid = traj.valid.astype(jnp.float32)
        values = traj.old_values.astype(jnp.float32) * valid
        ret = n_step_returns(rewards, discounts, values, traj.bootstrap_value, self.n_step)
        return (ret - values) * valid, ret * valid

    def loss(self, x: LossInputs) -> tuple[jax.Array, Metrics]:
        config = A2CConfig(
            vf_coef=self.vf_coef, ent_coef=self.ent_coef,
            normalize_advantages=self.normalize_advantages,
        )  # fmt: skip
        return a2c_loss(
            x.logp, x.advantages, x.mask, x.values, x.returns,
            entropy=x.entropy, value_mask=x.valid, config=config,
        )  # fmt: skip
