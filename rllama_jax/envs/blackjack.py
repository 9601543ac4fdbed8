"""Blackjack as text: gymnasium's ``Blackjack-v1`` with the seed RLlama BlackjackAgent's prompt.

The observation text, system prompt rules and ``extract_action`` are the seed README's, so results
compare directly with RLlama/LlamaGym; candidates ``["stay", "hit"]`` make score mode possible.
"""

from __future__ import annotations

import re
from typing import Any

from gymnasium.envs.toy_text.blackjack import BlackjackEnv

from rllama_jax.envs.base import TextEnv, format_reward

BLACKJACK_CANDIDATES = ["stay", "hit"]

BLACKJACK_SYSTEM_PROMPT = (
    "You are an expert blackjack player. Follow these rules:\n"
    "1. ALWAYS hit if your total is 11 or below\n"
    "2. With 12-16: hit if dealer shows 7+, stay if 6 or lower\n"
    "3. ALWAYS stay if your total is 17+ without an ace\n"
    "4. With a usable ace: hit if total is 17 or below\n"
    'Answer with "stay" or "hit".'
)

_OBSERVATION_RE = re.compile(
    r"Current hand total: (\d+)\nDealer's card: (\d+)\nUsable ace: (yes|no)"
)


def format_blackjack_observation(observation: tuple[Any, Any, Any]) -> str:
    """The seed BlackjackAgent's ``format_observation`` of a ``(total, dealer, ace)`` tuple."""
    return (
        f"Current hand total: {observation[0]}\n"
        f"Dealer's card: {observation[1]}\n"
        f"Usable ace: {'yes' if observation[2] else 'no'}"
    )


def blackjack_extract_action(response: str) -> int:
    """The seed BlackjackAgent's ``extract_action``: 0 (stay) if "stay" is in the text, else 1."""
    return 0 if "stay" in response.lower() else 1


class BlackjackTextEnv(TextEnv):
    """Gymnasium ``Blackjack-v1`` (``natural=False, sab=False``) with text observations.

    Candidate index 0 is "stay" (gymnasium action 0, stick) and 1 is "hit", so an index, the
    candidate string and the seed's ``extract_action`` output all mean the same move.
    """

    system_prompt = BLACKJACK_SYSTEM_PROMPT

    def __init__(self, max_steps: int | None = None) -> None:
        super().__init__(max_steps=max_steps, num_actions=len(BLACKJACK_CANDIDATES))
        self.game = BlackjackEnv(natural=False, sab=False)

    def _start(self, seed: int | None) -> tuple[str, dict[str, Any]]:
        # Seed the wrapped game itself so its draws match gymnasium.make("Blackjack-v1") exactly.
        if seed is None and self.game._np_random is not None:
            observation, info = self.game.reset()
        else:
            observation, info = self.game.reset(
                seed=seed if seed is not None else int(self.np_random.integers(2**31))
            )
        self.candidates = list(BLACKJACK_CANDIDATES)
        return format_blackjack_observation(observation), dict(info)

    def _transition(self, index: int) -> tuple[str, float, bool, dict[str, Any]]:
        observation, reward, terminated, _, info = self.game.step(index)
        return format_blackjack_observation(observation), float(reward), terminated, dict(info)

    def render_step(self, observation: str, action: str, reward: float) -> str:
        """E.g. ``"hand 19, dealer 10 -> stay -> +1"`` (``"hand 17 (usable ace), ..."`` if soft)."""
        match = _OBSERVATION_RE.search(observation)
        if match is None:
            raise ValueError(f"not a blackjack observation: {observation!r}")
        total, dealer, ace = match.groups()
        soft = " (usable ace)" if ace == "yes" else ""
        return f"hand {total}{soft}, dealer {dealer} -> {action} -> {format_reward(reward)}"
