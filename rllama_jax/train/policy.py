"""What the model says about a batch of observations: action log-probs, values, Q-values.

Used by acting (rollout) and by learning (``train_step``) alike, so both see the same
policy. Inputs carry flat leading axes ``[M]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rllama_jax.heads import apply_head
from rllama_jax.losses import categorical_entropy, masked_log_softmax, masked_logits
from rllama_jax.models import LlamaConfig, Params
from rllama_jax.sampling import score_candidates, sequence_logprobs
from rllama_jax.train.batch import Observation
from rllama_jax.train.state import TrainConfig


class ScoreEval(NamedTuple):
    """logits: [M, A] action logits (invalid actions masked); log_probs: [M, A];
    entropy: [M]; values: [M] (zeros without a value head); q: dict head -> [M, A];
    prompt_hidden: [M, D]."""

    logits: jax.Array
    log_probs: jax.Array
    entropy: jax.Array
    values: jax.Array
    q: dict[str, jax.Array]
    prompt_hidden: jax.Array


def evaluate_score(
    model: Params,
    heads: Params,
    obs: Observation,
    model_config: LlamaConfig,
    config: TrainConfig,
) -> ScoreEval:
    """Score-mode policy over candidate actions for observations [M, ...]."""
    s = score_candidates(
        model,
        model_config,
        obs.prompt_tokens,
        obs.prompt_mask,
        obs.candidate_tokens,
        obs.candidate_mask,
    )
    scores = s.logp_sum if config.score_reduction == "sum" else s.logp_mean
    logits = scores / config.policy_temperature
    if "policy" in heads:
        logits = logits + apply_head(heads["policy"], s.candidate_hidden)[..., 0]
    logits = masked_logits(logits, obs.action_mask)
    values = (
        apply_head(heads["value"], s.prompt_hidden)[..., 0]
        if "value" in heads
        else jnp.zeros(logits.shape[:1], jnp.float32)
    )
    q = {
        name: apply_head(heads[name], s.candidate_hidden)[..., 0]
        for name in ("q", "q1", "q2")
        if name in heads
    }
    return ScoreEval(
        logits=logits,
        log_probs=masked_log_softmax(logits, obs.action_mask),
        entropy=categorical_entropy(logits, obs.action_mask),
        values=values,
        q=q,
        prompt_hidden=s.prompt_hidden,
    )


class GenerateEval(NamedTuple):
    """token_logp: [M, R] log-probs of the reply tokens; values: [M]."""

    token_logp: jax.Array
    values: jax.Array


def evaluate_generate(
    model: Params,
    heads: Params,
    obs: Observation,
    response_tokens: jax.Array,
    response_mask: jax.Array,
    model_config: LlamaConfig,
    config: TrainConfig,
) -> GenerateEval:
    """Generate-mode policy: log-probs of a reply under the sampling distribution."""
    logp, hidden = sequence_logprobs(
        model,
        model_config,
        obs.prompt_tokens,
        obs.prompt_mask,
        response_tokens,
        response_mask,
        config.sampling,
    )
    values = (
        apply_head(heads["value"], hidden)[..., 0]
        if "value" in heads
        else jnp.zeros(logp.shape[:1], jnp.float32)
    )
    return GenerateEval(token_logp=logp, values=values)
