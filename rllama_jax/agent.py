"""``RLlamaAgent``: the agent API of the RLlama README, backed by the jitted acting and
training functions.

Subclass it and implement ``get_system_prompt``, ``format_observation`` and
``extract_action`` (and ``candidate_actions`` for score mode, where the LLM scores each
candidate string instead of writing free text). Then either drive one environment yourself,
exactly as the README's loop does::

    action = agent.act(observation)
    observation, reward, terminated, truncated, info = env.step(action)
    agent.assign_reward(reward)
    ...
    metrics = agent.terminate_episode()   # trains once batch_size turns are collected

or let ``agent.train(env_id, num_steps)`` run N environments batched.

Both paths produce the same ``Trajectory`` the launcher's rollout produces and learn from it
with the same loop (``rllama_jax.loop``): the single-env API records turns, lays them out
as the algorithm asks and calls ``loop.learn``; ``agent.train`` runs ``loop.train_loop``.
Layouts of the single-env API: one row of ``batch_size`` consecutive turns (an episode cut
by the batch is bootstrapped from the value of its next turn, and continues in the next
batch), or, for algorithms that learn from whole episodes (REINFORCE, GRPO), one episode
per row, ``episodes_per_update`` rows of at most ``batch_size`` turns. The user steps the
environment, so episodes cannot share a start state: GRPO's group is then the whole batch
of episodes (each episode's return against the batch's mean and spread), with a warning.
The README loop never shows the agent the observation that ends an episode, so a truncated
episode's last turn is not bootstrapped (it ends like a terminated one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rllama_jax.algos import Algorithm, algorithm_class
from rllama_jax.distributed import Placement, apply_precision, compute_config
from rllama_jax.distributed.precision import check_precision
from rllama_jax.loop import learn, train_loop
from rllama_jax.memory import (
    EpisodicConfig,
    LatentConfig,
    MemoryConfig,
    WorkingConfig,
    init_memory,
)
from rllama_jax.memory.prompt import EPISODIC_HEADER, WORKING_HEADER
from rllama_jax.models import DEFAULT_MODEL, LlamaConfig, Params, load_pretrained
from rllama_jax.models.lora import LoraConfig
from rllama_jax.rollout import (
    ExplorationCheck,
    Rollout,
    RolloutConfig,
    act,
    encode_observations,
    remember_step,
    render_entries,
    shared_prefix_length,
    transitions_example,
)
from rllama_jax.sampling import SamplingConfig
from rllama_jax.tokenization import decode_responses
from rllama_jax.train import TrainConfig, init_train_state, make_train_step
from rllama_jax.trajectory import Observation, Trajectory


@dataclasses.dataclass
class _Turn:
    obs: Observation  # [1, ...] as the policy saw it
    action: np.ndarray | None  # [1] (score mode)
    response_tokens: np.ndarray | None  # [1, R] (generate mode)
    response_mask: np.ndarray | None
    logp: np.ndarray  # [1] or [1, R]
    value: float
    key: np.ndarray  # [1, D]
    text: str = ""  # "observation -> action", its outcome is appended when it is remembered
    reward: float = 0.0
    obs_text: str = ""  # the formatted observation and the action's text (history prompts)
    action_text: str = ""
    ended: bool = False  # the episode's last turn


def _with_options(algorithm: str | Algorithm, kwargs: dict[str, Any]) -> Algorithm:
    """The algorithm with the keyword arguments that are its hyperparameters applied (they
    are removed from ``kwargs``); a keyword that is neither one of them nor a
    ``TrainConfig`` field raises ``ValueError`` naming both lists."""
    cls = algorithm_class(algorithm) if isinstance(algorithm, str) else type(algorithm)
    options = {f.name for f in dataclasses.fields(cls)}
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(kwargs) - options - config_fields)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not an option of {cls.name} ({', '.join(sorted(options))}) "
            "nor a TrainConfig field"
        )
    mine = {k: kwargs.pop(k) for k in list(kwargs) if k in options}
    if isinstance(algorithm, str):
        return cls(**mine)
    return dataclasses.replace(algorithm, **mine) if mine else algorithm


class RLlamaAgent:
    """An LLM agent trained online with PPO, DQN, A2C, SAC, REINFORCE or GRPO.

    model: a model name / path for ``load_pretrained`` (default: the embedded
        SmolLM2-135M-Instruct) or a ``(config, params, tokenizer)`` tuple.
    algorithm: "ppo" | "dqn" | "a2c" | "sac" | "reinforce" | "grpo", or an algorithm object
        with its hyperparameters (``rllama_jax.algos``, e.g. ``PPO(epochs=2)``).
    action_mode: "score" (needs ``candidate_actions``) or "generate"; default: "score" when
        the subclass defines ``candidate_actions``, else "generate".
    generation: LlamaGym's defaults (32 new tokens, top-p 0.6, temperature 0.9).
    batch_size: turns per update in the single-env API (and turns per environment per update
        in ``train``); for whole-episode algorithms (REINFORCE, GRPO) the most turns of an
        episode that count (a longer one is cut there).
    episodes_per_update: whole-episode algorithms in the single-env API: episodes per update
        (default: the algorithm's group size, else 4; at least 2).
    memory: "none" | "working" | "episodic" | "both"; episodic_capacity / episodic_k /
        working_window / memory_tokens (tokens per remembered step) size it; episodic_decay,
        episodic_recency and episodic_center shape episodic retrieval as the launcher's flags
        of those names do (importance decay per write, a recency term, centred keys).
    memory_mode: how memory reaches the LLM: "text" (spliced into the prompt) or "latent"
        (``latent_slots`` soft-prompt vectors from a trainable adapter of width
        ``latent_dim``, spliced where the text would go and trained with the policy).
    trainable: "lora" (default), "full" or "heads"; ``train_kwargs``: the algorithm's
        hyperparameters (e.g. ``epochs=2`` for PPO) and further ``TrainConfig`` fields.
    history: the full-history baseline: the last ``history`` turns of the current episode
        in the prompt as chat messages (``RolloutConfig.history``); raise ``prompt_len``
        to hold them. Needs ``act`` (one environment) or ``train``.
    share_prefix: run the system prompt (``get_system_prompt()``, read once here) once per
        call for all rows, in acting and in the train step (not with latent memory); every
        prompt must then start with it (a changed system prompt raises at the next call).
    """

    def __init__(
        self,
        model: str | tuple[LlamaConfig, Params, Any] = DEFAULT_MODEL,
        tokenizer: Any = None,
        algorithm: str | Algorithm = "ppo",
        *,
        action_mode: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.9,
        top_p: float = 0.6,
        batch_size: int = 8,
        episodes_per_update: int | None = None,
        memory: str = "none",
        episodic_capacity: int = 256,
        episodic_k: int = 2,
        episodic_decay: float = 1.0,
        episodic_recency: float = 0.0,
        episodic_center: bool = False,
        working_window: int = 4,
        memory_tokens: int = 24,
        memory_mode: str = "text",
        latent_slots: int = 4,
        latent_dim: int = 128,
        trainable: str = "lora",
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        prompt_len: int = 256,
        max_actions: int = 8,
        candidate_len: int = 8,
        seed: int = 0,
        history: int = 0,
        share_prefix: bool = True,
        **train_kwargs: Any,
    ) -> None:
        if isinstance(model, str):
            self.model_config, params, tok = load_pretrained(model, seed=seed)
        else:
            self.model_config, params, tok = model
        self.tokenizer = tokenizer if tokenizer is not None else tok
        if self.tokenizer is None:
            raise ValueError("a tokenizer is needed: pass tokenizer= or a model with one")
        if action_mode is None:
            has_candidates = type(self).candidate_actions is not RLlamaAgent.candidate_actions
            action_mode = "score" if has_candidates else "generate"
        eos = self.tokenizer.eos_token_id
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=(eos,) if isinstance(eos, int) else (),
        )
        self._shared_system: str | None = None
        if share_prefix and memory_mode != "latent" and "prefix_len" not in train_kwargs:
            train_kwargs["prefix_len"] = self._shared_prefix()
        self.train_config = TrainConfig(
            algorithm=_with_options(algorithm, train_kwargs),
            action_mode=action_mode,
            trainable=trainable,
            lora=LoraConfig(rank=lora_rank, alpha=lora_alpha),
            sampling=sampling,
            memory=self._memory_config(
                memory,
                episodic_capacity,
                episodic_k,
                working_window,
                memory_tokens,
                memory_mode,
                latent_slots,
                latent_dim,
                max_actions,
                dict(decay=episodic_decay, w_rec=episodic_recency, center_keys=episodic_center),
            ),  # fmt: skip
            **train_kwargs,
        )
        self.algorithm = self.train_config.algorithm
        self.rollout_config = RolloutConfig(
            num_steps=batch_size,
            prompt_len=prompt_len,
            max_actions=max_actions,
            candidate_len=candidate_len,
            history=history,
        )
        self.batch_size = batch_size
        self.episodes_per_update = episodes_per_update or self.algorithm.group_size or 4
        if self.algorithm.whole_episodes and self.episodes_per_update < 2:
            raise ValueError(
                f"episodes_per_update={self.episodes_per_update}: {self.algorithm.name} needs "
                "at least 2 episodes per update (a baseline of one episode is the episode)"
            )
        self.seed = seed
        self.state = init_train_state(
            self.train_config,
            self.model_config,
            params,
            jax.random.key(seed),
            num_envs=1,
            replay_example=transitions_example(
                self.train_config, self.rollout_config, self.model_config
            ),
        )
        self._train_step = make_train_step(self.train_config, self.model_config)
        self.precision = "fp32"  # agent.train(precision="bf16") switches it
        self._key = jax.random.key(seed + 1)
        self._episode: list[_Turn] = []  # the episode being played
        self._done: list[list[_Turn]] = []  # finished episodes (or their rest) not yet learned
        self._pending = False  # the last turn's outcome has not entered working memory yet
        self._insert_at: int | None = self.train_config.prefix_len or None
        self.exploration = ExplorationCheck()  # warns if every reply maps to one action
        self.group_warning: str | None = None

    # ------------------------------------------------------------------ subclass hooks
    def get_system_prompt(self) -> str:
        raise NotImplementedError("implement get_system_prompt()")

    def format_observation(self, observation: Any) -> str:
        raise NotImplementedError("implement format_observation(observation)")

    def extract_action(self, response: str) -> Any:
        raise NotImplementedError("implement extract_action(response)")

    def candidate_actions(self, observation: Any) -> list[str] | None:
        """Candidate action strings for score mode (default: none, generate mode)."""
        return None

    # ------------------------------------------------------------------ helpers
    def _shared_prefix(self) -> int:
        """Tokens every prompt starts with (the system prompt's chat rendering), run once per
        call; 0 when the subclass cannot say its system prompt yet (it then runs per row)."""
        try:
            system = self.get_system_prompt()
        except (NotImplementedError, AttributeError):
            return 0
        self._shared_system = system
        return shared_prefix_length(self.tokenizer, system)

    def _memory_config(
        self,
        mode,
        capacity,
        k,
        window,
        tokens,
        memory_mode,
        latent_slots,
        latent_dim,
        max_actions=8,
        retrieval: dict[str, Any] | None = None,
    ) -> MemoryConfig:
        if memory_mode not in ("text", "latent"):
            raise ValueError(f"memory_mode must be 'text' or 'latent', got {memory_mode!r}")
        if mode == "none":
            if memory_mode == "latent":
                raise ValueError(
                    "memory_mode='latent' needs a memory to read: pass memory='working', "
                    "'episodic' or 'both' (memory is 'none')"
                )
            return MemoryConfig()
        d = self.model_config.hidden_size
        enc = lambda s: tuple(self.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        lcfg = None
        if memory_mode == "latent":
            lcfg = LatentConfig(
                key_dim=d, hidden_size=d, num_slots=latent_slots, adapter_dim=latent_dim,
                num_actions=max_actions,
            )  # fmt: skip
        return MemoryConfig(
            mode=mode,
            representation=memory_mode,
            episodic=EpisodicConfig(
                capacity=capacity, key_dim=d, max_tokens=tokens, k=k, **(retrieval or {})
            ),
            working=WorkingConfig(window=window, max_tokens=tokens, key_dim=d),
            latent=lcfg,
            episodic_header=enc(EPISODIC_HEADER),
            working_header=enc(WORKING_HEADER),
            pad_id=0,
        )

    def _encode(
        self, observations: list[Any], histories: list[list[Any]] | None = None
    ) -> tuple[Observation, list[list[str]]]:
        system = self.get_system_prompt()
        if self.train_config.prefix_len and system != self._shared_system:
            raise ValueError(
                "get_system_prompt() changed since the agent was built, and its prompt prefix "
                "is shared across rows: build the agent with share_prefix=False"
            )
        if self._insert_at is None:  # memory goes where the user's content starts
            self._insert_at = shared_prefix_length(self.tokenizer, system)
        cands = [self.candidate_actions(o) or [] for o in observations]
        if self.train_config.action_mode == "score" and not all(cands):
            raise ValueError("score mode needs candidate_actions(observation) to return strings")
        if self.rollout_config.history and histories is None:
            raise ValueError(
                "history > 0 shows each environment's own past turns: use act() (one "
                "environment) or train(), not act_batch()"
            )
        obs = encode_observations(
            self.tokenizer, system, self.format_observation, observations, cands,
            self.train_config, self.rollout_config, histories=histories,
        )  # fmt: skip
        return obs, cands

    # ------------------------------------------------------------------ acting
    def act_batch(self, observations: list[Any], greedy: bool = False) -> list[Any]:
        """One batched policy call for several observations; returns their env actions.

        greedy: the most likely candidate (score mode) or a temperature-0 reply (generate
        mode) instead of a sample, e.g. to evaluate. Turns are recorded only by ``act`` (the
        single-env training API)."""
        actions, _, _ = self._act(observations, greedy=greedy)
        return actions

    def _act(
        self,
        observations: list[Any],
        histories: list[list[Any]] | None = None,
        greedy: bool = False,
    ):
        obs, cands = self._encode(observations, histories)
        self._key, sub = jax.random.split(self._key)
        insert_at = np.full(len(observations), self._insert_at, np.int32)
        out = act(
            self.state.trainable, self.state.frozen, self._memory_for(len(observations)),
            obs, insert_at, sub, self.model_config, self.train_config, greedy, self.state.step,
        )  # fmt: skip
        if self.train_config.action_mode == "score":
            idx = [int(a) for a in np.asarray(out.actions)]
            texts = [cands[i][a] for i, a in enumerate(idx)]
        else:
            texts = decode_responses(
                self.tokenizer, np.asarray(out.response_tokens), np.asarray(out.response_mask)
            )
        actions = [self.extract_action(t) for t in texts]
        if self.train_config.action_mode == "generate":
            self.exploration.observe(actions, texts)
        return actions, out, texts

    def _memory_for(self, n: int):
        memory = self.state.memory
        if memory.working is not None and memory.working.valid.shape[0] != n:
            raise ValueError("working memory is per environment: use act() for one env")
        return memory

    def act(self, observation: Any) -> Any:
        """The action for one observation; the turn is recorded for training."""
        self._finish_pending_turn()
        h = self.rollout_config.history
        past = [(t.obs_text, t.action_text, t.reward) for t in self._episode[-h:]] if h else []
        (action,), out, (text,) = self._act([observation], [past] if h else None)
        obs_text = self.format_observation(observation)
        score = self.train_config.action_mode == "score"
        self._episode.append(
            _Turn(
                obs=jax.tree.map(np.asarray, out.obs),
                action=np.asarray(out.actions) if score else None,
                response_tokens=None if score else np.asarray(out.response_tokens),
                response_mask=None if score else np.asarray(out.response_mask),
                logp=np.asarray(out.logp),
                value=float(out.values[0]),
                key=np.asarray(out.keys),
                text=f"{obs_text} -> {action}",
                obs_text=obs_text,
                action_text=text.strip()[:60],
            )
        )
        self._pending = True  # the turn's outcome goes to working memory at the next call
        return action

    def assign_reward(self, reward: float) -> None:
        """Adds ``reward`` to the last turn."""
        if not self._episode:
            raise RuntimeError("assign_reward() before any act()")
        self._episode[-1].reward += float(reward)

    def _finish_pending_turn(self, done: bool = False) -> None:
        """Writes the last turn, now that its reward is known, to working memory."""
        pending, self._pending = self._pending, False
        mcfg = self.train_config.memory
        if not pending or not mcfg.use_working:
            return
        turn = self._episode[-1]
        tokens, mask = render_entries(
            self.tokenizer, [f"{turn.text} -> {turn.reward:+g}"], mcfg.working.max_tokens
        )
        memory = remember_step(
            self.state.memory, mcfg, tokens, mask, turn.key,
            jnp.abs(jnp.asarray([turn.reward])), jnp.asarray([done]),
        )  # fmt: skip
        self.state = self.state.replace(memory=memory)

    # ------------------------------------------------------------------ learning
    def terminate_episode(self, truncated: bool = False) -> dict[str, float]:
        """Ends the episode; learns once enough turns (or, for whole-episode algorithms,
        episodes) are collected and returns the update's metrics (else ``{}``).

        truncated: the episode was cut (time limit), not terminated. The agent never sees
        the observation that would follow, so it cannot bootstrap from it: the last turn
        ends the episode either way."""
        if not self._episode:
            return {}
        self._finish_pending_turn(done=True)
        self._episode[-1].ended = True
        self._done.append(self._episode)
        self._episode = []
        traj = self._next_trajectory()
        if traj is None:
            return {}
        self.state, metrics = learn(self.state, traj, self._train_step, self.train_config)
        return metrics

    def _next_trajectory(self) -> Trajectory | None:
        """The next trajectory of the recorded turns, if enough are recorded (they are then
        consumed), else None."""
        if self.algorithm.whole_episodes:
            if len(self._done) < self.episodes_per_update:
                return None
            rows = self._done[: self.episodes_per_update]
            self._done = self._done[self.episodes_per_update :]
            if self.algorithm.group_size and self.group_warning is None:
                self.group_warning = (
                    f"{self.algorithm.name} through act()/terminate_episode(): the episodes "
                    "of an update cannot share a start state, so they form one group (each "
                    "return against the batch mean); agent.train() groups same-seed episodes"
                )
                logging.getLogger("rllama_jax").warning(self.group_warning)
            return self._trajectory([rows_[: self.batch_size] for rows_ in rows], cut=None)
        turns = [t for episode in self._done for t in episode]
        if len(turns) < self.batch_size:
            return None
        row, rest = turns[: self.batch_size], turns[self.batch_size :]
        self._done = [rest] if rest else []  # the rest of a cut episode, then nothing
        return self._trajectory([row], cut=rest[0] if rest else None)

    def _trajectory(self, rows: list[list[_Turn]], cut: _Turn | None) -> Trajectory:
        """Rows of turns laid out as a ``Trajectory`` [len(rows), batch_size] (short rows
        padded with invalid turns). cut: the turn that follows the last one of a single row
        whose episode goes on (its value bootstraps the row, its observation is the last
        turn's next observation)."""
        n, t = len(rows), self.batch_size
        score = self.train_config.action_mode == "score"
        pad = rows[0][0]
        grid = [row + [pad] * (t - len(row)) for row in rows]
        valid = np.asarray([[j < len(row) for j in range(t)] for row in rows])

        def stack(get: Any) -> Any:  # [1, ...] per turn -> [n, t, ...]
            return jax.tree.map(
                lambda *xs: np.concatenate(xs, axis=0).reshape((n, t) + xs[0].shape[1:]),
                *[get(x) for row in grid for x in row],
            )

        per_turn = lambda f, dtype: np.asarray([[f(x) for x in row] for row in grid], dtype)  # noqa: E731
        ended = per_turn(lambda x: x.ended, bool) & valid
        if cut is None:  # whole episodes (or a batch ending with its episode): cut at T
            ended[np.arange(n), valid.sum(1) - 1] = True
        fields: dict[str, Any] = {}
        if score:
            fields["actions"] = stack(lambda x: x.action)
        else:
            fields["response_tokens"] = stack(lambda x: x.response_tokens)
            fields["response_mask"] = stack(lambda x: x.response_mask)
        mcfg = self.train_config.memory
        if mcfg.use_episodic:  # each turn's key, rendering and candidate (-1: generate mode)
            texts = [f"{x.text} -> {x.reward:+g}" for row in grid for x in row]
            tokens, mask = render_entries(self.tokenizer, texts, mcfg.episodic.max_tokens)
            fields["memory_keys"] = stack(lambda x: x.key)
            fields["memory_tokens"] = tokens.reshape(n, t, -1)
            fields["memory_mask"] = mask.reshape(n, t, -1)
            fields["memory_actions"] = (
                fields["actions"] if score else np.full((n, t), -1, np.int32)
            ).astype(np.int32)
        if self.algorithm.needs_next_obs:
            # s' of each turn: the next turn's observation; at an episode's end its own
            # (never used: the discount is 0); after the last turn of a cut row, the cut's.
            after = [
                [row[j + 1] if j + 1 < len(row) else (cut or row[j]) for j in range(t)]
                for row in grid
            ]
            fields["next_obs"] = jax.tree.map(
                lambda *xs: np.concatenate(xs, axis=0).reshape((n, t) + xs[0].shape[1:]),
                *[x.obs for row in after for x in row],
            )
        g = self.algorithm.group_size
        return Trajectory(
            obs=stack(lambda x: x.obs),
            rewards=per_turn(lambda x: x.reward, np.float32) * valid,
            terminated=ended,
            truncated=np.zeros((n, t), bool),
            valid=valid,
            old_logp=stack(lambda x: x.logp),
            old_values=per_turn(lambda x: x.value, np.float32),
            final_values=np.zeros((n, t), np.float32),
            bootstrap_value=np.asarray([cut.value if cut else 0.0] * n, np.float32),
            group_ids=np.zeros((n,), np.int32) if g else None,
            **fields,
        )

    # ------------------------------------------------------------------ batched training
    def train(
        self,
        env: str | list[gym.Env],
        num_steps: int,
        num_envs: int = 8,
        *,
        mesh: str | None = None,
        precision: str | None = None,
        **env_kwargs: Any,
    ) -> list[dict[str, float]]:
        """Trains on ``num_envs`` environments stepped together for ``num_steps`` env steps
        in total (rounded up to whole batches of ``num_envs * batch_size`` turns), with the
        launcher's loop (``rllama_jax.loop.train_loop``). Returns one record per update: the
        train step's metrics, ``mean_return`` (last 100 episodes) and ``parse_failures``.

        mesh: run on a device mesh of this process's devices, as the launcher's ``--mesh``
        (e.g. ``"data:-1"``): the agent's state is placed by the partition rules and stays
        there; acting and the train step are split by rows. precision: ``"fp32"`` or
        ``"bf16"`` (bfloat16 compute on float32 masters, frozen weights stored in bfloat16),
        kept by the agent from then on; None keeps the agent's.
        """
        envs = (
            [gym.make(env, **env_kwargs) for _ in range(num_envs)] if isinstance(env, str) else env
        )
        if precision is not None and precision != self.precision:
            check_precision(precision)
            self.precision = precision
            self.model_config = compute_config(self.model_config, precision)
            self.state = apply_precision(self.state, precision)
            self._train_step = make_train_step(self.train_config, self.model_config)
        placement = None
        train_step = self._train_step
        if mesh:
            if jax.process_count() > 1:
                raise ValueError(
                    "agent.train(mesh=...) runs in one process; for several use the launcher "
                    "(experiments/train.py --mesh=... --distributed)"
                )
            placement = Placement(mesh, self.model_config, self.precision)
            placement.check_rows(len(envs), "num_envs")
            self.state = placement.state(self.state)
            train_step = placement.train_step(self.train_config)
        working = self.state.memory.working
        if working is not None and working.valid.shape[0] != len(envs):
            self.state = self.state.replace(
                memory=init_memory(self.train_config.memory, len(envs)).replace(
                    episodic=self.state.memory.episodic
                )
            )
        has_candidates = type(self).candidate_actions is not RLlamaAgent.candidate_actions
        rollout = Rollout(
            envs, self.tokenizer, self.model_config, self.train_config, self.rollout_config,
            seed=self.seed, extract_action=self.extract_action,
            format_observation=self.format_observation, system_prompt=self.get_system_prompt(),
            candidate_actions=self.candidate_actions if has_candidates else None,
            placement=placement,
        )  # fmt: skip
        history: list[dict[str, float]] = []

        def record(rec: Any, _state: Any) -> None:
            history.append(
                {
                    **rec.metrics,
                    "mean_return": rollout.episodes.mean(100),
                    "parse_failures": rollout.parse_failures,
                }
            )

        per_batch = len(envs) * self.rollout_config.num_steps
        updates = -(-num_steps // per_batch)
        self.state = train_loop(rollout, self.state, train_step, updates, on_update=record)
        return history

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Saves parameters, optimizer, memory and configuration with orbax."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        state = self.state.replace(rng=jax.random.key_data(self.state.rng))
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(path, "state"), state, force=True)
        ckpt.wait_until_finished()
        with open(os.path.join(path, "agent.json"), "w", encoding="utf-8") as f:
            json.dump(
                {"algorithm": self.algorithm.name, "seed": self.seed,
                 "train_config": repr(self.train_config)},
                f, indent=2,
            )  # fmt: skip

    def load(self, path: str) -> None:
        """Restores a state saved by ``save`` into this (identically configured) agent."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        template = self.state.replace(rng=jax.random.key_data(self.state.rng))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), abstract)
        self.state = restored.replace(rng=jax.random.wrap_key_data(restored.rng))


Agent = RLlamaAgent
