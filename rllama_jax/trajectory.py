"""The fixed-shape arrays a rollout (or the agent's single-env loop) hands to ``train_step``.

``Trajectory`` keeps the rollout's ``[N, T]`` layout (N rows, T turns): every algorithm's
train step takes one. On-policy algorithms compute returns and advantages along its turns;
off-policy ones turn it into ``Transitions`` (a flat ``[M]`` set of n-step (s, a, r, s')
rows for the replay buffer) with ``n_step_transitions``, a pure function of the trajectory.
Fields a mode does not use are None.

Shapes: L prompt tokens (left-padded; with memory this includes the text region R or the
M soft-prompt slots), A candidate actions of C tokens (right-padded), R response tokens
(generate mode), D hidden size, Lm memory-rendering tokens, k retrieved episodic entries.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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
class Trajectory:
    """What acting produced, leading axes [N, T].

    obs: Observation [N, T, ...]. actions: [N, T] candidate index (score mode).
    response_tokens, response_mask: [N, T, R] generated reply (generate mode).
    old_logp: [N, T] (score) or [N, T, R] (generate): log-prob under the acting policy.
    old_values: [N, T] value estimates at acting time (0 without a critic).
    rewards, terminated, truncated, valid: [N, T]; ``valid`` is False for padding turns
        (e.g. after a GRPO episode ended).
    final_values: [N, T] V(true final observation) where ``truncated`` (else ignored).
    bootstrap_value: [N] V of the state after the last turn (0 if it ended).
    group_ids: [N] group of each row (GRPO: rows of a group start from the same seed).
    next_obs: Observation [N, T] the observation after each turn (the true final observation
        where an episode ended; unused where it terminated); present when the algorithm
        learns from (s, a, r, s') rows (``Algorithm.needs_next_obs``), else None.
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
    next_obs: Observation | None = None


Batch = Trajectory  # the name the on-policy layout had first


@struct.dataclass
class Transitions:
    """Off-policy transitions, leading axis [M].

    obs, next_obs: Observation [M, ...] (``next_obs`` is the observation n steps later, or
    the true final one when an episode ended first). actions: [M]; rewards: [M] the
    discounted sum of up to n rewards; discounts: [M] the discount of the bootstrap,
    gamma^n (0 after a termination; truncation keeps it: the next state is bootstrapped);
    valid: [M].
    """

    obs: Observation
    actions: jax.Array
    rewards: jax.Array
    discounts: jax.Array
    next_obs: Observation
    valid: jax.Array


def _shift(x: jax.Array, k: int, fill: Any) -> jax.Array:
    """x [N, T, ...] moved k turns earlier along axis 1 (x[:, t + k]), ``fill`` past the end."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def n_step_transitions(traj: Trajectory, gamma: float, n: int) -> Transitions:
    """The n-step (s, a, r, s') rows [N*T] of a trajectory [N, T] (``next_obs`` required).

    Row (i, t): reward ``sum_k gamma^k r[i, t+k]`` over the next ``m <= n`` turns of the same
    episode inside the trajectory, bootstrap observation ``next_obs[i, t+m-1]`` with discount
    ``gamma^m`` (0 if the episode terminated within them). ``n=1`` is the one-step row.
    A jnp function: it runs inside the jitted train step.
    """
    if traj.next_obs is None:
        raise ValueError("n-step transitions need Trajectory.next_obs (collect it for DQN/SAC)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    valid = traj.valid.astype(bool)
    rewards = traj.rewards.astype(jnp.float32)
    term = traj.terminated.astype(bool)
    ended = term | traj.truncated.astype(bool)
    t = rewards.shape[1]
    alive = valid
    ret = jnp.zeros_like(rewards)
    disc = jnp.ones_like(rewards)
    last = jnp.broadcast_to(jnp.arange(t), rewards.shape)
    for k in range(min(n, t)):
        r_k, term_k = _shift(rewards, k, 0.0), _shift(term, k, False)
        ret = ret + jnp.where(alive, disc * r_k, 0.0)
        disc = jnp.where(alive, disc * gamma * (1.0 - term_k), disc)
        last = jnp.where(alive, jnp.arange(t) + k, last)
        alive = alive & ~_shift(ended, k, True) & _shift(valid, k + 1, False)
    nxt = jax.tree.map(
        lambda x: jnp.take_along_axis(x, last.reshape(last.shape + (1,) * (x.ndim - 2)), 1),
        traj.next_obs,
    )
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    return Transitions(
        obs=jax.tree.map(flat, traj.obs),
        actions=flat(traj.actions),
        rewards=flat(ret),
        discounts=flat(disc),
        next_obs=jax.tree.map(flat, nxt),
        valid=flat(valid),
    )
