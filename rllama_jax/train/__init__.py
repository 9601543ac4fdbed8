"""Training: the state pytree, policy evaluation and the one jitted ``train_step`` (for any
algorithm of ``rllama_jax.algos``)."""

from rllama_jax.algos import ALGORITHMS, LossInputs
from rllama_jax.train.policy import (
    evaluate_generate,
    evaluate_score,
    prompt_embeddings,
    score_features,
)
from rllama_jax.train.replay import ReplayBuffer, init_replay
from rllama_jax.train.state import (
    TrainConfig,
    TrainState,
    calibrate_heads,
    init_train_state,
    memory_adapter,
    policy_params,
    reference_params,
)
from rllama_jax.train.step import Minibatch, make_train_step, remember_batch
from rllama_jax.trajectory import (
    Batch,
    Observation,
    ScoreFeatures,
    Trajectory,
    Transitions,
    n_step_transitions,
)

__all__ = [
    "ALGORITHMS",
    "Batch",
    "LossInputs",
    "Minibatch",
    "Observation",
    "ReplayBuffer",
    "ScoreFeatures",
    "TrainConfig",
    "TrainState",
    "Trajectory",
    "Transitions",
    "n_step_transitions",
    "calibrate_heads",
    "evaluate_generate",
    "evaluate_score",
    "init_replay",
    "init_train_state",
    "make_train_step",
    "remember_batch",
    "memory_adapter",
    "policy_params",
    "prompt_embeddings",
    "score_features",
    "reference_params",
]
