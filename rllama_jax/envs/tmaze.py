"""T-maze: a working-memory probe whose only useful information is in the first observation.

A signpost shows the rewarded side, then ``corridor_length`` identical corridor observations
follow, then a junction. The junction text is the same for both sides, so a policy that sees
only the current observation wins half the time; remembering the signpost wins every time.
"""

from __future__ import annotations

from typing import Any

from rllama_jax.envs.base import TextEnv, format_reward

SIDES = ("left", "right")
FORWARD = "go forward"
TURNS = ["turn left", "turn right"]
CORRIDOR_OBSERVATION = "You walk along a corridor."
JUNCTION_OBSERVATION = "You reach a junction. Turn left or right?"
TMAZE_SYSTEM_PROMPT = (
    "You are walking through a maze. At the start a signpost tells you which way to turn at "
    "the junction; remember it, the corridor will not repeat it. The correct turn is rewarded.\n"
    'Answer with one action: "go forward", "turn left" or "turn right".'
)


def cue_observation(side: str) -> str:
    """The first observation, showing the rewarded ``side`` ("left" or "right")."""
    return f"The signpost says: go {side.upper()}."


class TMazeEnv(TextEnv):
    """Signpost, ``corridor_length`` corridor steps, junction; +1 for the cued turn, else -1.

    An episode has ``corridor_length + 2`` decisions: "go forward" at the signpost and at each
    corridor observation, then one of ``["turn left", "turn right"]`` at the junction, which
    terminates. ``info["cue"]`` ("left"/"right") is for tests and oracles only.
    """

    system_prompt = TMAZE_SYSTEM_PROMPT

    def __init__(self, corridor_length: int = 3, max_steps: int | None = None) -> None:
        if corridor_length < 0:
            raise ValueError(f"corridor_length must be >= 0, got {corridor_length}")
        super().__init__(max_steps=max_steps, num_actions=len(TURNS))
        self.corridor_length = corridor_length
        self.cue = SIDES[0]
        self._position = 0

    def _start(self, seed: int | None) -> tuple[str, dict[str, Any]]:
        self.cue = SIDES[int(self.np_random.integers(len(SIDES)))]
        self._position = 0
        self.candidates = [FORWARD]
        return cue_observation(self.cue), {"cue": self.cue}

    def _transition(self, index: int) -> tuple[str, float, bool, dict[str, Any]]:
        info = {"cue": self.cue}
        if self._position <= self.corridor_length:
            # Positions 0..corridor_length offer only "go forward"; the last one leads to the
            # junction.
            self._position += 1
            if self._position <= self.corridor_length:
                return CORRIDOR_OBSERVATION, 0.0, False, info
            self.candidates = list(TURNS)
            return JUNCTION_OBSERVATION, 0.0, False, info
        chosen = SIDES[index]
        reward = 1.0 if chosen == self.cue else -1.0
        outcome = "found the reward" if reward > 0 else "found nothing"
        return f"You turned {chosen} and {outcome}.", reward, True, info

    def render_step(self, observation: str, action: str, reward: float) -> str:
        """E.g. ``"signpost LEFT -> go forward -> 0"``, ``"junction -> turn left -> +1"``."""
        if observation.startswith("The signpost says: go "):
            place = "signpost " + observation.removeprefix("The signpost says: go ").rstrip(".")
        elif observation == CORRIDOR_OBSERVATION:
            place = "corridor"
        elif observation == JUNCTION_OBSERVATION:
            place = "junction"
        else:
            raise ValueError(f"not a T-maze decision observation: {observation!r}")
        return f"{place} -> {action} -> {format_reward(reward)}"
