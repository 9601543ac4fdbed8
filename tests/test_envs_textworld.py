"""Tests of the TextWorld env: cached seeded generation, admissible commands, winning walkthroughs."""

from __future__ import annotations

import gymnasium
import pytest
import textworld

import rllama_jax.envs  # noqa: F401  (registers the rllama/ ids)
from rllama_jax.envs.textworld_env import (
    PRESETS,
    TextWorldEnv,
    clean_observation,
    default_cache_dir,
    game_path,
    make_game_file,
    render_textworld_step,
    textworld_extract_action,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("textworld_cache")


def test_generation_is_cached_and_deterministic_by_seed(cache_dir, tmp_path, monkeypatch) -> None:
    path = make_game_file("easy", 0, cache_dir)
    assert path == game_path("easy", 0, cache_dir) and path.name == "easy-r2-o4-q2-s0.z8"
    assert path.with_suffix(".json").exists()
    stamp = path.stat().st_mtime_ns
    assert make_game_file("easy", 0, cache_dir) == path
    assert path.stat().st_mtime_ns == stamp  # served from the cache, not regenerated
    again = make_game_file("easy", 0, tmp_path)  # a fresh cache regenerates the same bytes
    assert again.read_bytes() == path.read_bytes()
    assert again.with_suffix(".json").read_bytes() == path.with_suffix(".json").read_bytes()
    other = make_game_file("easy", 1, cache_dir)
    assert other.read_bytes() != path.read_bytes()
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setenv("RLLAMA_JAX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "textworld"
    with pytest.raises(ValueError, match="unknown difficulty"):
        make_game_file("impossible", 0, cache_dir)


def test_candidates_are_the_sorted_admissible_commands(cache_dir) -> None:
    env = TextWorldEnv("easy", game_seeds=[0], cache_dir=cache_dir)
    observation, info = env.reset(seed=0)
    direct = textworld.start(
        str(make_game_file("easy", 0, cache_dir)),
        request_infos=textworld.EnvInfos(admissible_commands=True),
    )
    state = direct.reset()
    assert info["candidates"] == sorted(state["admissible_commands"])
    assert observation == clean_observation(state.feedback)
    assert observation in env.observation_space
    assert "$$$" not in observation and not observation.endswith("=-0/1")
    for _ in range(3):
        command = "look" if "look" in info["candidates"] else info["candidates"][0]
        observation, reward, terminated, truncated, info = env.step(command)
        state, _, _ = direct.step(command)
        assert info["candidates"] == sorted(state["admissible_commands"])
        assert observation == clean_observation(state.feedback)
        assert (reward, terminated, truncated) == (0.0, False, False)
    with pytest.raises(ValueError, match="unknown action"):
        env.step("fly to the moon")
    direct.close()
    env.close()


@pytest.mark.parametrize("difficulty", ["easy", "medium"])
def test_walkthrough_wins_with_positive_reward(cache_dir, difficulty: str) -> None:
    env = gymnasium.make(
        f"rllama/TextWorld-{difficulty}-v0", game_seeds=[2], cache_dir=cache_dir, max_steps=100
    )
    _, info = env.reset(seed=0)
    walkthrough = info["policy_commands"]
    assert len(walkthrough) >= PRESETS[difficulty].quest_length // 2
    total, terminated = 0.0, False
    for i, command in enumerate(walkthrough):
        assert command in info["candidates"]
        observation, reward, terminated, truncated, info = env.step(command)
        total += reward
        assert terminated == (i == len(walkthrough) - 1) and not truncated
    assert info["won"] and not info["lost"]
    assert total == info["max_score"] > 0
    assert "The End" in observation
    env.close()


def test_pool_choice_is_seeded_and_truncation(cache_dir) -> None:
    env = TextWorldEnv("easy", game_seeds=[0, 1], cache_dir=cache_dir, max_steps=2)
    picks = [env.reset(seed=seed)[1]["game_seed"] for seed in range(8)]
    assert picks == [env.reset(seed=seed)[1]["game_seed"] for seed in range(8)]
    assert set(picks) == {0, 1}
    env.reset(seed=0)
    assert env.step("look")[3] is False
    _, reward, terminated, truncated, _ = env.step("look")
    assert (reward, terminated, truncated) == (0.0, False, True)
    env.close()


def test_seed_helpers_golden() -> None:
    banner = "   \\$$    \\$$$$$$$$ \\$$   \\$$    \\$$          \n\n  \\$$$$$$$ \n\n"
    feedback = banner + "Welcome!\n\n-= Kitchen =-\nA stove.\n\n>          -= Kitchen =-0/1"
    assert clean_observation(feedback) == "Welcome!\n\n-= Kitchen =-\nA stove."
    assert clean_observation("\nYou take the apple.\n\n\n\n>   -= Kitchen =-0/2") == (
        "You take the apple."
    )
    assert textworld_extract_action("I think so.\nCommand: open door\nthanks") == "open door"
    assert textworld_extract_action("no idea") == "look"
    assert render_textworld_step("-= Kitchen =-\nA stove.", "take apple", 1.0) == (
        "[Kitchen] A stove. -> take apple -> +1"
    )
    assert render_textworld_step("You take the apple.", "take apple", 0.0) == (
        "You take the apple. -> take apple -> 0"
    )
    assert "command: " in TextWorldEnv(cache_dir="/nonexistent").system_prompt
