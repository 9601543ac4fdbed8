"""Tests of BabyAI-Text: golden renderer text, action mapping against minigrid, oracle successes."""

from __future__ import annotations

import collections

import gymnasium
import numpy as np
import pytest
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
from minigrid.utils.baby_ai_bot import BabyAIBot

import rllama_jax.envs  # noqa: F401  (registers the rllama/ ids)
from rllama_jax.envs.babyai_text import (
    BABYAI_CANDIDATES,
    BabyAITextEnv,
    describe_view,
    relative_position,
    render_babyai_step,
)

# Seed 0 of BabyAI-GoToLocal-v0 (minigrid 3.2.0). Full grid, x to the right, y down; the agent
# "<" stands at (6, 5) facing west, so forward is -x, left is +y (south), right is -y (north):
#   y=3: green key (2,3), red box (4,3)
#   y=4: grey ball (1,4), green key (4,4), grey ball (5,4)
#   y=5: green ball (3,5), agent (6,5)
#   y=6: purple key (4,6), yellow key (5,6)
# Walls: x=0 is 6 cells ahead, y=7 is 2 cells to the left, y=0 (5 to the right) is out of view.
SEED0_RESET = (
    "Goal of the agent: go to the green ball\n"
    "You see a wall 6 steps forward\n"
    "You see a wall 2 steps left\n"
    "You see a yellow key 1 step left and 1 step forward\n"
    "You see a grey ball 1 step right and 1 step forward\n"
    "You see a purple key 1 step left and 2 steps forward\n"
    "You see a green key 1 step right and 2 steps forward\n"
    "You see a green ball 3 steps forward\n"
    "You see a red box 2 steps right and 2 steps forward\n"
    "You see a green key 2 steps right and 4 steps forward\n"
    "You see a grey ball 1 step right and 5 steps forward"
)
# After "go forward" (agent at (5, 5), facing west) and "turn left" (now facing south: forward
# is +y, left is +x, right is -x): the yellow key blocks the way, the view is cut by the wall.
SEED0_AFTER_FORWARD_LEFT = (
    "Goal of the agent: go to the green ball\n"
    "You see a wall 2 steps forward\n"
    "You see a wall 2 steps left\n"
    "You see a yellow key 1 step forward\n"
    "You see a green ball 2 steps right\n"
    "You see a purple key 1 step right and 1 step forward"
)


def test_golden_observations_on_seed_0() -> None:
    env = gymnasium.make("rllama/BabyAI-GoToLocal-v0")
    observation, info = env.reset(seed=0)
    grid = env.unwrapped.minigrid_env
    assert (int(grid.agent_pos[0]), int(grid.agent_pos[1]), grid.agent_dir) == (6, 5, 2)
    expected = {
        (2, 3): ("key", "green"),
        (4, 3): ("box", "red"),
        (1, 4): ("ball", "grey"),
        (4, 4): ("key", "green"),
        (5, 4): ("ball", "grey"),
        (3, 5): ("ball", "green"),
        (4, 6): ("key", "purple"),
        (5, 6): ("key", "yellow"),
    }
    for (x, y), (kind, color) in expected.items():
        cell = grid.grid.get(x, y)
        assert (cell.type, cell.color) == (kind, color)
    assert observation == SEED0_RESET
    assert observation in env.observation_space
    assert info["mission"] == "go to the green ball"
    assert info["candidates"] == BABYAI_CANDIDATES
    env.step("go forward")
    observation, reward, terminated, truncated, info = env.step("turn left")
    assert observation == SEED0_AFTER_FORWARD_LEFT
    assert (reward, terminated, truncated) == (0.0, False, False)
    blocked, *_ = env.step("go forward")  # the yellow key is in the way
    assert blocked == SEED0_AFTER_FORWARD_LEFT
    assert env.unwrapped.render_step(blocked, "go forward", 0.0) == (
        "goal go to the green ball; sees yellow key 1 forward, green ball 2 right, "
        "purple key 1 right 1 forward -> go forward -> 0"
    )


def test_describe_view_doors_carrying_and_hidden_cells() -> None:
    image = np.zeros((7, 7, 3), dtype=np.uint8)
    image[:, :, 0] = OBJECT_TO_IDX["empty"]
    image[:, 0, 0] = OBJECT_TO_IDX["unseen"]  # hidden cells say nothing
    image[3, 4] = (OBJECT_TO_IDX["door"], COLOR_TO_IDX["blue"], 0)  # open door, 2 ahead
    image[0, 3] = (OBJECT_TO_IDX["door"], COLOR_TO_IDX["red"], 2)  # locked, 3 left 3 ahead
    image[1, 6] = (OBJECT_TO_IDX["wall"], COLOR_TO_IDX["grey"], 0)  # wall 2 left
    image[0, 6] = (OBJECT_TO_IDX["wall"], COLOR_TO_IDX["grey"], 0)  # farther: not reported
    image[5, 5] = (OBJECT_TO_IDX["wall"], COLOR_TO_IDX["grey"], 0)  # off-axis wall: not reported
    image[3, 6] = (OBJECT_TO_IDX["key"], COLOR_TO_IDX["blue"], 0)  # agent cell: the carried key
    assert describe_view(image, "open the red door", carrying=("blue", "key")) == (
        "Goal of the agent: open the red door\n"
        "You see a wall 2 steps left\n"
        "You see an open blue door 2 steps forward\n"
        "You see a locked red door 3 steps left and 3 steps forward\n"
        "You carry a blue key"
    )
    assert relative_position(0, 1) == "1 step forward"
    assert relative_position(3, 0) == "3 steps right"
    assert relative_position(-1, 2) == "1 step left and 2 steps forward"


def test_render_step_and_system_prompt() -> None:
    observation = (
        "Goal of the agent: go to the red ball\n"
        "You see a wall 3 steps forward\n"
        "You see a red ball 2 steps left and 1 step forward"
    )
    assert render_babyai_step(observation, "go forward", 0.0) == (
        "goal go to the red ball; sees red ball 2 left 1 forward -> go forward -> 0"
    )
    carrying = "Goal of the agent: pick up a key\nYou carry a blue key"
    assert render_babyai_step(carrying, "drop", 0.5) == (
        "goal pick up a key; sees nothing; carries blue key -> drop -> +0.5"
    )
    with pytest.raises(ValueError, match="not a BabyAI-Text observation"):
        render_babyai_step("You walk along a corridor.", "go forward", 0.0)
    prompt = BabyAITextEnv().system_prompt
    assert all(action in prompt for action in BABYAI_CANDIDATES)


@pytest.mark.parametrize("level", ["BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"])
def test_actions_match_minigrid_under_same_seed(level: str) -> None:
    """Candidate i steps minigrid action i: same views, rewards and ends as minigrid itself."""
    ours = BabyAITextEnv(level)
    reference = gymnasium.make(level).unwrapped
    policy = np.random.default_rng(0)
    for seed in range(3):
        observation, _ = ours.reset(seed=seed)
        ref_observation, _ = reference.reset(seed=seed)
        assert observation == describe_view(ref_observation["image"], ref_observation["mission"])
        done = False
        while not done:
            action = int(policy.integers(6))
            given = BABYAI_CANDIDATES[action] if action % 2 else action
            observation, reward, terminated, truncated, info = ours.step(given)
            ref_observation, ref_reward, ref_terminated, ref_truncated, _ = reference.step(action)
            carried = reference.carrying
            carried = None if carried is None else (carried.color, carried.type)
            expected = describe_view(ref_observation["image"], ref_observation["mission"], carried)
            assert observation == expected
            assert reward == ref_reward and terminated == ref_terminated
            assert truncated == (ref_truncated and not ref_terminated)
            assert info["candidates"] == BABYAI_CANDIDATES
            done = terminated or truncated


def test_truncation_at_level_max_steps() -> None:
    env = gymnasium.make("rllama/BabyAI-GoToLocal-v0", max_steps=5)
    env.reset(seed=1)
    assert env.unwrapped.max_steps == 5
    for step in range(5):
        _, reward, terminated, truncated, _ = env.step("turn left")  # spinning never succeeds
        assert (reward, terminated, truncated) == (0.0, False, step == 4)
    with pytest.raises(RuntimeError):
        env.step("turn left")
    env.reset(seed=1)
    assert env.unwrapped.max_steps == 5  # a fixed limit stays across resets
    assert BabyAITextEnv().reset(seed=1)[0] and BabyAITextEnv().max_steps is None


def _shortest_goto_plan(grid_env) -> list[int]:
    """BFS over (x, y, direction) with turn/forward moves until a target is one step ahead."""
    targets = {tuple(int(v) for v in pos) for pos in grid_env.instrs.desc.obj_poss}
    start = (int(grid_env.agent_pos[0]), int(grid_env.agent_pos[1]), int(grid_env.agent_dir))
    moves = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # minigrid directions: east, south, west, north
    parents = {start: None}
    queue = collections.deque([start])
    while queue:
        state = queue.popleft()
        x, y, direction = state
        ahead = (x + moves[direction][0], y + moves[direction][1])
        if ahead in targets:
            plan = []
            while parents[state] is not None:
                state, action = parents[state]
                plan.append(action)
            return plan[::-1]
        cell = grid_env.grid.get(*ahead)
        following = [((x, y, (direction - 1) % 4), 0), ((x, y, (direction + 1) % 4), 1)]
        if cell is None or cell.can_overlap():
            following.append(((*ahead, direction), 2))
        for successor, action in following:
            if successor not in parents:
                parents[successor] = (state, action)
                queue.append(successor)
    raise AssertionError("no path to the target")


def test_bfs_oracle_solves_goto_local_with_minigrid_reward() -> None:
    env = gymnasium.make("rllama/BabyAI-GoToLocal-v0")
    for seed in range(5):
        env.reset(seed=seed)
        plan = _shortest_goto_plan(env.unwrapped.minigrid_env)
        max_steps = env.unwrapped.max_steps
        for i, action in enumerate(plan):
            _, reward, terminated, truncated, info = env.step(BABYAI_CANDIDATES[action])
            assert terminated == (i == len(plan) - 1) and not truncated
        assert info["success"]
        assert reward == pytest.approx(1 - 0.9 * len(plan) / max_steps)


def test_minigrid_bot_solves_mixed_train_local_through_the_text_env() -> None:
    env = gymnasium.make("rllama/BabyAI-MixedTrainLocal-v0")
    missions = set()
    for seed in range(8):
        _, info = env.reset(seed=seed)
        missions.add(info["mission"].split()[0])
        bot = BabyAIBot(env.unwrapped.minigrid_env)
        done = False
        while not done:
            action = int(bot.replan())
            _, reward, terminated, truncated, info = env.step(BABYAI_CANDIDATES[action])
            done = terminated or truncated
        assert terminated and not truncated and reward > 0 and info["success"]
    assert len(missions) >= 3  # mixed instruction kinds: go to / pick up / put


def test_mixed_train_local_is_deterministic_and_one_room() -> None:
    first = BabyAITextEnv("MixedTrainLocal")
    second = gymnasium.make("rllama/BabyAI-MixedTrainLocal-v0")
    for seed in range(4):
        assert first.reset(seed=seed)[0] == second.reset(seed=seed)[0]
    level = first.minigrid_env
    assert (level.num_rows, level.num_cols, level.room_size) == (1, 1, 8)
    assert len(level.get_room(0, 0).objs) == 8
