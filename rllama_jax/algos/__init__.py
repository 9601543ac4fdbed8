"""The algorithms, one object in one file each: ``ppo``, ``a2c``, ``reinforce``, ``grpo``,
``dqn``, ``sac`` on top of ``base`` (the protocol and the name -> class registry).

    from rllama_jax.algos import PPO, make_algorithm
    algo = PPO(clip_eps=0.1, epochs=2)          # or make_algorithm("ppo", clip_eps=0.1)
    TrainConfig(algorithm=algo, ...)             # or algorithm="ppo" for the defaults

A new algorithm subclasses ``Algorithm`` (on-policy: ``advantages`` and ``loss``) or
``OffPolicy`` (``q_loss``) and registers itself with ``@register``; nothing else changes.
"""

from rllama_jax.algos.a2c import A2C
from rllama_jax.algos.base import (
    REGISTRY,
    Algorithm,
    LossFn,
    LossInputs,
    Metrics,
    OffPolicy,
    QInputs,
    algorithm_class,
    folded_rewards,
    make_algorithm,
    option_names,
    register,
)
from rllama_jax.algos.dqn import DQN
from rllama_jax.algos.grpo import GRPO
from rllama_jax.algos.ppo import PPO
from rllama_jax.algos.reinforce import Reinforce
from rllama_jax.algos.sac import SAC

ALGORITHMS = tuple(REGISTRY)

__all__ = [
    "A2C",
    "ALGORITHMS",
    "DQN",
    "GRPO",
    "PPO",
    "REGISTRY",
    "SAC",
    "Algorithm",
    "LossFn",
    "LossInputs",
    "Metrics",
    "OffPolicy",
    "QInputs",
    "Reinforce",
    "algorithm_class",
    "folded_rewards",
    "make_algorithm",
    "option_names",
    "register",
]
