"""DQN (Mnih et al. 2015) over candidate actions: a Q head, n-step targets, a replay buffer
and a target network; double DQN by default (van Hasselt et al. 2016).

Score mode only (the Q head reads each candidate's hidden state). Acting is epsilon-greedy
over the Q-values, epsilon decaying linearly from ``epsilon_start`` to ``epsilon_end`` over
``epsilon_decay`` train steps. Each trajectory becomes n-step transitions

    (s_t, a_t, sum_{k<m} gamma^k r_{t+k}, s_{t+m}, gamma^m),  m = min(n_step, turns left)

that enter the replay buffer; then ``updates_per_step`` gradient steps on replay
minibatches of the Huber TD error against ``r + discount * Q_target(s', argmax_a Q(s', a))``,
each followed by a target update.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from rllama_jax.algos.base import Metrics, OffPolicy, QInputs, register
from rllama_jax.losses import DQNConfig, dqn_loss, epsilon_greedy_logits, linear_epsilon
from rllama_jax.trajectory import Trajectory, Transitions, n_step_transitions


@register
@dataclasses.dataclass(frozen=True)
class DQN(OffPolicy):
    """n_step: transition horizon; double: double-DQN targets; huber_delta: Huber loss
    threshold (None: squared error); epsilon_start, epsilon_end, epsilon_decay: the linear
    exploration schedule over train steps (equal start and end: constant)."""

    name: ClassVar[str] = "dqn"
    critic_heads: ClassVar[tuple[str, ...]] = ("q",)
    uses_policy_head: ClassVar[bool] = False  # it acts on its Q head

    n_step: int = 3
    double: bool = True
    huber_delta: float | None = 1.0
    epsilon_start: float = 0.3
    epsilon_end: float = 0.05
    epsilon_decay: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.n_step}")
        for eps in (self.epsilon_start, self.epsilon_end):
            if not 0.0 <= eps <= 1.0:
                raise ValueError(f"epsilon must be in [0, 1], got {eps}")

    def epsilon(self, update: jax.Array) -> jax.Array:
        """Exploration after ``update`` train steps."""
        return linear_epsilon(update, self.epsilon_start, self.epsilon_end, self.epsilon_decay)

    def acting_logits(self, logits, q, mask, update) -> jax.Array:
        return epsilon_greedy_logits(q["q"], mask, self.epsilon(update))

    def transitions(self, traj: Trajectory, gamma: float) -> Transitions:
        return n_step_transitions(traj, gamma, self.n_step)

    def q_loss(self, x: QInputs) -> tuple[jax.Array, Metrics]:
        config = DQNConfig(double=self.double, huber_delta=self.huber_delta)
        return dqn_loss(
            x.q["q"], x.actions, x.rewards, x.discounts,
            next_q_target=x.target_q["q"], next_mask=x.next_mask,
            next_q_online=x.next_q["q"], weights=x.weights, config=config,
        )  # fmt: skip
