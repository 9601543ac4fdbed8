"""The fixed-shape arrays a rollout hands to ``train_step``.

``Batch`` (on-policy: PPO, A2C, REINFORCE, GRPO) keeps the rollout's ``[N, T]`` layout
(N environments, T turns) because returns and advantages run along turns.
``Transitions`` (off-policy: DQN, SAC) is a flat ``[M]`` set of (s, a, r, s') rows for the
replay buffer. Fields a mode does not use are None.

Shapes: L prompt tokens (left-padded; with memory this includes the text region R or the
M soft-prompt slots), A candidate actions of C tokens (right-padded), R response tokens
(generate mode), D hidden size, Lm memory-rendering tokens, k retrieved episodic entries.
"""

from __future__ import annotations

import jax
from flax import struct

from rllama_jax.memory.latent import AdapterInputs


@struct.dataclass
class ScoreFeatures:
    """What a FROZEN LLM says about an observation in score mode, computed once at acting
    time and reused by every gradient step (``TrainConfig.caches_features``).

    scores: [..., A] candidate log-likelihoods (reduced as ``score_reduction``);
    candidate_hidden: [..., A, D] hidden state at each candidate's last token;
    prompt_hidden: [..., D] hidden state at the last prompt token.
    """

    scores: jax.Array
    candidate_hidden: jax.Array
    prompt_hidden: jax.Array


@struct.dataclass
class Observation:
    """What the policy sees at one turn (leading batch axes ``[...]``).

    prompt_tokens, prompt_mask: [..., L]; candidate_tokens, candidate_mask: [..., A, C]
    (score mode); action_mask: [..., A] which candidates exist.

    Latent memory only (None otherwise): soft_slots [..., L] int32, the index of the
    soft-prompt vector at each slot position (-1 on ordinary tokens; slot tokens are padding
    ids and slots exist only on rows with something to remember); latent_memory: the memory
    read at acting time (``AdapterInputs``: keys [..., k, D], valid [..., k], summary
    [..., D], summary_valid [...]). The soft prompt itself is not stored: the train step
    recomputes it with the current adapter (``policy.prompt_embeddings``).

    features: the frozen LLM's scores and hidden states (``ScoreFeatures``), present when
    only heads train in score mode: the train step then runs no LLM forward at all.

    action_bias: [..., A] added to the policy's logits (score mode), fixed at acting time:
    episodic control's values of the candidates (``EpisodicConfig.control``), so the train
    step evaluates the very policy that acted.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    candidate_tokens: jax.Array | None = None
    candidate_mask: jax.Array | None = None
    action_mask: jax.Array | None = None
    soft_slots: jax.Array | None = None
    latent_memory: AdapterInputs | None = None
    features: ScoreFeatures | None = None
    action_bias: jax.Array | None = None


@struct.dataclass
class Batch:
    """An on-policy rollout, leading axes [N, T].

    obs: Observation [N, T, ...]. actions: [N, T] candidate index (score mode).
    response_tokens, response_mask: [N, T, R] generated reply (generate mode).
    old_logp: [N, T] (score) or [N, T, R] (generate): log-prob under the acting policy.
    old_values: [N, T] value estimates at acting time (0 without a critic).
    rewards, terminated, truncated, valid: [N, T]; ``valid`` is False for padding turns
        (e.g. after a GRPO episode ended).
    final_values: [N, T] V(true final observation) where ``truncated`` (else ignored).
    bootstrap_value: [N] V of the state after the last turn (0 if it ended).
    group_ids: [N] GRPO group of each row (rows of a group start from the same seed).
    memory_keys: [N, T, D] pooled hidden state of each observation; memory_tokens,
        memory_mask: [N, T, Lm] rendering of each turn for episodic memory (optional);
        memory_actions: [N, T] the candidate index episodic memory records (-1: unknown).
    """

    obs: Observation
    rewards: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    valid: jax.Array
    old_logp: jax.Array
    old_values: jax.Array
    final_values: jax.Array
    bootstrap_value: jax.Array
    actions: jax.Array | None = None
    response_tokens: jax.Array | None = None
    response_mask: jax.Array | None = None
    group_ids: jax.Array | None = None
    memory_keys: jax.Array | None = None
    memory_tokens: jax.Array | None = None
    memory_mask: jax.Array | None = None
    memory_actions: jax.Array | None = None


@struct.dataclass
class Transitions:
    """Off-policy transitions, leading axis [M].

    obs, next_obs: Observation [M, ...] (``next_obs`` is the true final observation when an
    episode was truncated). actions: [M]; rewards: [M]; discounts: [M] = gamma * (1 -
    terminated) (truncation keeps gamma: the next state is bootstrapped); valid: [M].
    """

    obs: Observation
    actions: jax.Array
    rewards: jax.Array
    discounts: jax.Array
    next_obs: Observation
    valid: jax.Array
