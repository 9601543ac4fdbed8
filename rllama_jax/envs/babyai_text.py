"""BabyAI-Text: minigrid's BabyAI levels seen through a text description of the agent's view.

This follows the text rendering of GLAM (Carta et al., ICML 2023, "Grounding Large Language
Models in Interactive Environments with Online Reinforcement Learning"): the observation is the
mission as a goal line, then one line per thing the agent sees, placed relative to the agent
("You see a red ball 2 steps left and 1 step forward"), then what it carries. The six actions
are the minigrid actions without ``done``.

The description is computed from the egocentric 7x7 view (``obs["image"]`` of minigrid, agent at
the bottom centre facing up), so it shows exactly what a minigrid agent sees: walls and closed
doors hide what lies behind them. Order is deterministic: the nearest wall straight ahead, to the
left and to the right; then objects by distance (steps left/right plus steps forward), then by
steps forward, then from left to right; then the carried object.

Requires the ``babyai`` extra (``pip install rllama_jax[babyai]``, i.e. the ``minigrid``
package). ``MixedTrainLocal`` rebuilds GLAM's training level, which minigrid does not ship.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any

import gymnasium
import numpy as np

try:
    import minigrid  # noqa: F401  (registers the BabyAI-* ids with gymnasium)
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT, STATE_TO_IDX
    from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel
    from minigrid.envs.babyai.core.verifier import (
        AfterInstr,
        BeforeInstr,
        GoToInstr,
        ObjDesc,
        PickupInstr,
        PutNextInstr,
    )
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "BabyAI-Text needs the 'minigrid' package: pip install 'rllama_jax[babyai]'"
    ) from error

from rllama_jax.envs.base import TextEnv, format_reward

BABYAI_CANDIDATES = ["turn left", "turn right", "go forward", "pick up", "drop", "toggle"]
"""Action strings, in minigrid's action order (left=0, right=1, forward=2, pickup=3, ...)."""

BABYAI_SYSTEM_PROMPT = (
    "You are an agent in a grid world. Each turn you are told the goal and what you see, "
    "placed relative to you: '2 steps left and 1 step forward' is two cells to your left and "
    "one cell ahead. You see a 7x7 area in front of you; walls and closed doors block the view. "
    "Possible actions: turn left, turn right, go forward, pick up, drop, toggle. "
    "'go forward' moves one cell ahead if it is free; 'pick up' takes the object 1 step forward; "
    "'drop' puts the carried object 1 step forward; 'toggle' opens or closes the door or box "
    "1 step forward. To go to an object, stand so that it is 1 step forward. "
    "Answer with exactly one action."
)

_STATE_NAMES = {index: name for name, index in STATE_TO_IDX.items()}
_HIDDEN = {"unseen", "empty", "floor", "agent"}


def _steps(count: int, direction: str) -> str:
    return f"{count} step{'s' if count != 1 else ''} {direction}"


def relative_position(right: int, forward: int) -> str:
    """``"2 steps left and 1 step forward"`` for a cell 2 to the left and 1 ahead of the agent."""
    parts = []
    if right < 0:
        parts.append(_steps(-right, "left"))
    elif right > 0:
        parts.append(_steps(right, "right"))
    if forward > 0:
        parts.append(_steps(forward, "forward"))
    return " and ".join(parts)


def _object_name(object_type: str, color: str, state: int) -> str:
    if object_type == "lava":
        return "lava"
    if object_type == "door":
        name = f"{_STATE_NAMES.get(int(state), 'closed')} {color} door"
    else:
        name = f"{color} {object_type}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def describe_view(image: np.ndarray, mission: str, carrying: tuple[str, str] | None = None) -> str:
    """The BabyAI-Text observation for one egocentric view.

    Args:
      image: ``[V, V, 3]`` minigrid view, indexed ``[x, y]`` with ``(object, color, state)``
        indices; the agent is at ``(V // 2, V - 1)`` facing towards ``y = 0``.
      mission: the level's mission string, e.g. ``"go to the red ball"``.
      carrying: ``(color, type)`` of the carried object, or ``None``.
    """
    image = np.asarray(image)
    size = image.shape[0]
    agent_x, agent_y = size // 2, image.shape[1] - 1
    walls: dict[str, int] = {}
    objects = []
    for x in range(size):
        for y in range(image.shape[1]):
            if (x, y) == (agent_x, agent_y):
                continue  # the agent's own cell shows what it carries
            object_type = IDX_TO_OBJECT[int(image[x, y, 0])]
            if object_type in _HIDDEN:
                continue
            right, forward = x - agent_x, agent_y - y
            if object_type == "wall":
                direction = None
                if right == 0:
                    direction, distance = "forward", forward
                elif forward == 0:
                    direction, distance = ("left", -right) if right < 0 else ("right", right)
                if direction is not None and distance < walls.get(direction, size + 1):
                    walls[direction] = distance
                continue
            name = _object_name(object_type, IDX_TO_COLOR[int(image[x, y, 1])], image[x, y, 2])
            objects.append((abs(right) + forward, forward, right, name))
    lines = [f"Goal of the agent: {mission}"]
    for direction in ("forward", "left", "right"):
        if direction in walls:
            lines.append(f"You see a wall {_steps(walls[direction], direction)}")
    for _, forward, right, name in sorted(objects):
        lines.append(f"You see {name} {relative_position(right, forward)}")
    if carrying is not None:
        color, object_type = carrying
        lines.append(f"You carry {_object_name(object_type, color, 0)}")
    return "\n".join(lines)


_SEEN = re.compile(r"^You see an? (.+?) ((?:\d+ steps? \w+)(?: and \d+ steps? \w+)?)$")
_STEPS = re.compile(r"(\d+) steps? (\w+)")


def render_babyai_step(observation: str, action: str, reward: float) -> str:
    """``"goal go to the red ball; sees red ball 2 left 1 forward -> go forward -> 0"``.

    Walls are left out to keep memory entries short; a carried object is appended as
    ``"; carries blue key"``.
    """
    goal, seen, carried = None, [], None
    for line in observation.splitlines():
        if line.startswith("Goal of the agent: "):
            goal = line.removeprefix("Goal of the agent: ")
        elif line.startswith("You carry "):
            carried = re.sub(r"^an? ", "", line.removeprefix("You carry "))
        elif (match := _SEEN.match(line)) and match.group(1) != "wall":
            where = " ".join(f"{n} {d}" for n, d in _STEPS.findall(match.group(2)))
            seen.append(f"{match.group(1)} {where}")
    if goal is None:
        raise ValueError(f"not a BabyAI-Text observation: {observation!r}")
    text = f"goal {goal}; sees {', '.join(seen) if seen else 'nothing'}"
    if carried is not None:
        text += f"; carries {carried}"
    return f"{text} -> {action} -> {format_reward(reward)}"


class MixedTrainLocal(RoomGridLevel):
    """GLAM's ``BabyAI-MixedTrainLocal-v0``: one 8x8 room, 8 objects, a mixed instruction.

    Each episode draws one of GLAM's training task kinds uniformly: "go to X", "pick up X",
    "put X next to Y", "pick up X, then go to Y" and "go to Y after you pick up X". X and Y
    have different descriptions. (GLAM's held-out "open" tasks are not part of training.)
    """

    TASK_KINDS = ("goto", "pickup", "putnext", "pickup_then_goto", "goto_after_pickup")

    def __init__(self, room_size: int = 8, num_dists: int = 8, **kwargs: Any) -> None:
        self.num_dists = num_dists
        super().__init__(num_rows=1, num_cols=1, room_size=room_size, **kwargs)

    def gen_mission(self) -> None:
        self.place_agent()
        objects = self.add_distractors(num_distractors=self.num_dists, all_unique=False)
        self.check_objs_reachable()
        kind = self._rand_elem(self.TASK_KINDS)
        first = self._rand_elem(objects)
        others = [o for o in objects if (o.type, o.color) != (first.type, first.color)]
        second = self._rand_elem(others)
        desc_a, desc_b = ObjDesc(first.type, first.color), ObjDesc(second.type, second.color)
        if kind == "goto":
            self.instrs = GoToInstr(desc_a)
        elif kind == "pickup":
            self.instrs = PickupInstr(desc_a)
        elif kind == "putnext":
            self.instrs = PutNextInstr(desc_a, desc_b)
        elif kind == "pickup_then_goto":
            self.instrs = BeforeInstr(PickupInstr(desc_a), GoToInstr(desc_b))
        else:
            self.instrs = AfterInstr(GoToInstr(desc_b), PickupInstr(desc_a))


LEVELS = {"MixedTrainLocal": MixedTrainLocal}
"""Levels built here, by name; any other ``level`` is a gymnasium id such as a BabyAI-* id."""


class BabyAITextEnv(TextEnv):
    """A BabyAI level with the GLAM text observation and the six action strings as candidates.

    Reward, termination and the step limit are minigrid's: ``1 - 0.9 * steps / max_steps`` on
    success, else 0; the limit is the level's ``max_steps`` for the current episode (BabyAI
    levels set it at reset from the room and instruction). Following ``TextEnv``, a success on
    the last allowed step is ``terminated=True, truncated=False`` (minigrid reports both).

    Args:
      level: a gymnasium id (``"BabyAI-GoToLocal-v0"``) or a name in ``LEVELS``.
      **level_kwargs: passed to the level (e.g. ``max_steps``, ``room_size``).
    """

    def __init__(self, level: str = "BabyAI-GoToLocal-v0", **level_kwargs: Any) -> None:
        super().__init__(max_steps=None, num_actions=len(BABYAI_CANDIDATES))
        self.system_prompt = BABYAI_SYSTEM_PROMPT
        self.level = level
        if level in LEVELS:
            self.minigrid_env = LEVELS[level](**level_kwargs)
        else:
            self.minigrid_env = gymnasium.make(level, **level_kwargs).unwrapped
        self.mission = ""

    def _describe(self, grid_observation: dict[str, Any]) -> str:
        carrying = self.minigrid_env.carrying
        carried = None if carrying is None else (carrying.color, carrying.type)
        return describe_view(grid_observation["image"], grid_observation["mission"], carried)

    def _start(self, seed: int | None) -> tuple[str, dict[str, Any]]:
        # minigrid prints "Sampling rejected: ..." for every level it redraws; through the
        # launcher that would be a line per episode in the middle of the progress bar.
        with contextlib.redirect_stdout(io.StringIO()):
            grid_observation, _ = self.minigrid_env.reset(seed=seed)
        self.max_steps = int(self.minigrid_env.max_steps)
        self.mission = grid_observation["mission"]
        self.candidates = list(BABYAI_CANDIDATES)
        return self._describe(grid_observation), {"mission": self.mission}

    def _transition(self, index: int) -> tuple[str, float, bool, dict[str, Any]]:
        grid_observation, reward, terminated, _, _ = self.minigrid_env.step(index)
        info = {"mission": self.mission, "success": bool(terminated and reward > 0)}
        return self._describe(grid_observation), float(reward), bool(terminated), info

    def render_step(self, observation: str, action: str, reward: float) -> str:
        """One line for memory, e.g. ``goal go to the red ball; sees red ball 2 left 1 forward ->
        go forward -> 0``."""
        return render_babyai_step(observation, action, reward)
