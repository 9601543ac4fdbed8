"""GRPO (Shao et al. 2024): group-normalised episode returns, no critic.

The rollout lays out one episode per row in groups of ``group_size`` rows that start from
the same seed. Each row's advantage is its episode return standardised within its group,
spread over all its turns (or reply tokens); then ``epochs`` passes of

    loss = clipped surrogate(ratio, advantage) + kl_coef * KL(pi || ref) - ent_coef * entropy

aggregated per sequence as in the paper. A group whose rows cannot share a start state
(the agent's single-env loop, where the user steps the environment) is the batch: the
advantage is then the return against the batch mean, scaled by the batch's spread.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from rllama_jax.algos.base import Algorithm, LossInputs, Metrics, register
from rllama_jax.losses import GRPOConfig, group_advantages, grpo_loss
from rllama_jax.trajectory import Trajectory


@register
@dataclasses.dataclass(frozen=True)
class GRPO(Algorithm):
    """group_size: rows per group (>= 2); clip_eps: ratio clip; epochs: passes over each
    trajectory; kl_coef: the paper's beta (0: no reference kept); kl_estimator: generate
    mode's per-token estimator; aggregation: "sequence_mean" (paper) or "token_mean";
    ent_coef: entropy bonus (not in the paper; 0 there). Without it a policy that turns
    deterministic plays every row of a group alike, every group advantage is 0 and, with
    the exact score-mode KL whose gradient vanishes at a one-hot policy, learning stops."""

    name: ClassVar[str] = "grpo"
    whole_episodes: ClassVar[bool] = True

    group_size: int = 8  # type: ignore[assignment]  (a field here, a property on the base)
    clip_eps: float = 0.2
    epochs: int = 4  # type: ignore[assignment]
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    aggregation: str = "sequence_mean"
    ent_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got "
                             f"{self.group_size}")  # fmt: skip
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def advantages(self, traj: Trajectory, gamma: float) -> tuple[jax.Array, jax.Array]:
        if traj.group_ids is None:
            raise ValueError("GRPO trajectories need group_ids [N] (rows grouped by start seed)")
        valid = traj.valid.astype(jnp.float32)
        episode_return = jnp.sum(traj.rewards.astype(jnp.float32) * valid, axis=1)
        row_adv = group_advantages(
            episode_return, group_ids=traj.group_ids, valid=jnp.any(traj.valid, axis=1),
            eps=1e-4, ddof=1,
        )  # fmt: skip
        adv = jnp.broadcast_to(row_adv[:, None], valid.shape) * valid
        ret = jnp.broadcast_to(episode_return[:, None], valid.shape) * valid
        return adv, ret

    def loss(self, x: LossInputs) -> tuple[jax.Array, Metrics]:
        config = GRPOConfig(
            clip_eps=self.clip_eps, beta=self.kl_coef, kl_estimator=self.kl_estimator,
            aggregation=self.aggregation, ent_coef=self.ent_coef,
        )  # fmt: skip
        return grpo_loss(
            x.logp, x.advantages, x.mask, old_logp=x.old_logp,
            ref_logp=x.ref_logp if self.needs_reference else None,
            kl=x.kl if self.needs_reference else None, config=config,
            entropy=x.entropy if self.ent_coef else None,
        )  # fmt: skip
