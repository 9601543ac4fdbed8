"""The host-side environment loop for score mode: N text environments, one jitted act call
per step for all of them, trajectories out as a fixed-shape ``Batch``.

Text environments cannot run inside ``jit``; everything numeric between two env steps is one
compiled call. Prompts are padded to one fixed length and candidates to fixed (A, C), so the
act function compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rllama_jax.models import LlamaConfig
from rllama_jax.tokenization import chat_token_ids, encode_candidates, left_pad
from rllama_jax.train import Batch, Observation, TrainConfig, TrainState, evaluate_score
from rllama_jax.train.state import policy_params


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """num_steps: turns per env per batch (T); prompt_len: fixed prompt width L (a prompt
    that does not fit raises); max_actions, candidate_len: fixed A and C."""

    num_steps: int = 8
    prompt_len: int = 256
    max_actions: int = 2
    candidate_len: int = 4


@functools.partial(jax.jit, static_argnames=("model_config", "config"))
def act_score(
    trainable: Any,
    frozen: Any,
    obs: Observation,
    key: jax.Array,
    model_config: LlamaConfig,
    config: TrainConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples one action per row from the score-mode policy.

    Returns (actions [B], log-prob of each [B], value estimates [B]).
    """
    model = policy_params(trainable, frozen, config)
    ev = evaluate_score(model, trainable["heads"], obs, model_config, config)
    actions = jax.random.categorical(key, ev.log_probs)
    logp = jnp.take_along_axis(ev.log_probs, actions[:, None], axis=-1)[:, 0]
    return actions.astype(jnp.int32), logp, ev.values


class ScoreRollout:
    """Steps ``envs`` (text envs with ``info["candidates"]``) with the score-mode policy."""

    def __init__(
        self,
        envs: list[gym.Env],
        tokenizer: Any,
        model_config: LlamaConfig,
        train_config: TrainConfig,
        config: RolloutConfig,
        seed: int = 0,
    ) -> None:
        if train_config.action_mode != "score":
            raise ValueError("ScoreRollout needs TrainConfig(action_mode='score')")
        self.envs = envs
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.train_config = train_config
        self.config = config
        self.system_prompt = envs[0].unwrapped.system_prompt
        self.pad_id = 0
        self.key = jax.random.key(seed)
        self.obs: list[str] = []
        self.candidates: list[list[str]] = []
        for i, env in enumerate(envs):
            o, info = env.reset(seed=seed + i)
            self.obs.append(o)
            self.candidates.append(list(info["candidates"]))
        self.episode_returns = np.zeros(len(envs))
        self.finished_returns: list[float] = []

    def encode(self, texts: list[str], candidates: list[list[str]]) -> Observation:
        """Host-side tokenization of one step's observations for all envs."""
        convs = [
            [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": t}]
            for t in texts
        ]
        rows = chat_token_ids(self.tokenizer, convs, add_generation_prompt=True)
        tokens, mask = left_pad(rows, self.config.prompt_len, self.pad_id)
        ctok, cmask, amask = encode_candidates(
            self.tokenizer,
            candidates,
            max_actions=self.config.max_actions,
            max_tokens=self.config.candidate_len,
            pad_id=self.pad_id,
        )
        return Observation(tokens, mask, ctok, cmask, amask)

    def _act(self, state: TrainState, obs: Observation):
        self.key, sub = jax.random.split(self.key)
        return act_score(
            state.trainable, state.frozen, obs, sub, self.model_config, self.train_config
        )

    def collect(self, state: TrainState) -> Batch:
        """Runs T steps in every env and returns the batch ``[N, T]``."""
        n, t = len(self.envs), self.config.num_steps
        obs_steps, actions, logps, values = [], [], [], []
        rewards = np.zeros((n, t), np.float32)
        terminated = np.zeros((n, t), bool)
        truncated = np.zeros((n, t), bool)
        final_values = np.zeros((n, t), np.float32)
        for step in range(t):
            obs = self.encode(self.obs, self.candidates)
            a, logp, v = self._act(state, obs)
            a = np.asarray(a)
            obs_steps.append(obs)
            actions.append(a)
            logps.append(np.asarray(logp))
            values.append(np.asarray(v))
            final_texts, final_cands = list(self.obs), list(self.candidates)
            for i, env in enumerate(self.envs):
                o, r, term, trunc, info = env.step(int(a[i]))
                rewards[i, step] = r
                terminated[i, step] = term
                truncated[i, step] = trunc and not term
                self.episode_returns[i] += r
                if term or trunc:
                    final_texts[i], final_cands[i] = o, list(info["candidates"])
                    self.finished_returns.append(float(self.episode_returns[i]))
                    self.episode_returns[i] = 0.0
                    o, info = env.reset()
                self.obs[i], self.candidates[i] = o, list(info["candidates"])
            if truncated[:, step].any():
                # Truncation is not termination: bootstrap from V(true final observation).
                _, _, v_final = self._act(state, self.encode(final_texts, final_cands))
                final_values[:, step] = np.where(truncated[:, step], np.asarray(v_final), 0.0)
        _, _, bootstrap = self._act(state, self.encode(self.obs, self.candidates))
        stacked = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *obs_steps)
        return Batch(
            obs=stacked,
            actions=np.stack(actions, 1),
            rewards=rewards,
            terminated=terminated,
            truncated=truncated,
            valid=np.ones((n, t), bool),
            old_logp=np.stack(logps, 1),
            old_values=np.stack(values, 1),
            final_values=final_values,
            bootstrap_value=np.asarray(bootstrap),
        )
