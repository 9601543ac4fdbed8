"""Gymnasium text environments for LLM agents, registered under the ``rllama/`` namespace.

Every env returns the text the agent sees as its observation, lists the valid action strings in
``info["candidates"]``, and exposes ``system_prompt`` and ``render_step`` on ``env.unwrapped``
(see ``rllama_jax.envs.base`` for the shared conventions).

The BabyAI-Text and TextWorld envs need optional extras (``rllama_jax[babyai]``,
``rllama_jax[textworld]``); they are registered by entry-point string, so their modules (and
``minigrid`` / ``textworld``) are imported only when one of them is made.
"""

from __future__ import annotations

import gymnasium

from rllama_jax.envs.base import TextEnv, format_reward, resolve_action
from rllama_jax.envs.blackjack import (
    BLACKJACK_CANDIDATES,
    BLACKJACK_SYSTEM_PROMPT,
    BlackjackTextEnv,
    blackjack_extract_action,
    format_blackjack_observation,
)
from rllama_jax.envs.keyed_bandit import KeyedBanditEnv, situation_names
from rllama_jax.envs.tmaze import TMazeEnv

ENV_IDS = {
    "rllama/Blackjack-v0": "rllama_jax.envs.blackjack:BlackjackTextEnv",
    "rllama/TMaze-v0": "rllama_jax.envs.tmaze:TMazeEnv",
    "rllama/KeyedBandit-v0": "rllama_jax.envs.keyed_bandit:KeyedBanditEnv",
}

OPTIONAL_ENV_IDS = {
    "rllama/BabyAI-GoToLocal-v0": (
        "rllama_jax.envs.babyai_text:BabyAITextEnv",
        {"level": "BabyAI-GoToLocal-v0"},
    ),
    "rllama/BabyAI-PickupLoc-v0": (
        "rllama_jax.envs.babyai_text:BabyAITextEnv",
        {"level": "BabyAI-PickupLoc-v0"},
    ),
    "rllama/BabyAI-PutNextLocal-v0": (
        "rllama_jax.envs.babyai_text:BabyAITextEnv",
        {"level": "BabyAI-PutNextLocal-v0"},
    ),
    "rllama/BabyAI-MixedTrainLocal-v0": (
        "rllama_jax.envs.babyai_text:BabyAITextEnv",
        {"level": "MixedTrainLocal"},
    ),
    "rllama/TextWorld-easy-v0": (
        "rllama_jax.envs.textworld_env:TextWorldEnv",
        {"difficulty": "easy"},
    ),
    "rllama/TextWorld-medium-v0": (
        "rllama_jax.envs.textworld_env:TextWorldEnv",
        {"difficulty": "medium"},
    ),
    "rllama/TextWorld-hard-v0": (
        "rllama_jax.envs.textworld_env:TextWorldEnv",
        {"difficulty": "hard"},
    ),
}
"""Envs behind optional extras: id -> (entry point, default kwargs); imported lazily by make."""


def register_envs() -> None:
    """Register the ``rllama/`` envs with gymnasium; a no-op for ids already registered."""
    for env_id, entry_point in ENV_IDS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=entry_point)
    for env_id, (entry_point, kwargs) in OPTIONAL_ENV_IDS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=entry_point, kwargs=dict(kwargs))


register_envs()

__all__ = [
    "BLACKJACK_CANDIDATES",
    "BLACKJACK_SYSTEM_PROMPT",
    "ENV_IDS",
    "OPTIONAL_ENV_IDS",
    "BlackjackTextEnv",
    "KeyedBanditEnv",
    "TMazeEnv",
    "TextEnv",
    "blackjack_extract_action",
    "format_blackjack_observation",
    "format_reward",
    "register_envs",
    "resolve_action",
    "situation_names",
]
