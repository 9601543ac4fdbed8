"""Training: the state pytree, rollout batch layouts, policy evaluation and the one jitted
``train_step`` per algorithm."""

from rllama_jax.train.batch import Batch, Observation, ScoreFeatures, Transitions
from rllama_jax.train.policy import (
    evaluate_generate,
    evaluate_score,
    prompt_embeddings,
    score_features,
)
from rllama_jax.train.replay import ReplayBuffer, init_replay
from rllama_jax.train.state import (
    ALGORITHMS,
    TrainConfig,
    TrainState,
    calibrate_heads,
    init_train_state,
    memory_adapter,
    policy_params,
    reference_params,
)
from rllama_jax.train.step import LossInputs, default_loss_fn, make_train_step, remember_batch

__all__ = [
    "ALGORITHMS",
    "Batch",
    "LossInputs",
    "Observation",
    "ReplayBuffer",
    "ScoreFeatures",
    "TrainConfig",
    "TrainState",
    "Transitions",
    "calibrate_heads",
    "default_loss_fn",
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
