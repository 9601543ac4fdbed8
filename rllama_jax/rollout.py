"""The host-side environment loop: N text environments, one jitted act call per step for all
of them, trajectories out as a fixed-shape ``Batch``.

Text environments cannot run inside ``jit``; everything numeric between two env steps is one
compiled call (``act``): reading memory, splicing it into the prompt, and scoring candidates
or generating a reply. Prompts are padded to one fixed length and candidates to fixed
(A, C), so ``act`` compiles once.

Memory: the query is the hidden state at the last token of the memory-free prompt (a prefill
inside the same compiled call). Text representation: retrieved episodic entries and the env's
recent steps are spliced into the user turn before the observation. Latent representation:
``M`` soft-prompt slots are spliced at that same place (the start of the user turn's content,
after the system prompt and chat header), and the memory adapter, with the parameters of the
call, turns the retrieved keys and the working summary into the vectors that fill them; the
observation keeps the slot layout and the memory read (not the vectors) so ``train_step``
rebuilds the identical input sequence with its current adapter. After each env step the step's
rendering enters working memory (cleared when the episode ends); the batch carries each turn's
key and rendering so ``train_step`` writes them to episodic memory with their returns. Both
representations write memory the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rllama_jax.distributed.placement import Placement
from rllama_jax.feature_cache import FeatureCache
from rllama_jax.heads import apply_head
from rllama_jax.losses import masked_log_softmax
from rllama_jax.memory import (
    MemoryConfig,
    MemoryState,
    augment_prompt,
    end_episodes,
    episodic,
    init_memory,
    latent_inputs,
    record_step,
    splice_soft_slots,
)
from rllama_jax.memory.prompt import ENTRY_END
from rllama_jax.models import LlamaConfig
from rllama_jax.sampling import build_prefix, generate, prefill
from rllama_jax.tokenization import (
    chat_token_ids,
    decode_responses,
    encode_candidates,
    left_pad,
    pad_after_prefix,
)
from rllama_jax.train import (
    Observation,
    ScoreFeatures,
    TrainConfig,
    TrainState,
    Trajectory,
    Transitions,
    evaluate_score,
    prompt_embeddings,
    score_features,
)
from rllama_jax.train.state import memory_adapter, policy_params


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """num_steps: turns per env per batch (T); prompt_len: fixed prompt width L before
    memory (a prompt that does not fit raises); max_actions, candidate_len: fixed A and C
    (score mode); fallback_action / parse_penalty: what an unparseable reply does in
    generate mode (the env gets the fallback, the turn's reward gets the penalty).

    The row layout comes from the algorithm: with ``Algorithm.whole_episodes`` every
    ``collect`` resets all envs and each row plays ONE episode of at most T turns (later
    turns are invalid); with ``Algorithm.group_size`` G > 0 rows ``i // G`` also share a
    seed (a group starts from the same state) and the trajectory carries group ids.

    history: the full-history baseline (what LlamaGym and BALROG agents do): the last H
    turns of the current episode go into the prompt as chat messages (each past
    observation as a user message, the action taken as the assistant's reply, its reward
    opening the next user message); 0: the current observation alone. Size ``prompt_len``
    for H turns."""

    num_steps: int = 8
    prompt_len: int = 256
    max_actions: int = 2
    candidate_len: int = 4
    fallback_action: int = 0
    parse_penalty: float = 0.0
    history: int = 0


Turn = tuple[str, str, float]  # (observation text, action text, reward) of a past turn


def history_messages(history: list[Turn], observation: str) -> list[dict[str, str]]:
    """The chat messages of past turns [(observation, action, reward), ...] (oldest first)
    followed by the current observation: user / assistant pairs, each reward opening the
    next user message."""
    messages: list[dict[str, str]] = []
    reward_line = ""
    for obs_text, action_text, reward in history:
        messages.append({"role": "user", "content": reward_line + obs_text})
        messages.append({"role": "assistant", "content": action_text})
        reward_line = f"Reward: {reward:+g}\n"
    messages.append({"role": "user", "content": reward_line + observation})
    return messages


class ActOutput(NamedTuple):
    """obs: the observation the policy saw (text memory or soft-prompt slots and the latent
    memory read spliced in); actions: [B] (score mode);
    response_tokens, response_mask, logp: [B, N] (generate mode) or logp [B] (score mode);
    values: [B]; keys: [B, D] memory key of each observation."""

    obs: Observation
    actions: jax.Array | None
    response_tokens: jax.Array | None
    response_mask: jax.Array | None
    logp: jax.Array
    values: jax.Array
    keys: jax.Array


@functools.partial(jax.jit, static_argnames=("model_config", "config", "greedy"))
def act(
    trainable: Any,
    frozen: Any,
    memory: MemoryState,
    obs: Observation,
    insert_at: jax.Array,
    key: jax.Array,
    model_config: LlamaConfig,
    config: TrainConfig,
    greedy: bool = False,
    update: jax.Array | int = 0,
) -> ActOutput:
    """One policy step for all envs: memory read and splice, then score or generate.

    greedy: take the most likely candidate (score mode) or decode at temperature 0
    (generate mode) instead of sampling; for evaluation.
    update: train steps taken so far (``TrainState.step``), for exploration schedules
    (``Algorithm.acting_logits``, e.g. DQN's decaying epsilon).

    obs: memory-free observations [B, ...] (prompts [B, L]); insert_at: [B] where memory goes
    in the unpadded prompt. Returns prompts [B, L+R] (text memory), [B, L+M] (latent) or
    [B, L] (no memory) in ``ActOutput.obs``.
    """
    model = policy_params(trainable, frozen, config)
    adapter = memory_adapter(trainable)
    mcfg = config.memory
    if mcfg.latent_enabled and adapter is None:
        raise ValueError(
            "latent memory needs trainable['memory_adapter']: build the state with "
            "init_train_state for this TrainConfig"
        )
    query = None
    p = config.prefix_len  # the shared system prompt, once for all rows (see TrainConfig)
    prefix = build_prefix(model, model_config, obs.prompt_tokens[0, :p]) if p else None
    if mcfg.enabled:
        hidden, _, _, _ = prefill(
            model, model_config, obs.prompt_tokens[:, p:], obs.prompt_mask[:, p:], 0, prefix
        )
        query = hidden.astype(jnp.float32)
        if p:  # text memory goes right after the shared prefix (insert_at == p)
            tokens, mask = augment_prompt(
                memory, mcfg, obs.prompt_tokens[:, p:], obs.prompt_mask[:, p:], insert_at - p,
                query,
            )  # fmt: skip
            obs = obs.replace(
                prompt_tokens=jnp.concatenate([obs.prompt_tokens[:, :p], tokens], axis=1),
                prompt_mask=jnp.concatenate(
                    [obs.prompt_mask[:, :p], mask.astype(obs.prompt_mask.dtype)], axis=1
                ),
            )
        elif mcfg.latent_enabled:
            tokens, mask, slots, read = splice_soft_slots(
                memory, mcfg, obs.prompt_tokens, obs.prompt_mask, insert_at, query
            )
            obs = obs.replace(
                prompt_tokens=tokens, prompt_mask=mask, soft_slots=slots, latent_memory=read
            )
        else:
            tokens, mask = augment_prompt(
                memory, mcfg, obs.prompt_tokens, obs.prompt_mask, insert_at, query
            )
            obs = obs.replace(prompt_tokens=tokens, prompt_mask=mask)
    if config.action_mode == "score":
        if mcfg.use_episodic and mcfg.episodic.control > 0:  # episodic control
            values, _ = episodic.action_values(
                memory.episodic, mcfg.episodic, query, obs.action_mask.shape[-1]
            )
            obs = obs.replace(action_bias=mcfg.episodic.control * values)
        ev = evaluate_score(model, trainable["heads"], obs, model_config, config, adapter)
        logits = config.algorithm.acting_logits(ev.logits, ev.q, obs.action_mask, update)
        log_probs = masked_log_softmax(logits, obs.action_mask)
        if greedy:
            actions = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        else:
            actions = jax.random.categorical(key, log_probs).astype(jnp.int32)
        logp = jnp.take_along_axis(log_probs, actions[:, None], axis=-1)[:, 0]
        keys = ev.prompt_hidden.astype(jnp.float32) if query is None else query
        if config.caches_features:  # frozen LLM: the train step reuses what it said here
            obs = obs.replace(features=ev.features)
        return ActOutput(obs, actions, None, None, logp, ev.values, keys)
    sampling = dataclasses.replace(config.sampling, temperature=0.0) if greedy else config.sampling
    if prefix is not None:
        gen = generate(
            model, model_config, obs.prompt_tokens[:, p:], obs.prompt_mask[:, p:], key,
            sampling, prefix=prefix,
        )  # fmt: skip
    else:
        gen = generate(
            model, model_config, obs.prompt_tokens, obs.prompt_mask, key, sampling,
            prompt_embeds=prompt_embeddings(model, adapter, obs, model_config),
        )  # fmt: skip
    heads = trainable["heads"]
    values = (
        apply_head(heads["value"], gen.last_hidden)[..., 0]
        if "value" in heads
        else jnp.zeros(gen.tokens.shape[:1], jnp.float32)
    )
    keys = gen.last_hidden.astype(jnp.float32) if query is None else query
    return ActOutput(obs, None, gen.tokens, gen.mask, gen.logprobs, values, keys)


@functools.partial(jax.jit, static_argnames=("model_config", "config"))
def _frozen_features(
    trainable: Any, frozen: Any, obs: Observation, model_config: LlamaConfig, config: TrainConfig
) -> ScoreFeatures:
    """``score_features`` of memory-free observations [M, ...] (feature-cache misses)."""
    model = policy_params(trainable, frozen, config)
    return score_features(model, obs, model_config, config)


def transitions_example(
    train_config: TrainConfig, config: RolloutConfig, model_config: LlamaConfig
) -> Transitions:
    """One all-zero ``Transitions`` row with the shapes of the replay rows of a
    ``Rollout.collect`` trajectory (memory region, latent-memory read, frozen-LLM features included): what
    ``init_train_state`` needs to size a DQN/SAC replay buffer."""
    mcfg = train_config.memory
    a, c = config.max_actions, config.candidate_len
    length = config.prompt_len + mcfg.text_region_size + mcfg.num_soft_slots
    d = model_config.hidden_size
    obs = Observation(
        jnp.zeros((1, length), jnp.int32),
        jnp.zeros((1, length), jnp.int32),
        jnp.zeros((1, a, c), jnp.int32),
        jnp.zeros((1, a, c), jnp.int32),
        jnp.zeros((1, a), bool),
    )
    if mcfg.latent_enabled:  # the memory read of an empty memory has the real shapes
        obs = obs.replace(
            soft_slots=jnp.full((1, length), -1, jnp.int32),
            latent_memory=latent_inputs(init_memory(mcfg, 1), mcfg, jnp.zeros((1, d), jnp.float32)),
        )
    if train_config.caches_features:
        obs = obs.replace(
            features=ScoreFeatures(
                jnp.zeros((1, a), jnp.float32),
                jnp.zeros((1, a, d), jnp.float32),
                jnp.zeros((1, d), jnp.float32),
            )
        )
    z = jnp.zeros((1,))
    return Transitions(obs, jnp.zeros((1,), jnp.int32), z, z, obs, jnp.zeros((1,), bool))


@functools.partial(jax.jit, static_argnames=("config",))
def remember_step(memory, config: MemoryConfig, tokens, mask, keys, importance, done):
    """Working memory after one env step of every row: each row's entry (tokens, mask [B, W],
    key [B, D], importance [B]) recorded, then the rows whose episode ended (``done`` [B])
    cleared."""
    memory = record_step(memory, config, tokens, mask, keys, importance, jnp.ones_like(done))
    return end_episodes(memory, config, done)


def shared_prefix_length(tokenizer: Any, system_prompt: str) -> int:
    """Token index where the user message's content starts in a [system, user] prompt:
    the common prefix of two encodings that differ only in the user content. Every prompt
    of a run shares these tokens (``TrainConfig.prefix_len``; where memory is spliced)."""
    a, b = chat_token_ids(
        tokenizer,
        [
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": c}]
            for c in ("alpha", "omega")
        ],
    )
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class EpisodeStats:
    """Running statistics of finished episodes, bounded however long the run: how many
    finished, the sum of their returns, and the last ``window`` returns.

    count: episodes finished; total: sum of all their returns; recent: the last ``window``
    returns, oldest first.
    """

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self.count = 0
        self.total = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, episode_return: float) -> None:
        self.count += 1
        self.total += float(episode_return)
        self.recent.append(float(episode_return))

    def mean(self, last: int | None = None) -> float:
        """Mean return of the last ``last`` (default: ``window``) episodes; nan before any."""
        values = list(self.recent)[-last:] if last else list(self.recent)
        return float(np.mean(values)) if values else float("nan")

    def since(self, count: int) -> list[float]:
        """Returns of the episodes finished after the first ``count`` (at most ``window``)."""
        new = self.count - count
        return list(self.recent)[-new:] if new > 0 else []


class ExplorationCheck:
    """Warns once when a generate-mode policy does not explore: over its first ``window``
    replies, ``extract_action`` mapped more than ``threshold`` of them to one action. RL then
    has nothing to compare that action with (the seed's Blackjack prompt makes SmolLM2 say
    "hit" every time), and the warning says what to change.
    """

    def __init__(self, window: int = 64, threshold: float = 0.99) -> None:
        self.window, self.threshold = window, threshold
        self.actions: list[str] = []
        self.example: dict[str, str] = {}
        self.message: str | None = None
        self.done = False

    def observe(self, actions: list[Any], replies: list[str]) -> str | None:
        """Records one acting step's parsed actions and replies; returns (and logs) the
        warning the first time it applies, else None."""
        if self.done:
            return None
        for action, reply in zip(actions, replies, strict=True):
            name = "unparseable (None)" if action is None else repr(action)
            self.actions.append(name)
            self.example.setdefault(name, reply)
        if len(self.actions) < self.window:
            return None
        self.done = True
        seen = self.actions[: self.window]
        name, count = collections.Counter(seen).most_common(1)[0]
        if count <= self.threshold * len(seen):
            return None
        self.message = (
            f"the policy does not explore: {count} of its first {len(seen)} replies became "
            f"action {name} (e.g. {self.example[name][:40]!r}), so nothing can be learned about "
            "the others; score the actions instead (define candidate_actions / "
            "--action_mode=score) or use a prompt that names every action"
        )
        logging.getLogger("rllama_jax").warning(self.message)
        return self.message


def encode_observations(
    tokenizer: Any,
    system_prompt: str,
    format_observation: Callable[[Any], str],
    raw_obs: list[Any],
    candidates: list[list[str]],
    train_config: TrainConfig,
    config: RolloutConfig,
    pad_id: int = 0,
    histories: list[list[Turn]] | None = None,
) -> Observation:
    """Memory-free observations [B, ...] of ``raw_obs``: [system, user] chat prompts padded
    to ``config.prompt_len`` (unpadded shared prefix first when ``train_config.prefix_len``),
    and in score mode the ``candidates`` [B, A, C]. Used by ``Rollout`` and the agent.
    histories: per row, the episode's past turns to show (``RolloutConfig.history``)."""
    convs = [
        [{"role": "system", "content": system_prompt}]
        + history_messages(histories[i] if histories else [], format_observation(o))
        for i, o in enumerate(raw_obs)
    ]
    rows = chat_token_ids(tokenizer, convs, add_generation_prompt=True)
    longest = max((len(r) for r in rows), default=0)
    if longest > config.prompt_len:
        more = f" with {config.history} turns of history" if histories else ""
        raise ValueError(
            f"a prompt of {longest} tokens{more} does not fit prompt_len={config.prompt_len} "
            "(RolloutConfig.prompt_len, the launcher's --prompt_len): raise it"
        )
    if train_config.prefix_len:
        tokens, mask = pad_after_prefix(rows, config.prompt_len, train_config.prefix_len, pad_id)
    else:
        tokens, mask = left_pad(rows, config.prompt_len, pad_id)
    if train_config.action_mode != "score":
        return Observation(tokens, mask)
    ctok, cmask, amask = encode_candidates(
        tokenizer, candidates, max_actions=config.max_actions,
        max_tokens=config.candidate_len, pad_id=pad_id,
    )  # fmt: skip
    return Observation(tokens, mask, ctok, cmask, amask)


def render_entries(
    tokenizer: Any, texts: list[str], width: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Memory entries (tokens, mask) [len(texts), width]: each non-empty text, cut to fit,
    then ``ENTRY_END`` (a newline), so entries spliced side by side stay on their own lines."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    end = tokenizer(ENTRY_END, add_special_tokens=False)["input_ids"][:width]
    tokens = np.full((len(texts), width), pad_id, np.int32)
    mask = np.zeros((len(texts), width), np.int32)
    for i, row in enumerate(ids):
        row = row[: width - len(end)] + end if row else []
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return tokens, mask


def _next_observations(
    obs: Observation, after_last: Observation, final_views: dict[int, ActOutput], ended: np.ndarray
) -> Observation:
    """The observation after each turn [N, T]: the next turn's (the view after the last turn
    for turn T - 1), or the true final observation where an episode ended at that turn."""
    nxt = jax.tree.map(
        lambda x, last: np.concatenate([np.asarray(x)[:, 1:], np.asarray(last)[:, None]], 1),
        obs,
        after_last,
    )
    for step, view in final_views.items():
        rows = ended[:, step]

        def put(x, v, step=step, rows=rows):
            x = np.array(x)
            x[rows, step] = np.asarray(v)[rows]
            return x

        nxt = jax.tree.map(put, nxt, view.obs)
    return nxt


class Rollout:
    """Steps ``envs`` (text envs with ``info["candidates"]``) with the current policy.

    extract_action: maps a reply (generate mode) or the chosen candidate string (score
    mode) to the env's action; in generate mode returning None or an action the env rejects
    counts as a parse failure. Without it, score mode passes the candidate index.
    candidate_actions: candidate strings of an observation (default: ``info["candidates"]``).
    format_observation / system_prompt: for envs whose observations are not text yet.
    greedy: act with the most likely action / greedy decoding (evaluation) instead of sampling.
    episode_rows: the row layout (``RolloutConfig``): None follows the algorithm; False plays
    continuing rows whatever the algorithm (evaluation: independent episodes, no groups, no
    episode cut at T turns).
    feature_cache: memoized frozen-LLM features (``rllama_jax.feature_cache``): a step whose
    rows were all seen before runs only the heads. Several rollouts may share one.
    placement: run on a device mesh (``rllama_jax.distributed.Placement``): ``envs`` are this
    process's share of the run's environments (global rows ``[offset, offset + len(envs))``,
    offset = process index x len(envs)); acting is sharded and ``to_device`` assembles the
    global trajectory. None: the default device, one process.
    """

    def __init__(
        self,
        envs: list[gym.Env],
        tokenizer: Any,
        model_config: LlamaConfig,
        train_config: TrainConfig,
        config: RolloutConfig,
        seed: int = 0,
        extract_action: Callable[[str], Any] | None = None,
        format_observation: Callable[[Any], str] | None = None,
        system_prompt: str | None = None,
        seeds: list[int] | None = None,
        candidate_actions: Callable[[Any], list[str] | None] | None = None,
        greedy: bool = False,
        feature_cache: FeatureCache | None = None,
        episode_rows: bool | None = None,
        placement: Placement | None = None,
    ) -> None:
        mcfg = train_config.memory
        if placement is not None and placement.processes > 1 and feature_cache is not None:
            raise ValueError(
                "feature_cache is per process and acting is sharded over several processes: "
                "leave it out (--feature_cache=0) in a multi-process run"
            )
        if feature_cache is not None and (
            not train_config.caches_features or mcfg.enabled or train_config.action_mode != "score"
        ):
            raise ValueError(
                "feature_cache needs a frozen LLM (TrainConfig.caches_features: trainable=heads, "
                "score mode, no latent memory) and prompts without memory (memory disabled)"
            )
        if mcfg.latent_enabled and mcfg.latent.hidden_size != model_config.hidden_size:
            raise ValueError(
                f"LatentConfig.hidden_size={mcfg.latent.hidden_size} must equal the model's "
                f"hidden_size={model_config.hidden_size}"
            )
        if train_config.action_mode == "generate" and extract_action is None:
            raise ValueError("generate mode needs extract_action(reply) -> action")
        self.envs = envs
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.train_config = train_config
        self.config = config
        self.extract_action = extract_action
        self.candidate_actions = candidate_actions
        self.greedy = greedy
        self.placement = placement
        # This process's first row among the run's (one process: 0).
        self.row_offset = (
            0 if placement is None else placement.row_offset(len(envs) * placement.processes)
        )
        algo = train_config.algorithm
        self.whole_episodes = algo.whole_episodes if episode_rows is None else episode_rows
        self.group_size = algo.group_size if self.whole_episodes else 0
        self.feature_cache = feature_cache
        self.format_observation = format_observation or str
        self.system_prompt = system_prompt or envs[0].unwrapped.system_prompt
        self.pad_id = 0
        self.key = jax.random.key(seed)
        shared = shared_prefix_length(tokenizer, self.system_prompt)
        if train_config.prefix_len not in (0, shared):
            raise ValueError(
                f"TrainConfig.prefix_len={train_config.prefix_len} but this system prompt and "
                f"chat template share {shared} tokens (rollout.shared_prefix_length)"
            )
        self.insert_at = np.full(len(envs), shared, np.int32)
        self._seed = seed
        self._group_round = 0
        if seeds is None:
            seeds = [seed + self.row_offset + i for i in range(len(envs))]
        self.raw_obs: list[Any] = []
        self.candidates: list[list[str]] = []
        for env, s in zip(envs, seeds, strict=True):
            o, info = env.reset(seed=s)
            self.raw_obs.append(o)
            self.candidates.append(self._candidates(o, info))
        self.episode_returns = np.zeros(len(envs))
        self.histories: list[list[Turn]] = [[] for _ in envs]  # the last H turns per env
        self.episodes = EpisodeStats()
        self.parse_failures = 0
        self.exploration = ExplorationCheck()

    def _candidates(self, obs: Any, info: dict) -> list[str]:
        if self.candidate_actions is not None:
            return list(self.candidate_actions(obs) or [])
        return list(info.get("candidates", []))

    # ------------------------------------------------------------------ host-side encoding
    def encode(
        self, raw_obs: list[Any], candidates: list[list[str]],
        histories: list[list[Turn]] | None = None,
    ) -> Observation:  # fmt: skip
        """Tokenizes one step's observations (and candidates in score mode) for all envs,
        with each env's recent turns when ``RolloutConfig.history`` (default: the current
        episodes')."""
        return encode_observations(
            self.tokenizer, self.system_prompt, self.format_observation, raw_obs, candidates,
            self.train_config, self.config, self.pad_id,
            histories=(self.histories if histories is None else histories)
            if self.config.history else None,
        )  # fmt: skip

    def _render(self, texts: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
        return render_entries(self.tokenizer, texts, width, self.pad_id)

    def _act(self, state: TrainState, obs: Observation) -> ActOutput:
        self.key, sub = jax.random.split(self.key)
        cached = None
        if self.feature_cache is not None:
            cached = self._cached_features(state, obs)
        if cached is not None:
            obs = obs.replace(features=cached)
        if self.placement is None:
            out = act(
                state.trainable, state.frozen, state.memory, obs, self.insert_at, sub,
                self.model_config, self.train_config, self.greedy, state.step,
            )  # fmt: skip
        else:  # this process's rows in, the global batch acted on sharded, its rows out
            p = self.placement
            out = p.host(
                p.act(self.train_config, self.greedy)(
                    state.trainable, state.frozen, state.memory, p.rows(obs),
                    p.rows(self.insert_at), sub, state.step,
                )
            )  # fmt: skip
        if self.feature_cache is not None and cached is None:
            self.feature_cache.insert(obs, out.obs.features)
        return out

    def _cached_features(self, state: TrainState, obs: Observation) -> ScoreFeatures | None:
        """All rows' frozen-LLM features from the cache, after running the LLM on only the
        rows it lacks (padded to a power of two, >= 8); None when every row is new (then
        ``act`` computes them for the whole batch)."""
        cache = self.feature_cache
        found = cache.lookup(obs)
        if found is not None:
            return found
        missing = cache.missing(obs)
        n = obs.prompt_tokens.shape[0]
        size = max(8, 1 << (len(missing) - 1).bit_length())
        if size >= n:
            return None
        rows = np.asarray(missing + [missing[-1]] * (size - len(missing)))
        part = jax.tree.map(lambda x: np.asarray(x)[rows], obs)
        feats = _frozen_features(
            state.trainable, state.frozen, part, self.model_config, self.train_config
        )
        k = len(missing)
        cache.insert(
            jax.tree.map(lambda x: x[:k], part), jax.tree.map(lambda x: np.asarray(x)[:k], feats)
        )
        return cache.lookup(obs, count=False)

    def to_device(self, tree: Any) -> Any:
        """Host arrays of this rollout's rows (a ``Trajectory``) as device arrays for the train
        step: with a placement, the global batch split by rows over the mesh."""
        if self.placement is None:
            return jax.tree.map(jnp.asarray, tree)
        return self.placement.rows(tree)

    def _look(self, state: TrainState, raw_obs: list[Any], candidates, histories=None) -> ActOutput:
        """The policy's view (memory spliced) and value of observations it will not act on."""
        return self._act(state, self.encode(raw_obs, candidates, histories))

    # ------------------------------------------------------------------ the loop
    def collect(self, state: TrainState) -> tuple[TrainState, Trajectory]:
        """Runs T steps in every env; returns the state (working memory updated) and a
        ``Trajectory`` [N, T] (with ``next_obs`` when the algorithm needs it)."""
        n, t = len(self.envs), self.config.num_steps
        algo = self.train_config.algorithm
        mcfg = self.train_config.memory
        score = self.train_config.action_mode == "score"
        whole = self.whole_episodes
        active = np.ones(n, bool)
        valid = np.ones((n, t), bool)
        if whole:
            self._reset_all()
        outs: list[ActOutput] = []
        final_views: dict[int, ActOutput] = {}  # step -> view of the true final observations
        rewards = np.zeros((n, t), np.float32)
        terminated = np.zeros((n, t), bool)
        truncated = np.zeros((n, t), bool)
        final_values = np.zeros((n, t), np.float32)
        renders: list[list[str]] = []
        for step in range(t):
            out = self._act(state, self.encode(self.raw_obs, self.candidates))
            outs.append(out)
            if score:
                actions = [int(a) for a in np.asarray(out.actions)]
                action_texts = [self.candidates[i][a] for i, a in enumerate(actions)]
                if self.extract_action is not None:
                    actions = [self.extract_action(text) for text in action_texts]
            else:
                replies = decode_responses(
                    self.tokenizer, np.asarray(out.response_tokens), np.asarray(out.response_mask)
                )
                actions, action_texts = [], []
                for r in replies:
                    actions.append(self.extract_action(r))
                    action_texts.append(r.strip()[:60])
                if not self.greedy:
                    self.exploration.observe(actions, replies)
            final_obs, final_cands = list(self.raw_obs), list(self.candidates)
            final_hist = list(self.histories)
            step_texts = []
            for i, env in enumerate(self.envs):
                obs_text = self.format_observation(self.raw_obs[i])
                if not active[i]:  # whole-episode row whose episode is over: padding turn
                    valid[i, step] = False
                    step_texts.append("")
                    continue
                o, r, term, trunc, info = self._step(env, i, actions[i])
                rewards[i, step] = r
                terminated[i, step] = term
                truncated[i, step] = trunc and not term
                self.episode_returns[i] += r
                step_texts.append(self._render_step(env, obs_text, action_texts[i], r))
                if self.config.history:
                    turns = self.histories[i] + [(obs_text, action_texts[i], float(r))]
                    self.histories[i] = final_hist[i] = turns[-self.config.history :]
                if term or trunc:
                    self.histories[i] = []  # the next episode starts without history
                    final_obs[i], final_cands[i] = o, self._candidates(o, info)
                    self.episodes.add(float(self.episode_returns[i]))
                    self.episode_returns[i] = 0.0
                    if whole:
                        active[i] = False
                    else:
                        o, info = env.reset()
                elif whole and step == t - 1:
                    # The episode outlived the trajectory: it is cut here and restarts at
                    # the next collect (its return so far is what the stats record).
                    truncated[i, step] = True
                    self.histories[i] = []
                    final_obs[i], final_cands[i] = o, self._candidates(o, info)
                    self.episodes.add(float(self.episode_returns[i]))
                    self.episode_returns[i] = 0.0
                self.raw_obs[i], self.candidates[i] = o, self._candidates(o, info)
            renders.append(step_texts)
            ended_here = truncated[:, step] | (terminated[:, step] & algo.needs_next_obs)
            if ended_here.any():
                # Truncation is not termination: bootstrap from V(true final observation);
                # off-policy rows also keep that observation as their s'.
                view = self._look(state, final_obs, final_cands, final_hist)
                final_views[step] = view
                final_values[:, step] = np.where(truncated[:, step], np.asarray(view.values), 0.0)
            if mcfg.use_working:
                tokens, mask = self._render(step_texts, mcfg.working.max_tokens)
                done = terminated[:, step] | truncated[:, step] | ~valid[:, step]
                memory = remember_step(
                    state.memory, mcfg,
                    *self.to_device((tokens, mask * valid[:, step, None], np.asarray(out.keys),
                                     np.abs(rewards[:, step]), done)),
                )  # fmt: skip
                state = state.replace(memory=memory)
        # The value after the last turn matters only where an episode goes on past it (and
        # off-policy rows need the next observation itself): skip the extra forward pass
        # when every row ended (one-step episodes; whole-episode rows always end).
        ended = whole or bool(terminated[:, -1].all())
        next_view = None
        bootstrap = np.zeros(n, np.float32)
        if algo.needs_next_obs or not ended:
            next_view = self._look(state, self.raw_obs, self.candidates)
            bootstrap = np.asarray(next_view.values)
        if whole:
            bootstrap = np.zeros(n, np.float32)  # every row ended (its cut is a truncation)
        stack = lambda *xs: np.stack([np.asarray(x) for x in xs], axis=1)  # noqa: E731
        obs = jax.tree.map(stack, *[o.obs for o in outs])
        fields: dict[str, Any] = {}
        if score:
            fields["actions"] = stack(*[o.actions for o in outs])
        else:
            fields["response_tokens"] = stack(*[o.response_tokens for o in outs])
            fields["response_mask"] = stack(*[o.response_mask for o in outs])
        if mcfg.use_episodic:
            width = mcfg.episodic.max_tokens
            rendered = [self._render(s, width) for s in renders]
            fields["memory_keys"] = stack(*[o.keys for o in outs])
            fields["memory_tokens"] = stack(*[r[0] for r in rendered])
            fields["memory_mask"] = stack(*[r[1] for r in rendered])
            fields["memory_actions"] = fields["actions"] if score else np.full((n, t), -1, np.int32)
        if algo.needs_next_obs:
            fields["next_obs"] = _next_observations(
                obs, next_view.obs, final_views, terminated | truncated
            )
        g = self.group_size
        return state, Trajectory(
            obs=obs,
            rewards=rewards,
            terminated=terminated,
            truncated=truncated,
            valid=valid,
            old_logp=stack(*[o.logp for o in outs]),
            old_values=stack(*[o.values for o in outs]),
            final_values=final_values,
            bootstrap_value=bootstrap,
            group_ids=(np.arange(n, dtype=np.int32) + self.row_offset) // g if g else None,
            **fields,
        )

    def _reset_all(self) -> None:
        """Starts a fresh episode in every env (whole-episode rows); with groups of G rows
        (``Rollout.group_size``) the rows of a group share a seed."""
        g = self.group_size
        n = len(self.envs)
        if g and n % g:
            raise ValueError(f"{n} envs cannot form groups of group_size={g}")
        procs = 1 if self.placement is None else self.placement.processes
        base = self._group_round * (n * procs // max(g, 1)) + self._seed
        self._group_round += 1
        for i, env in enumerate(self.envs):
            o, info = env.reset(seed=base + (self.row_offset + i) // g) if g else env.reset()
            self.raw_obs[i], self.candidates[i] = o, self._candidates(o, info)
            self.histories[i] = []
        self.episode_returns[:] = 0.0

    def _step(self, env: gym.Env, i: int, action: Any):
        """env.step, turning an unparseable generate-mode action into the fallback."""
        if action is not None:
            try:
                return env.step(action)
            except ValueError:
                pass
        self.parse_failures += 1
        o, r, term, trunc, info = env.step(self.config.fallback_action)
        return o, r + self.config.parse_penalty, term, trunc, info

    @staticmethod
    def _render_step(env: gym.Env, obs_text: str, action_text: str, reward: float) -> str:
        render = getattr(env.unwrapped, "render_step", None)
        if render is not None:
            try:
                return render(obs_text, action_text, reward)
            except ValueError:
                pass
        return f"{obs_text} -> {action_text} -> {reward:+g}"
