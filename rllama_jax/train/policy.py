"""What the model says about a batch of observations: action log-probs, values, Q-values.

Used by acting (rollout) and by learning (``train_step``) alike, so both see the same
policy. Inputs carry flat leading axes ``[M]``.

With latent memory the observation carries soft-prompt slots and the memory read at acting
time; ``prompt_embeddings`` turns them into the prompt's input embeddings with the adapter
parameters it is given, so the acting call and the train step build the same sequence and the
loss differentiates the adapter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rllama_jax.heads import apply_head
from rllama_jax.losses import categorical_entropy, masked_log_softmax, masked_logits
from rllama_jax.memory import latent
from rllama_jax.models import LlamaConfig, Params, embed
from rllama_jax.sampling import build_prefix, score_candidates, sequence_logprobs
from rllama_jax.train.state import TrainConfig
from rllama_jax.trajectory import Observation, ScoreFeatures


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
    features: ScoreFeatures


def prompt_embeddings(
    model: Params,
    adapter: latent.AdapterParams | None,
    obs: Observation,
    model_config: LlamaConfig,
) -> jax.Array | None:
    """Input embeddings [M, L, H] of ``obs``'s prompts with the soft prompt computed by
    ``adapter`` from ``obs.latent_memory`` in the ``obs.soft_slots`` positions; None for an
    observation without slots (the model then embeds the tokens itself).

    The soft prompt is scaled to the RMS of the model's token embeddings."""
    if obs.soft_slots is None:
        return None
    if adapter is None:
        raise ValueError(
            "this observation has latent-memory slots but no memory adapter was given: pass "
            "adapter=trainable['memory_adapter'] (built by init_train_state for latent memory)"
        )
    if obs.latent_memory is None:
        raise ValueError("observation has soft_slots but no latent_memory to fill them from")
    scale = latent.embedding_rms(model["embed"])
    soft, _ = latent.apply_to_inputs(adapter, obs.latent_memory, scale)
    tokens = embed(model, obs.prompt_tokens, model_config)
    return latent.place_soft_prompt(tokens, soft, obs.soft_slots)


def evaluate_score(
    model: Params,
    heads: Params,
    obs: Observation,
    model_config: LlamaConfig,
    config: TrainConfig,
    adapter: latent.AdapterParams | None = None,
    *,
    remat: bool = False,
) -> ScoreEval:
    """Score-mode policy over candidate actions for observations [M, ...]: the candidates'
    scores / ``policy_temperature``, plus the policy head and episodic control's bias when
    present (how an algorithm acts on it, e.g. DQN's epsilon-greedy over its Q head, is
    ``Algorithm.acting_logits``, applied by ``rollout.act``).

    adapter: latent-memory adapter parameters, needed when ``obs`` has soft-prompt slots.
    remat: rematerialise the LLM's layers when differentiated (the train step's loss passes
    ``config.remat``; acting leaves it off).
    When ``obs.features`` is present (frozen LLM, see ``ScoreFeatures``) the model is not run:
    the heads read the stored features."""
    s = obs.features if obs.features is not None else score_features(
        model, obs, model_config, config, adapter, remat=remat
    )  # fmt: skip
    q = {
        name: apply_head(heads[name], s.candidate_hidden)[..., 0]
        for name in ("q", "q1", "q2")
        if name in heads
    }
    logits = s.scores / config.policy_temperature
    if "policy" in heads:
        logits = logits + apply_head(heads["policy"], s.candidate_hidden)[..., 0]
    if obs.action_bias is not None:  # episodic control, fixed when the step was acted
        logits = logits + obs.action_bias
    logits = masked_logits(logits, obs.action_mask)
    values = (
        apply_head(heads["value"], s.prompt_hidden)[..., 0]
        if "value" in heads
        else jnp.zeros(logits.shape[:1], jnp.float32)
    )
    return ScoreEval(
        logits=logits,
        log_probs=masked_log_softmax(logits, obs.action_mask),
        entropy=categorical_entropy(logits, obs.action_mask),
        values=values,
        q=q,
        prompt_hidden=s.prompt_hidden,
        features=s,
    )


def score_features(
    model: Params,
    obs: Observation,
    model_config: LlamaConfig,
    config: TrainConfig,
    adapter: latent.AdapterParams | None = None,
    *,
    remat: bool = False,
) -> ScoreFeatures:
    """The LLM's side of score mode for observations [M, ...]: candidate scores [M, A]
    (``score_reduction`` of their token log-likelihoods) and hidden states.
    remat: see ``evaluate_score``."""
    p = config.prefix_len
    if p:  # every row starts with the same p tokens: run them once (see TrainConfig)
        prefix = build_prefix(model, model_config, obs.prompt_tokens[0, :p], remat)
        s = score_candidates(
            model,
            model_config,
            obs.prompt_tokens[:, p:],
            obs.prompt_mask[:, p:],
            obs.candidate_tokens,
            obs.candidate_mask,
            prefix=prefix,
            remat=remat,
        )
    else:
        s = score_candidates(
            model,
            model_config,
            obs.prompt_tokens,
            obs.prompt_mask,
            obs.candidate_tokens,
            obs.candidate_mask,
            prompt_embeds=prompt_embeddings(model, adapter, obs, model_config),
            remat=remat,
        )
    scores = s.logp_sum if config.score_reduction == "sum" else s.logp_mean
    return ScoreFeatures(scores, s.candidate_hidden, s.prompt_hidden)


class GenerateEval(NamedTuple):
    """token_logp: [M, R] log-probs of the reply tokens; entropy: [M, R] the policy's
    entropy at each reply position; values: [M]. Both under the temperature-scaled,
    unfiltered distribution (``sampling.policy_log_softmax``)."""

    token_logp: jax.Array
    entropy: jax.Array
    values: jax.Array


def evaluate_generate(
    model: Params,
    heads: Params,
    obs: Observation,
    response_tokens: jax.Array,
    response_mask: jax.Array,
    model_config: LlamaConfig,
    config: TrainConfig,
    adapter: latent.AdapterParams | None = None,
    *,
    remat: bool = False,
) -> GenerateEval:
    """Generate-mode policy: log-probs and entropies of a reply [M, R] under the sampling
    temperature, without top-p / top-k (those shape only the draw, see
    ``sampling.policy_log_softmax``).

    adapter: latent-memory adapter parameters, needed when ``obs`` has soft-prompt slots.
    remat: see ``evaluate_score``."""
    p = config.prefix_len
    if p:  # every row starts with the same p tokens: run them once (see TrainConfig)
        logp, hidden, entropy = sequence_logprobs(
            model, model_config, obs.prompt_tokens[:, p:], obs.prompt_mask[:, p:],
            response_tokens, response_mask, config.sampling, remat=remat, with_entropy=True,
            prefix=build_prefix(model, model_config, obs.prompt_tokens[0, :p], remat),
        )  # fmt: skip
    else:
        logp, hidden, entropy = sequence_logprobs(
            model, model_config, obs.prompt_tokens, obs.prompt_mask, response_tokens,
            response_mask, config.sampling,
            prompt_embeds=prompt_embeddings(model, adapter, obs, model_config),
            remat=remat, with_entropy=True,
        )  # fmt: skip
    values = (
        apply_head(heads["value"], hidden)[..., 0]
        if "value" in heads
        else jnp.zeros(logp.shape[:1], jnp.float32)
    )
    return GenerateEval(token_logp=logp, entropy=entropy, values=values)
