"""From an ``ExperimentConfig`` to the objects a run needs: model, configs, environments."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import gymnasium as gym

import rllama_jax.envs  # noqa: F401  (registers the rllama/ environments)
from rllama_jax.algos import make_algorithm
from rllama_jax.experiment.config import ExperimentConfig
from rllama_jax.feature_cache import FeatureCache
from rllama_jax.memory import EpisodicConfig, MemoryConfig, WorkingConfig
from rllama_jax.memory.latent import LatentConfig
from rllama_jax.memory.prompt import EPISODIC_HEADER, WORKING_HEADER
from rllama_jax.models import LlamaConfig, Params, load_pretrained
from rllama_jax.models.loading import TINY_MODEL, tiny_model_config  # noqa: F401 (re-exported)
from rllama_jax.models.lora import LoraConfig
from rllama_jax.rollout import RolloutConfig, shared_prefix_length
from rllama_jax.sampling import SamplingConfig
from rllama_jax.train import TrainConfig


def load_model(name: str, seed: int = 0) -> tuple[LlamaConfig, Params, Any]:
    """``(config, params, tokenizer)`` of ``--model`` (``load_pretrained``; ``seed`` draws
    the random weights of ``"tiny"``)."""
    return load_pretrained(name, seed=seed)


def _token_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def memory_config(cfg: ExperimentConfig, model_config: LlamaConfig, tokenizer: Any) -> MemoryConfig:
    """The agent's memory: which stores exist, their sizes, and text or latent delivery."""
    if cfg.memory == "none":
        return MemoryConfig()
    d = model_config.hidden_size
    latent = None
    if cfg.memory_mode == "latent":
        latent = LatentConfig(key_dim=d, hidden_size=d, num_slots=cfg.latent_slots,
                              num_actions=cfg.effective_max_actions)  # fmt: skip
    return MemoryConfig(
        mode=cfg.memory,
        representation=cfg.memory_mode,
        episodic=EpisodicConfig(
            capacity=cfg.episodic_capacity, key_dim=d, max_tokens=cfg.memory_tokens,
            k=cfg.episodic_k, control=cfg.episodic_control, decay=cfg.episodic_decay,
            w_rec=cfg.episodic_recency, center_keys=cfg.episodic_center,
        ),
        working=WorkingConfig(window=cfg.working_window, max_tokens=cfg.memory_tokens, key_dim=d),
        latent=latent,
        episodic_header=_token_ids(tokenizer, EPISODIC_HEADER),
        working_header=_token_ids(tokenizer, WORKING_HEADER),
        pad_id=0,
    )  # fmt: skip


def train_config(cfg: ExperimentConfig, model_config: LlamaConfig, tokenizer: Any) -> TrainConfig:
    """The static ``TrainConfig`` of the run."""
    eos = tokenizer.eos_token_id
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_token_ids=(eos,) if isinstance(eos, int) else (),
    )
    tcfg = TrainConfig(
        algorithm=make_algorithm(cfg.algo, **cfg.algorithm_options()),
        action_mode=cfg.action_mode,
        trainable=cfg.trainable,
        lora=LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
        learning_rate=cfg.learning_rate,
        head_learning_rate=cfg.head_learning_rate,
        head_hidden=cfg.head_hidden,
        policy_temperature=cfg.policy_temperature,
        max_grad_norm=cfg.max_grad_norm,
        gamma=cfg.gamma,
        minibatches=cfg.minibatches,
        sampling=sampling,
        memory=memory_config(cfg, model_config, tokenizer),
        prefix_len=prefix_len(cfg, tokenizer),
        remat=cfg.remat,
        microbatch_rows=cfg.microbatch_rows,
    )
    if cfg.head_norm and tcfg.caches_features:
        tcfg = dataclasses.replace(tcfg, head_input_norm=True)
    return tcfg


def prefix_len(cfg: ExperimentConfig, tokenizer: Any) -> int:
    """Tokens every prompt of the run shares (0 when not shared: latent memory)."""
    if not cfg.share_prefix or (cfg.memory != "none" and cfg.memory_mode == "latent"):
        return 0
    env = make_envs(cfg, 1)[0]
    try:
        return shared_prefix_length(tokenizer, env.unwrapped.system_prompt)
    finally:
        env.close()


FEATURE_CACHE_FILE = "feature_cache.npz"  # in a run's workdir, written at the end


def feature_cache(
    cfg: ExperimentConfig, tcfg: TrainConfig, workdir: str | None = None
) -> FeatureCache | None:
    """The run's memoized frozen-LLM features, or None where they do not apply (the LLM
    trains, generate mode, or memory in the prompt) or ``cfg.feature_cache`` is 0.
    workdir: start from the rows a finished run saved there, if any."""
    usable = tcfg.caches_features and not tcfg.memory.enabled and tcfg.action_mode == "score"
    if not usable or cfg.feature_cache <= 0:
        return None
    path = os.path.join(workdir, FEATURE_CACHE_FILE) if workdir else ""
    if path and os.path.exists(path):
        return FeatureCache.load(path, cfg.feature_cache)
    return FeatureCache(cfg.feature_cache)


def rollout_config(cfg: ExperimentConfig, *, num_steps: int | None = None) -> RolloutConfig:
    """Prompt width, candidate layout and parse-failure handling of the environment loop
    (its row layout comes from the algorithm)."""
    return RolloutConfig(
        num_steps=num_steps or cfg.steps_per_update,
        prompt_len=cfg.effective_prompt_len,
        max_actions=cfg.effective_max_actions,
        candidate_len=cfg.effective_candidate_len,
        fallback_action=cfg.fallback_action,
        parse_penalty=cfg.parse_penalty,
        history=cfg.history,
    )


def make_envs(cfg: ExperimentConfig, n: int) -> list[gym.Env]:
    """``n`` fresh environments of the run's preset (or gymnasium id)."""
    preset = cfg.preset
    return [gym.make(preset.env_id, **dict(preset.kwargs)) for _ in range(n)]


def check_env(cfg: ExperimentConfig) -> None:
    """Raises ``ValueError`` with a one-line reason if the run's environment cannot be made
    or is not a text environment the launcher can drive: its observations must be strings,
    it must have a ``system_prompt``, and in score mode ``info["candidates"]`` must list the
    actions. Makes and resets one environment: cheap next to loading a model."""
    try:
        env = make_envs(cfg, 1)[0]
    except (gym.error.Error, ImportError) as err:  # unknown id, missing optional extra
        raise ValueError(f"--env={cfg.env}: {err}") from None
    try:
        observation, info = env.reset(seed=cfg.seed)
        base = env.unwrapped
    finally:
        env.close()
    how = (
        "wrap it in a subclass of rllama_jax.envs.base.TextEnv (text observations, a "
        "system_prompt, info['candidates']), or drive it through the agent API "
        "(rllama_jax.RLlamaAgent with a format_observation)"
    )
    if not isinstance(observation, str):
        kind = type(observation)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__.split('.')[0]}.{name}"
        raise ValueError(
            f"--env={cfg.env}: the launcher trains on text environments, but this one's "
            f"observations are {name}, not str; {how}"
        )
    if not isinstance(getattr(base, "system_prompt", None), str):
        raise ValueError(
            f"--env={cfg.env}: {type(base).__name__} has no system_prompt (str); {how}"
        )
    if cfg.action_mode == "score" and not info.get("candidates"):
        raise ValueError(
            f"--env={cfg.env}: --action_mode=score ranks the actions listed in "
            "info['candidates'], and this environment's reset info has none; list them "
            "(rllama_jax.envs.base.TextEnv does) or use --action_mode=generate"
        )


def _first_line(reply: str) -> str:
    line = reply.strip().split("\n", 1)[0]
    return re.sub(r"[\s.!\"'`]+$", "", line).strip()


def extract_action(cfg: ExperimentConfig) -> Callable[[str], Any]:
    """Reply -> action for generate mode: the preset's parser, else the reply's first line
    (the env matches it against its candidates; a mismatch is a counted parse failure)."""
    return cfg.preset.extract_action or _first_line
