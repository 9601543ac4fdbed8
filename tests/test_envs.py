"""Tests of the rllama/ text environments: golden texts, gymnasium semantics, memory probes."""

from __future__ import annotations

import importlib

import gymnasium
import numpy as np
import pytest

import rllama_jax.envs as envs
from rllama_jax.envs import (
    BlackjackTextEnv,
    KeyedBanditEnv,
    TMazeEnv,
    blackjack_extract_action,
    format_blackjack_observation,
)


def test_registration_is_idempotent_and_make_works() -> None:
    importlib.reload(envs)  # registers again: must not raise or duplicate
    for env_id, cls in [
        ("rllama/Blackjack-v0", BlackjackTextEnv),
        ("rllama/TMaze-v0", TMazeEnv),
        ("rllama/KeyedBandit-v0", KeyedBanditEnv),
    ]:
        env = gymnasium.make(env_id)
        assert type(env.unwrapped).__name__ == cls.__name__
        observation, info = env.reset(seed=0)
        assert isinstance(observation, str) and observation in env.observation_space
        assert info["candidates"] and all(isinstance(c, str) for c in info["candidates"])
        _, _, _, _, info = env.step(0)
        assert "candidates" in info


# --- Blackjack ---------------------------------------------------------------------------------


def test_blackjack_golden_texts() -> None:
    assert format_blackjack_observation((19, 10, False)) == (
        "Current hand total: 19\nDealer's card: 10\nUsable ace: no"
    )
    assert format_blackjack_observation((np.int64(13), 1, 1)) == (
        "Current hand total: 13\nDealer's card: 1\nUsable ace: yes"
    )
    env = gymnasium.make("rllama/Blackjack-v0").unwrapped
    assert env.system_prompt.startswith("You are an expert blackjack player. Follow these rules:\n")
    assert "2. With 12-16: hit if dealer shows 7+, stay if 6 or lower\n" in env.system_prompt
    assert env.system_prompt.endswith('Answer with "stay" or "hit".')
    observation = "Current hand total: 19\nDealer's card: 10\nUsable ace: no"
    assert env.render_step(observation, "stay", 1.0) == "hand 19, dealer 10 -> stay -> +1"
    soft = "Current hand total: 17\nDealer's card: 6\nUsable ace: yes"
    assert env.render_step(soft, "hit", 0.0) == "hand 17 (usable ace), dealer 6 -> hit -> 0"
    with pytest.raises(ValueError, match="not a blackjack observation"):
        env.render_step("You walk along a corridor.", "hit", 0.0)


def test_blackjack_extract_action_is_the_seeds() -> None:
    assert blackjack_extract_action("I will STAY here.") == 0
    assert blackjack_extract_action("Hit me") == 1
    assert blackjack_extract_action("no idea") == 1  # anything without "stay" hits, as the seed


@pytest.mark.parametrize("as_string", [False, True])
def test_blackjack_matches_gymnasium_under_same_seed(as_string: bool) -> None:
    ours = BlackjackTextEnv()
    reference = gymnasium.make("Blackjack-v1")
    steps = 0
    for seed in range(20):
        observation, info = ours.reset(seed=seed)
        ref_observation, _ = reference.reset(seed=seed)
        assert info["candidates"] == ["stay", "hit"]
        assert observation == format_blackjack_observation(ref_observation)
        done = False
        policy = np.random.default_rng(seed)
        while not done:
            action = int(policy.integers(2))
            given = info["candidates"][action] if as_string else action
            observation, reward, terminated, truncated, info = ours.step(given)
            ref_observation, ref_reward, ref_terminated, ref_truncated, _ = reference.step(action)
            assert observation == format_blackjack_observation(ref_observation)
            assert (reward, terminated, truncated) == (ref_reward, ref_terminated, ref_truncated)
            assert info["candidates"] == ["stay", "hit"]
            done = terminated or truncated
            steps += 1
    assert steps > 20  # some hands had more than one decision


def test_blackjack_reset_is_deterministic_given_seed() -> None:
    env = BlackjackTextEnv()
    firsts = [env.reset(seed=seed)[0] for seed in (3, 3, 4, 5, 6)]
    assert firsts[0] == firsts[1]
    assert len(set(firsts[1:])) > 1


# --- T-maze ------------------------------------------------------------------------------------


def test_tmaze_golden_texts() -> None:
    env = TMazeEnv()
    observation, info = env.reset(seed=0)
    assert observation == f"The signpost says: go {info['cue'].upper()}."
    assert info["candidates"] == ["go forward"]
    assert "remember it" in env.system_prompt
    assert env.render_step("The signpost says: go LEFT.", "go forward", 0.0) == (
        "signpost LEFT -> go forward -> 0"
    )
    assert env.render_step("You walk along a corridor.", "go forward", 0.0) == (
        "corridor -> go forward -> 0"
    )
    assert env.render_step("You reach a junction. Turn left or right?", "turn right", -1.0) == (
        "junction -> turn right -> -1"
    )


def test_tmaze_episode_shape_and_termination() -> None:
    for corridor_length in (0, 3, 5):
        env = gymnasium.make("rllama/TMaze-v0", corridor_length=corridor_length)
        observation, info = env.reset(seed=1)
        seen = [observation]
        for _ in range(corridor_length + 1):
            observation, reward, terminated, truncated, info = env.step("go forward")
            assert (reward, terminated, truncated) == (0.0, False, False)
            seen.append(observation)
        assert len(seen) == corridor_length + 2
        assert seen[1:-1] == ["You walk along a corridor."] * corridor_length
        assert seen[-1] == "You reach a junction. Turn left or right?"
        assert info["candidates"] == ["turn left", "turn right"]
        _, reward, terminated, truncated, _ = env.step("turn left")
        assert reward in (1.0, -1.0)
        assert (terminated, truncated) == (True, False)
        with pytest.raises(RuntimeError):
            env.step(0)


def _run_tmaze(env: TMazeEnv, seed: int, remember: bool) -> float:
    """Return of one episode; ``remember`` reads the cue from the first observation."""
    observation, info = env.reset(seed=seed)
    cue = "left" if "LEFT" in observation else "right"
    while True:
        if info["candidates"] == ["go forward"]:
            action = "go forward"
        else:
            assert observation == "You reach a junction. Turn left or right?"
            action = f"turn {cue}" if remember else "turn left"
        observation, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return reward


def test_tmaze_memory_policy_always_wins() -> None:
    env = TMazeEnv(corridor_length=3)
    assert [_run_tmaze(env, seed, remember=True) for seed in range(50)] == [1.0] * 50


def test_tmaze_memoryless_policy_is_at_chance() -> None:
    # Binomial(200, 0.5): sd ~7.1 wins, so [80, 120] wins (40-60%) is +-2.8 sd (p ~ 0.005);
    # the seeds are fixed, so the outcome is deterministic.
    env = TMazeEnv(corridor_length=3)
    wins = sum(_run_tmaze(env, seed, remember=False) == 1.0 for seed in range(200))
    assert 80 <= wins <= 120


def test_tmaze_cue_is_deterministic_given_seed() -> None:
    env = TMazeEnv()
    cues = [env.reset(seed=seed)[1]["cue"] for seed in range(10)]
    assert cues == [env.reset(seed=seed)[1]["cue"] for seed in range(10)]
    assert set(cues) == {"left", "right"}


# --- Keyed bandit ------------------------------------------------------------------------------


def test_keyed_bandit_golden_texts() -> None:
    env = KeyedBanditEnv()
    assert env.situations == ["a red door", "a blue box", "a green chest", "a yellow lamp"]
    observation, info = env.reset(seed=0)
    assert observation == f"You face {info['situation']}. Which lever do you pull?"
    assert info["candidates"] == ["pull lever A", "pull lever B"]
    assert env.system_prompt.endswith('Answer with one action: "pull lever A" or "pull lever B".')
    assert env.render_step(
        "You face a red door. Which lever do you pull?", "pull lever B", 1.0
    ) == ("a red door -> pull lever B -> +1")
    three = KeyedBanditEnv(num_arms=3)
    assert three.reset(seed=0)[1]["candidates"] == ["pull lever A", "pull lever B", "pull lever C"]
    assert '"pull lever A", "pull lever B" or "pull lever C"' in three.system_prompt
    assert len(set(envs.situation_names(64))) == 64


def test_keyed_bandit_oracle_always_wins_and_mapping_is_stable() -> None:
    env = gymnasium.make("rllama/KeyedBandit-v0", num_situations=6, num_arms=3, mapping_seed=7)
    mapping = dict(env.unwrapped.paying_arms)
    assert sorted(mapping.values()) == [0, 0, 1, 1, 2, 2]  # balanced
    seen = set()
    for seed in range(60):
        _, info = env.reset(seed=seed)
        seen.add(info["situation"])
        _, reward, terminated, truncated, _ = env.step(mapping[info["situation"]])
        assert (reward, terminated, truncated) == (1.0, True, False)
        wrong = (mapping[info["situation"]] + 1) % 3
        env.reset(seed=seed)
        assert env.step(wrong)[1] == 0.0
    assert len(seen) == 6  # every situation recurred under the same mapping
    assert env.unwrapped.paying_arms == mapping


def test_keyed_bandit_mapping_depends_on_mapping_seed() -> None:
    assert KeyedBanditEnv(mapping_seed=3).paying_arms == KeyedBanditEnv(mapping_seed=3).paying_arms
    mappings = {tuple(KeyedBanditEnv(mapping_seed=s).paying_arms.values()) for s in range(10)}
    assert len(mappings) > 1


def test_non_stationary_keyed_bandit_redraws_the_mapping_every_k_episodes() -> None:
    """remap_every=K: the mapping holds for K episodes, then a new balanced one is drawn;
    two envs with the same mapping_seed stepped together agree in every block (one shared
    memory stays consistent), and the oracle of the current block always wins."""
    k = 5
    envs_ = [KeyedBanditEnv(num_situations=8, num_arms=2, mapping_seed=3, remap_every=k)
             for _ in range(2)]  # fmt: skip
    assert "changes from time to time" in envs_[0].system_prompt
    blocks = []
    for episode in range(6 * k):
        maps = []
        for i, env in enumerate(envs_):
            _, info = env.reset(seed=100 * i + episode)
            maps.append(dict(env.paying_arms))
            _, reward, *_ = env.step(env.paying_arms[info["situation"]])
            assert reward == 1.0
        assert maps[0] == maps[1]
        assert sorted(maps[0].values()) == [0] * 4 + [1] * 4
        if episode % k == 0:
            blocks.append(maps[0])
        else:
            assert maps[0] == blocks[-1]  # fixed within a block
    assert len({tuple(m.values()) for m in blocks}) > 2  # redrawn across blocks
    # Block 0 is the stationary env's mapping; remap_every=0 never changes it.
    assert blocks[0] == KeyedBanditEnv(num_situations=8, mapping_seed=3).paying_arms
    with pytest.raises(ValueError, match="remap_every"):
        KeyedBanditEnv(remap_every=-1)


# --- Shared semantics --------------------------------------------------------------------------


def test_truncation_before_episode_end() -> None:
    env = TMazeEnv(corridor_length=3, max_steps=2)
    env.reset(seed=0)
    assert env.step(0)[2:4] == (False, False)
    _, _, terminated, truncated, info = env.step(0)
    assert (terminated, truncated) == (False, True)
    assert info["candidates"] == ["go forward"]
    with pytest.raises(RuntimeError):
        env.step(0)

    blackjack = BlackjackTextEnv(max_steps=1)
    truncations = 0
    for seed in range(30):
        observation, _ = blackjack.reset(seed=seed)
        total = int(observation.split("\n")[0].rsplit(" ", 1)[1])
        _, _, terminated, truncated, _ = blackjack.step("hit")
        if total <= 11:  # a hit cannot bust: the hand goes on, so max_steps cuts it
            assert (terminated, truncated) == (False, True)
            truncations += 1
        else:
            assert not (terminated and truncated)
    assert truncations > 0


def test_invalid_actions_raise_value_error_naming_them() -> None:
    env = TMazeEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="'turn left'.*'go forward'"):
        env.step("turn left")  # not offered in the corridor
    with pytest.raises(ValueError, match="out of range"):
        env.step(1)
    blackjack = BlackjackTextEnv()
    blackjack.reset(seed=0)
    with pytest.raises(ValueError, match="'double down'.*'stay', 'hit'"):
        blackjack.step("double down")
    assert blackjack.step(" STAY ")[2] is True  # strip + case-insensitive match, stay ends it
