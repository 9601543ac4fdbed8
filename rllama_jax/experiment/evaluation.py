"""Evaluation of a policy: N whole episodes, greedy or sampled, mean return ± standard error.

Episodes are counted without bias toward short ones: each of the ``num_envs`` environments
plays its own quota of whole episodes (episodes that finish first are not preferred), all
stepped together with one act call per step. Evaluation never trains and never writes
episodic memory; working memory is per evaluation environment, episodic memory is read
from the state being evaluated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from rllama_jax.distributed import Placement
from rllama_jax.experiment.build import extract_action, make_envs
from rllama_jax.experiment.build import feature_cache as build_feature_cache
from rllama_jax.experiment.config import ExperimentConfig
from rllama_jax.feature_cache import FeatureCache
from rllama_jax.memory import init_memory
from rllama_jax.models import LlamaConfig
from rllama_jax.rollout import Rollout, RolloutConfig
from rllama_jax.train import TrainConfig, TrainState

EVAL_SEED_OFFSET = 1_000_000


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """returns: [episodes] episode returns; mean, se: their mean and standard error."""

    returns: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def success(self) -> float:
        """Fraction of episodes with a positive return: the success rate where only reaching
        the goal pays (BabyAI, T-maze, the keyed bandit), the win rate in Blackjack."""
        return float(np.mean(self.returns > 0))

    @property
    def se(self) -> float:
        n = len(self.returns)
        return float(np.std(self.returns, ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:+.4f} ± {self.se:.4f} (n={len(self.returns)})"


def evaluate(
    state: TrainState,
    cfg: ExperimentConfig,
    model_config: LlamaConfig,
    train_config: TrainConfig,
    tokenizer: Any,
    *,
    episodes: int,
    num_envs: int,
    greedy: bool = True,
    seed: int | None = None,
    steps_per_collect: int = 4,
    feature_cache: FeatureCache | None = None,
    placement: Placement | None = None,
) -> EvalResult:
    """Mean return of ``episodes`` episodes of the policy in ``state`` (see module doc).

    seed: environment seeds are ``seed + i`` (default: a fixed offset from ``cfg.seed``, the
    same every call, so successive evaluations of a run compare on the same episodes).
    feature_cache: memoized frozen-LLM features to use (e.g. the training loop's); by default
    one is made for this call when ``cfg`` and the train config allow it.
    placement: act sharded on its mesh; each process plays its share of the environments
    (the same ones, with the same seeds, as a single-process evaluation) and the returns are
    gathered, so every process gets the whole result.
    """
    num_envs = min(num_envs, episodes)
    quota = -(-episodes // num_envs)
    seed = EVAL_SEED_OFFSET + cfg.seed if seed is None else seed
    memory = init_memory(train_config.memory, num_envs)
    if state.memory.episodic is not None:
        memory = memory.replace(episodic=state.memory.episodic)
    local, processes = num_envs, 1
    if placement is not None:
        memory = placement.memory(memory)
        local, processes = placement.local_rows(num_envs), placement.processes
    if feature_cache is None and processes == 1:  # caches are per process
        feature_cache = build_feature_cache(cfg, train_config)
    view = state.replace(memory=memory)
    rollout = Rollout(
        make_envs(cfg, local), tokenizer, model_config, train_config,
        RolloutConfig(
            num_steps=steps_per_collect, prompt_len=cfg.effective_prompt_len,
            max_actions=cfg.effective_max_actions, candidate_len=cfg.effective_candidate_len,
        ),
        seed=seed, extract_action=extract_action(cfg) if cfg.action_mode == "generate" else None,
        greedy=greedy, episode_rows=False,  # independent episodes, whatever the algorithm
        feature_cache=feature_cache, placement=placement,
    )  # fmt: skip
    running = np.zeros(local)
    done: list[list[float]] = [[] for _ in range(local)]

    def playing() -> bool:  # every process steps until the last one has its quota
        short = float(min(len(d) for d in done) < quota)
        return (short if processes == 1 else placement.total(short)) > 0

    while playing():
        view, batch = rollout.collect(view)
        ends = np.asarray(batch.terminated) | np.asarray(batch.truncated)
        rewards = np.asarray(batch.rewards)
        for i in range(local):
            for t in range(rewards.shape[1]):
                running[i] += rewards[i, t]
                if ends[i, t]:
                    done[i].append(float(running[i]))
                    running[i] = 0.0
    returns = np.concatenate([np.asarray(d[:quota]) for d in done])
    if processes > 1:  # environment order: process 0's first, as in a single process
        returns = placement.gather(returns)
    return EvalResult(returns[:episodes])
