"""Discrete SAC (Christodoulou 2019) over candidate actions: a policy (the LLM's candidate
scores, plus a policy head when the LLM is frozen), twin Q heads, a learned temperature.

Score mode only. Each trajectory becomes one-step transitions in the replay buffer; then
``updates_per_step`` gradient steps on replay minibatches of

    critic:  0.5 (Q_i(s, a) - r - discount * V_target(s'))^2 for both heads, with
             V_target(s') = sum_a' pi(a'|s') (min_i Q_target_i(s', a') - alpha log pi(a'|s'))
    actor:   sum_a pi(a|s) (alpha log pi(a|s) - min_i Q_i(s, a))
    alpha:   -log alpha * (target_entropy - H(pi(.|s)))

each followed by a target update. The twin critics start from independent small output
weights (``init_head``'s ``out_scale``): identical heads would make the min over them a no-op.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from rllama_jax.algos.base import Metrics, OffPolicy, QInputs, register
from rllama_jax.losses import SACConfig, sac_loss

TWIN_CRITIC_INIT_SCALE = 0.01  # q1 / q2 output layers: N(0, 0.01^2 / fan_in)


@register
@dataclasses.dataclass(frozen=True)
class SAC(OffPolicy):
    """init_log_alpha: the temperature's initial log; target_entropy_ratio: target entropy
    as a fraction of the uniform policy's (log of the valid candidates) unless
    target_entropy is given."""

    name: ClassVar[str] = "sac"
    critic_heads: ClassVar[tuple[str, ...]] = ("q1", "q2")
    critic_init_scale: ClassVar[float] = TWIN_CRITIC_INIT_SCALE

    init_log_alpha: float = -2.0
    target_entropy_ratio: float = 0.98
    target_entropy: float | None = None

    def extra_params(self) -> dict[str, jax.Array]:
        return {"log_alpha": jnp.asarray(self.init_log_alpha, jnp.float32)}

    def q_loss(self, x: QInputs) -> tuple[jax.Array, Metrics]:
        config = SACConfig(
            target_entropy_ratio=self.target_entropy_ratio, target_entropy=self.target_entropy
        )
        return sac_loss(
            x.logits, x.mask, x.q["q1"], x.q["q2"], x.actions, x.rewards, x.discounts,
            x.next_logits, x.next_mask, x.target_q["q1"], x.target_q["q2"],
            x.extra["log_alpha"], weights=x.weights, config=config,
        )  # fmt: skip
