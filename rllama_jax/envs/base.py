"""Shared machinery of the text environments: action resolution, step bookkeeping, truncation.

Every text environment is a plain ``gymnasium.Env`` whose observation is the string the agent
sees and whose ``info["candidates"]`` lists the action strings valid at that observation (score
mode ranks them; generate mode may pass one of them back verbatim). Keeping the candidate list in
``info`` rather than in the observation keeps the observation the exact text given to the LLM.

Conventions (relied on by the rollout loop and the tests):

* ``step`` takes the index into the current candidates (any integer, numpy integers included) or
  a candidate string (matched after ``strip()`` and case-folding); anything else raises
  ``ValueError`` naming the action and the candidates.
* The observation returned at termination carries the candidates of the last decision, so a
  vectorised score-mode agent under autoreset always has a fixed list to score; that action is
  never executed.
* ``max_steps`` truncates: after ``max_steps`` steps an episode that has not terminated returns
  ``truncated=True``. A terminating step returns ``terminated=True, truncated=False`` even on the
  last allowed step, so a learner never bootstraps through a real terminal state.
* Stepping a finished episode raises ``RuntimeError``: call ``reset``.
"""

from __future__ import annotations

import numbers
import string
from typing import Any

import gymnasium
from gymnasium import spaces

MAX_OBSERVATION_CHARS = 1024


def text_space() -> spaces.Text:
    """The observation space shared by all text envs: printable text up to 1024 characters."""
    return spaces.Text(max_length=MAX_OBSERVATION_CHARS, charset=string.printable)


def format_reward(reward: float) -> str:
    """Signed reward for memory renderings: ``+1``, ``-1``, ``+1.5``, and plain ``0``."""
    reward = float(reward)
    return "0" if reward == 0 else f"{reward:+g}"


def resolve_action(action: Any, candidates: list[str]) -> int:
    """Index of ``action`` in ``candidates``; ``action`` is an index or a candidate string.

    Raises ``ValueError`` (naming the action and the candidates) for an unknown string or an
    index out of range, so that a malformed agent output fails loudly instead of acting at random.
    """
    if isinstance(action, str):
        wanted = action.strip().casefold()
        for index, candidate in enumerate(candidates):
            if candidate.casefold() == wanted:
                return index
        raise ValueError(f"unknown action {action!r}; candidates are {candidates!r}")
    if isinstance(action, numbers.Integral) or (
        hasattr(action, "shape") and action.shape == () and hasattr(action, "item")
    ):
        index = int(action)
        if 0 <= index < len(candidates) and index == action:
            return index
        raise ValueError(f"action index {action!r} out of range; candidates are {candidates!r}")
    raise ValueError(
        f"action {action!r} is neither an index nor a string; candidates {candidates!r}"
    )


class TextEnv(gymnasium.Env):
    """Base class: subclasses implement ``_start``, ``_transition`` and ``render_step``.

    ``_start()`` returns ``(observation, info)`` for a new episode (``self.np_random`` is already
    seeded) and ``_transition(index)`` returns ``(observation, reward, terminated, info)``; both
    set ``self.candidates`` to the actions valid at the observation they return.
    """

    metadata: dict[str, Any] = {"render_modes": []}
    system_prompt: str = ""

    def __init__(self, max_steps: int | None = None, num_actions: int = 2) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        self.max_steps = max_steps
        self.observation_space = text_space()
        self.action_space = spaces.Discrete(num_actions)
        self.candidates: list[str] = []
        self._steps = 0
        self._done = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start an episode; deterministic given ``seed``. ``info["candidates"]`` lists actions."""
        super().reset(seed=seed, options=options)
        self._steps = 0
        self._done = False
        observation, info = self._start(seed)
        return observation, {**info, "candidates": list(self.candidates)}

    def step(self, action: Any) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply ``action`` (index into the current candidates, or a candidate string)."""
        if self._done:
            raise RuntimeError("episode is over: call reset() before step()")
        index = resolve_action(action, self.candidates)
        observation, reward, terminated, info = self._transition(index)
        self._steps += 1
        truncated = not terminated and self.max_steps is not None and self._steps >= self.max_steps
        self._done = terminated or truncated
        info = {**info, "candidates": list(self.candidates)}
        return observation, float(reward), bool(terminated), bool(truncated), info

    def render_step(self, observation: str, action: str, reward: float) -> str:
        """One-line rendering ``observation -> action -> reward`` for working/episodic memory."""
        raise NotImplementedError

    def _start(self, seed: int | None) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _transition(self, index: int) -> tuple[str, float, bool, dict[str, Any]]:
        raise NotImplementedError
