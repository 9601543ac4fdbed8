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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

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
    transitions_example,
)
from rllama_jax.sampling import SamplingConfig
from rllama_jax.tokenization import decode_responses
from rllama_jax.train import (
    Batch,
    TrainConfig,
    calibrate_heads,
    init_train_state,
    make_train_step,
)
from rllama_jax.trajectory import Observation


@dataclasses.dataclass
class _Turn:
    obs: Observation  # [1, ...] as the policy saw it
    action: np.ndarray | None
    response_tokens: np.ndarray | None
    response_mask: np.ndarray | None
    logp: np.ndarray
    value: float
    key: np.ndarray
    text: str = ""  # "observation -> action", its outcome is appended when it is remembered
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False


class RLlamaAgent:
    """An LLM agent trained online with PPO, DQN, A2C, SAC, REINFORCE or GRPO.

    model: a model name / path for ``load_pretrained`` (default: the embedded
        SmolLM2-135M-Instruct) or a ``(config, params, tokenizer)`` tuple.
    algorithm: "ppo" | "dqn" | "a2c" | "sac" | "reinforce" | "grpo".
    action_mode: "score" (needs ``candidate_actions``) or "generate"; default: "score" when
        the subclass defines ``candidate_actions``, else "generate".
    generation: LlamaGym's defaults (32 new tokens, top-p 0.6, temperature 0.9).
    batch_size: turns collected before an update in the single-env API.
    memory: "none" | "working" | "episodic" | "both"; episodic_capacity / episodic_k /
        working_window / memory_tokens (tokens per remembered step) size it.
    memory_mode: how memory reaches the LLM: "text" (spliced into the prompt) or "latent"
        (``latent_slots`` soft-prompt vectors from a trainable adapter of width
        ``latent_dim``, spliced where the text would go and trained with the policy).
    trainable: "lora" (default), "full" or "heads"; further ``TrainConfig`` fields go in
        ``train_kwargs``.
    """

    def __init__(
        self,
        model: str | tuple[LlamaConfig, Params, Any] = DEFAULT_MODEL,
        tokenizer: Any = None,
        algorithm: str = "ppo",
        *,
        action_mode: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.9,
        top_p: float = 0.6,
        batch_size: int = 8,
        memory: str = "none",
        episodic_capacity: int = 256,
        episodic_k: int = 2,
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
        self.train_config = TrainConfig(
            algorithm=algorithm,
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
            ),  # fmt: skip
            **train_kwargs,
        )
        self.rollout_config = RolloutConfig(
            num_steps=batch_size,
            prompt_len=prompt_len,
            max_actions=max_actions,
            candidate_len=candidate_len,
        )
        self.batch_size = batch_size
        self.seed = seed
        example = None
        if self.train_config.off_policy:
            example = self._transitions_example()
        self.state = init_train_state(
            self.train_config,
            self.model_config,
            params,
            jax.random.key(seed),
            num_envs=1,
            replay_example=example,
        )
        self._train_step = make_train_step(self.train_config, self.model_config)
        self._key = jax.random.key(seed + 1)
        self._turns: list[_Turn] = []
        self._episode: list[_Turn] = []
        self._insert_at: np.ndarray | None = None
        self._encoder: Rollout | None = None
        self._calibrated = False
        self.exploration = ExplorationCheck()  # warns if every reply maps to one action

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
    def _calibrate(self, batch: Any) -> None:
        """With ``head_input_norm``: standardise the heads' inputs once, on the first batch."""
        if self.train_config.head_input_norm and not self._calibrated:
            self.state = calibrate_heads(self.state, batch.obs, batch.valid)
            self._calibrated = True

    def _memory_config(
        self, mode, capacity, k, window, tokens, memory_mode, latent_slots, latent_dim
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
                key_dim=d, hidden_size=d, num_slots=latent_slots, adapter_dim=latent_dim
            )
        return MemoryConfig(
            mode=mode,
            representation=memory_mode,
            episodic=EpisodicConfig(capacity=capacity, key_dim=d, max_tokens=tokens, k=k),
            working=WorkingConfig(window=window, max_tokens=tokens, key_dim=d),
            latent=lcfg,
            episodic_header=enc(EPISODIC_HEADER),
            working_header=enc(WORKING_HEADER),
            pad_id=0,
        )

    def _transitions_example(self):
        return transitions_example(self.train_config, self.rollout_config, self.model_config)

    def _env_view(self) -> Any:
        """A minimal stand-in env so ``Rollout``'s encoder serves the single-env API."""
        agent = self

        class _View:
            unwrapped = type("U", (), {"system_prompt": agent.get_system_prompt()})()

            def reset(self, seed=None):
                return None, {"candidates": []}

        return _View()

    def _encode(self, observations: list[Any]) -> Observation:
        if self._encoder is None:
            self._encoder = Rollout(
                [self._env_view()],
                self.tokenizer,
                self.model_config,
                self.train_config,
                self.rollout_config,
                extract_action=self.extract_action,
                format_observation=self.format_observation,
                system_prompt=self.get_system_prompt(),
            )
        cands = [self.candidate_actions(o) or [] for o in observations]
        if self.train_config.action_mode == "score" and not all(cands):
            raise ValueError("score mode needs candidate_actions(observation) to return strings")
        return self._encoder.encode(observations, cands), cands

    # ------------------------------------------------------------------ acting
    def act_batch(self, observations: list[Any]) -> list[Any]:
        """One batched policy call for several observations; returns their env actions.

        Turns are recorded only by ``act`` (the single-env training API)."""
        actions, _ = self._act(observations)
        return actions

    def _act(self, observations: list[Any]):
        obs, cands = self._encode(observations)
        self._key, sub = jax.random.split(self._key)
        insert_at = np.full(len(observations), self._encoder.insert_at[0], np.int32)
        out = act(
            self.state.trainable, self.state.frozen, self._memory_for(len(observations)),
            obs, insert_at, sub, self.model_config, self.train_config, False,
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
        return actions, out

    def _memory_for(self, n: int):
        memory = self.state.memory
        if memory.working is not None and memory.working.valid.shape[0] != n:
            raise ValueError("working memory is per environment: use act() for one env")
        return memory

    def act(self, observation: Any) -> Any:
        """The action for one observation; the turn is recorded for training."""
        self._finish_pending_turn()
        (action,), out = self._act([observation])
        score = self.train_config.action_mode == "score"
        turn = _Turn(
            obs=jax.tree.map(np.asarray, out.obs),
            action=np.asarray(out.actions) if score else None,
            response_tokens=None if score else np.asarray(out.response_tokens),
            response_mask=None if score else np.asarray(out.response_mask),
            logp=np.asarray(out.logp),
            value=float(out.values[0]),
            key=np.asarray(out.keys),
            text=f"{self.format_observation(observation)} -> {action}",
        )
        self._episode.append(turn)
        self._pending = True  # the turn's outcome goes to working memory at the next call
        return action

    def assign_reward(self, reward: float) -> None:
        """Adds ``reward`` to the last turn."""
        if not self._episode:
            raise RuntimeError("assign_reward() before any act()")
        self._episode[-1].reward += float(reward)

    def _finish_pending_turn(self, done: bool = False) -> None:
        if not getattr(self, "_pending", False) or not self.train_config.memory.use_working:
            self._pending = False
            return
        from rllama_jax.rollout import _remember_step

        turn = self._episode[-1]
        text = f"{turn.text} -> {turn.reward:+g}"
        tokens, mask = self._encoder._render([text], self.train_config.memory.working.max_tokens)
        memory = _remember_step(
            self.state.memory, self.train_config.memory, tokens, mask, turn.key,
            jnp.abs(jnp.asarray([turn.reward])), jnp.asarray([done]),
        )  # fmt: skip
        self.state = self.state.replace(memory=memory)
        self._pending = False

    def terminate_episode(self, truncated: bool = False) -> dict[str, float]:
        """Ends the episode; trains when ``batch_size`` turns are collected and returns the
        update's metrics (else ``{}``)."""
        if not self._episode:
            return {}
        self._finish_pending_turn(done=True)
        last = self._episode[-1]
        last.terminated, last.truncated = not truncated, truncated
        self._turns.extend(self._episode)
        self._episode = []
        if len(self._turns) < self.batch_size:
            return {}
        if self.train_config.off_policy:
            batch = self._transitions(self._turns, self.batch_size)
        else:
            batch = self._batch(self._turns[: self.batch_size])
        self._turns = self._turns[self.batch_size :]
        self._calibrate(batch)
        self.state, metrics = self._train_step(self.state, batch)
        return {k: float(v) for k, v in metrics.items()}

    def _batch(self, turns: list[_Turn]) -> Batch:
        """Turns of one env laid out as a single row [1, T]."""
        cat = lambda xs: np.concatenate(xs, axis=0)[None]  # noqa: E731
        obs = jax.tree.map(lambda *xs: cat(xs), *[t.obs for t in turns])
        score = self.train_config.action_mode == "score"
        t = len(turns)
        # A turn cut mid-episode (the batch filled up) is bootstrapped from its value.
        return Batch(
            obs=obs,
            rewards=np.asarray([[x.reward for x in turns]], np.float32),
            terminated=np.asarray([[x.terminated for x in turns]]),
            truncated=np.asarray([[x.truncated for x in turns]]),
            valid=np.ones((1, t), bool),
            old_logp=cat([x.logp for x in turns]),
            old_values=np.asarray([[x.value for x in turns]], np.float32),
            final_values=np.zeros((1, t), np.float32),
            bootstrap_value=np.zeros((1,), np.float32),
            actions=cat([x.action for x in turns]) if score else None,
            response_tokens=None if score else cat([x.response_tokens for x in turns]),
            response_mask=None if score else cat([x.response_mask for x in turns]),
            # One group for GRPO; None otherwise, as the rollout's batches have (a different
            # pytree would compile the train step a second time).
            group_ids=np.zeros((1,), np.int32) if self.train_config.algorithm == "grpo" else None,
            **self._episodic_fields(turns),
        )

    def _episodic_fields(self, turns: list[_Turn]) -> dict[str, np.ndarray]:
        """What the train step writes to episodic memory, laid out as the rollout's [1, T]
        fields: each turn's key, its rendering "observation -> action -> reward" and the
        candidate it took (-1 in generate mode). Empty without episodic memory."""
        mcfg = self.train_config.memory
        if not mcfg.use_episodic:
            return {}
        texts = [f"{x.text} -> {x.reward:+g}" for x in turns]
        tokens, mask = self._encoder._render(texts, mcfg.episodic.max_tokens)
        score = self.train_config.action_mode == "score"
        actions = [x.action if score else np.full((1,), -1, np.int32) for x in turns]
        return {
            "memory_keys": np.concatenate([x.key for x in turns], axis=0)[None],
            "memory_tokens": tokens[None],
            "memory_mask": mask[None],
            "memory_actions": np.concatenate(actions, axis=0)[None].astype(np.int32),
        }

    def _transitions(self, turns: list[_Turn], count: int):
        """The first ``count`` turns as (s, a, r, s') rows. ``turns`` holds whole episodes,
        so every turn's successor is known. The README loop never shows the agent the
        observation that ends an episode, so a truncated episode's last turn is not
        bootstrapped (discount 0), like a terminated one."""
        from rllama_jax.train import Transitions

        rows, nexts, discounts = [], [], []
        for i in range(count):
            turn = turns[i]
            end = turn.terminated or turn.truncated
            rows.append(turn)
            nexts.append(turn.obs if end else turns[i + 1].obs)
            discounts.append(0.0 if end else self.train_config.gamma)
        cat = lambda xs: jnp.asarray(np.concatenate(xs, axis=0))  # noqa: E731
        return Transitions(
            obs=jax.tree.map(lambda *xs: cat(xs), *[t.obs for t in rows]),
            actions=cat([t.action for t in rows]),
            rewards=jnp.asarray([t.reward for t in rows], jnp.float32),
            discounts=jnp.asarray(discounts, jnp.float32),
            next_obs=jax.tree.map(lambda *xs: cat(xs), *nexts),
            valid=jnp.ones((count,), bool),
        )

    # ------------------------------------------------------------------ batched training
    def train(
        self, env: str | list[gym.Env], num_steps: int, num_envs: int = 8, **env_kwargs: Any
    ) -> list[dict[str, float]]:
        """Trains on ``num_envs`` environments stepped together for ``num_steps`` env steps
        in total (rounded up to whole batches of ``num_envs * batch_size`` turns)."""
        envs = (
            [gym.make(env, **env_kwargs) for _ in range(num_envs)] if isinstance(env, str) else env
        )
        if self.train_config.memory.use_working and self.state.memory.working.valid.shape[0] != len(
            envs
        ):
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
        )  # fmt: skip
        history = []
        per_batch = len(envs) * self.rollout_config.num_steps
        for _ in range(-(-num_steps // per_batch)):
            if self.train_config.off_policy:
                self.state, batch = rollout.collect_transitions(self.state)
            else:
                self.state, batch = rollout.collect(self.state)
            self._calibrate(batch)
            self.state, metrics = self._train_step(self.state, jax.tree.map(jnp.asarray, batch))
            recent = rollout.finished_returns[-100:]
            history.append(
                {
                    **{k: float(v) for k, v in metrics.items()},
                    "mean_return": float(np.mean(recent)) if recent else float("nan"),
                    "parse_failures": rollout.parse_failures,
                }
            )
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
                {"algorithm": self.train_config.algorithm, "seed": self.seed,
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
        self._calibrated = True  # the statistics (if any) came with the parameters


Agent = RLlamaAgent
