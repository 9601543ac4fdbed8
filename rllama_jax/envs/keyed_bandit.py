"""Keyed bandit: an episodic-memory probe across episodes.

Each one-step episode names a situation ("a red door", ...) and offers ``num_arms`` levers. Which
lever pays in each situation is fixed for the env instance (drawn from ``mapping_seed`` at
construction) and never shown, so a frozen LLM can beat chance only by recalling what paid in
earlier episodes with the same situation.

Non-stationary (``remap_every=K > 0``): the mapping is redrawn every K episodes of the env,
from ``(mapping_seed, K-episode block)``, so no weight can hold it and only recent experience
tells which lever pays now. Envs built with the same ``mapping_seed`` and stepped together
(one-step episodes: every env ends one episode per step) share each block's mapping, so one
episodic memory written by all of them stays consistent. Memory is written at each train
step, so a block should span several updates (K several times the turns per update): the
first update of a block acts on the previous mapping's memories.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np

from rllama_jax.envs.base import TextEnv, format_reward

COLORS = ("red", "blue", "green", "yellow", "purple", "white", "black", "grey")
OBJECTS = ("door", "box", "chest", "lamp", "statue", "book", "bell", "mirror")
MAX_SITUATIONS = len(COLORS) * len(OBJECTS)


def situation_names(num_situations: int) -> list[str]:
    """``num_situations`` distinct names: "a red door", "a blue box", "a green chest", ..."""
    if not 1 <= num_situations <= MAX_SITUATIONS:
        raise ValueError(f"num_situations must be in [1, {MAX_SITUATIONS}], got {num_situations}")
    names = []
    for i in range(num_situations):
        # Colour cycles fastest; the object offset shifts each cycle, so all 64 pairs are distinct.
        color = COLORS[i % len(COLORS)]
        obj = OBJECTS[(i + i // len(COLORS)) % len(OBJECTS)]
        names.append(f"a {color} {obj}")
    return names


def lever_candidates(num_arms: int) -> list[str]:
    """``["pull lever A", "pull lever B", ...]`` for ``num_arms`` arms (2 to 26)."""
    if not 2 <= num_arms <= 26:
        raise ValueError(f"num_arms must be in [2, 26], got {num_arms}")
    return [f"pull lever {letter}" for letter in string.ascii_uppercase[:num_arms]]


def situation_observation(situation: str) -> str:
    """The observation text for ``situation``."""
    return f"You face {situation}. Which lever do you pull?"


class KeyedBanditEnv(TextEnv):
    """One-step episodes: reward 1 for the situation's paying lever, 0 otherwise.

    The situation of each episode is drawn uniformly by the episode RNG (``reset(seed=...)``).
    The hidden mapping is balanced -- arms ``0, 1, ..., num_arms-1, 0, 1, ...`` shuffled over the
    situations -- so that no constant policy beats chance by luck of the draw.
    ``paying_arms`` (situation name -> arm index) and ``info["situation"]`` are for oracles and
    tests only.
    """

    def __init__(
        self,
        num_situations: int = 4,
        num_arms: int = 2,
        mapping_seed: int = 0,
        max_steps: int | None = None,
        remap_every: int = 0,
    ) -> None:
        super().__init__(max_steps=max_steps, num_actions=num_arms)
        if remap_every < 0:
            raise ValueError(f"remap_every must be >= 0, got {remap_every}")
        self.situations = situation_names(num_situations)
        self.arm_candidates = lever_candidates(num_arms)
        self.mapping_seed, self.remap_every = mapping_seed, remap_every
        self.episodes = 0  # episodes started by this env (the block counter when remapping)
        self.paying_arms: dict[str, int] = self._mapping(0)
        levers = ", ".join(f'"{c}"' for c in self.arm_candidates[:-1])
        rule = (
            "it is always the same lever for the same object"
            if not remap_every
            else "which one changes from time to time: what paid most recently is what pays now"
        )
        self.system_prompt = (
            "You are in a hall of objects, each with levers. In front of each object exactly one "
            f"lever pays, and {rule}. Recall what paid before.\n"
            f'Answer with one action: {levers} or "{self.arm_candidates[-1]}".'
        )
        self.situation = self.situations[0]

    def _mapping(self, block: int) -> dict[str, int]:
        """The balanced situation -> paying arm mapping of ``block`` (0 when not remapping)."""
        arms = np.arange(len(self.situations)) % len(self.arm_candidates)
        seed = self.mapping_seed if block == 0 else (self.mapping_seed, block)
        np.random.default_rng(seed).shuffle(arms)
        return {name: int(arm) for name, arm in zip(self.situations, arms, strict=True)}

    def _start(self, seed: int | None) -> tuple[str, dict[str, Any]]:
        if self.remap_every:
            block = self.episodes // self.remap_every
            if block != (self.episodes - 1) // self.remap_every or self.episodes == 0:
                self.paying_arms = self._mapping(block)
        self.episodes += 1
        self.situation = self.situations[int(self.np_random.integers(len(self.situations)))]
        self.candidates = list(self.arm_candidates)
        return situation_observation(self.situation), {"situation": self.situation}

    def _transition(self, index: int) -> tuple[str, float, bool, dict[str, Any]]:
        paid = index == self.paying_arms[self.situation]
        observation = f"You pulled lever {string.ascii_uppercase[index]}: " + (
            "it paid." if paid else "nothing happened."
        )
        return observation, 1.0 if paid else 0.0, True, {"situation": self.situation}

    def render_step(self, observation: str, action: str, reward: float) -> str:
        """E.g. ``"a red door -> pull lever A -> +1"``."""
        prefix, suffix = "You face ", ". Which lever do you pull?"
        if not (observation.startswith(prefix) and observation.endswith(suffix)):
            raise ValueError(f"not a keyed-bandit observation: {observation!r}")
        situation = observation[len(prefix) : -len(suffix)]
        return f"{situation} -> {action} -> {format_reward(reward)}"
