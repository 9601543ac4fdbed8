"""The README's agent API end to end on a tiny random Llama (with the SmolLM2 tokenizer):
the seed README's BlackjackAgent, in generate and score mode, through the single-env loop
and the batched ``train`` helper, and save/load."""

from __future__ import annotations

import re

import gymnasium as gym
import jax
import numpy as np
import pytest

import rllama_jax.envs  # noqa: F401
from rllama_jax import RLlamaAgent
from rllama_jax.models import LlamaConfig, init_params
from rllama_jax.models.loading import default_model_dir, load_tokenizer

MODEL = LlamaConfig(
    vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip


class BlackjackAgent(RLlamaAgent):
    """Verbatim from the RLlama README."""

    def get_system_prompt(self) -> str:
        return """You are an expert blackjack player. Follow these rules:
        1. ALWAYS hit if your total is 11 or below
        2. With 12-16: hit if dealer shows 7+, stay if 6 or lower
        3. ALWAYS stay if your total is 17+ without an ace
        4. With a usable ace: hit if total is 17 or below"""

    def format_observation(self, observation) -> str:
        return f"Current hand total: {observation[0]}\nDealer's card: {observation[1]}\nUsable ace: {'yes' if observation[2] else 'no'}"

    def extract_action(self, response: str):
        return 0 if "stay" in response.lower() else 1


class ScoringBlackjackAgent(BlackjackAgent):
    def candidate_actions(self, observation) -> list[str]:
        return ["stay", "hit"]


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer(default_model_dir())
    return lambda: (MODEL, init_params(MODEL, jax.random.key(0)), tok)


def readme_loop(agent, episodes: int) -> list[dict]:
    """The RLlama README's training loop, verbatim apart from the episode count."""
    env = gym.make("Blackjack-v1")
    results = []
    for episode in range(episodes):
        observation, info = env.reset(seed=episode)
        done = False
        while not done:
            action = agent.act(observation)
            observation, reward, terminated, truncated, info = env.step(action)
            agent.assign_reward(reward)
            done = terminated or truncated
        results.append(agent.terminate_episode())
    return results


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_readme_blackjack_loop_trains(tiny, mode):
    cls = BlackjackAgent if mode == "generate" else ScoringBlackjackAgent
    agent = cls(tiny(), algorithm="ppo", batch_size=4, max_new_tokens=6, lora_rank=2, epochs=1)
    assert agent.train_config.action_mode == mode
    before = jax.tree.map(np.asarray, agent.state.trainable)
    results = readme_loop(agent, episodes=6)
    updates = [r for r in results if r]
    # Blackjack episodes last 1+ turns: 6 episodes give at least one batch of 4 turns.
    assert updates, results
    assert all(np.isfinite(r["loss"]) for r in updates)
    assert int(agent.state.step) == len(updates)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)), before, agent.state.trainable
    )
    assert any(jax.tree.leaves(changed))


def test_batched_train_helper_and_memory(tiny):
    agent = ScoringBlackjackAgent(
        tiny(), algorithm="a2c", batch_size=3, trainable="heads", memory="both",
        memory_tokens=16,
    )  # fmt: skip
    history = agent.train("Blackjack-v1", num_steps=12, num_envs=2)
    assert len(history) == 2  # 12 steps / (2 envs x 3 turns)
    assert all(np.isfinite(h["loss"]) for h in history)
    assert np.isfinite(history[-1]["mean_return"])
    # finished turns were written to episodic memory by train_step
    assert int(agent.state.memory.episodic.valid.sum()) == 12


def test_act_batch_and_save_load(tiny, tmp_path):
    agent = ScoringBlackjackAgent(tiny(), algorithm="ppo", batch_size=2, lora_rank=2, epochs=1)
    obs = [(20, 10, False), (5, 2, False), (13, 7, True)]
    actions = agent.act_batch(obs)
    assert len(actions) == 3 and set(actions) <= {0, 1}
    readme_loop(agent, episodes=3)
    agent.save(str(tmp_path / "ckpt"))
    other = ScoringBlackjackAgent(tiny(), algorithm="ppo", batch_size=2, lora_rank=2, epochs=1)
    other.load(str(tmp_path / "ckpt"))
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, agent.state.trainable),
        jax.tree.map(np.asarray, other.state.trainable),
    )
    assert int(other.state.step) == int(agent.state.step)


def test_score_mode_without_candidates_is_an_error(tiny):
    agent = BlackjackAgent(tiny(), action_mode="score", lora_rank=2)
    with pytest.raises(ValueError, match="candidate_actions"):
        agent.act((20, 10, False))


class TextWorldAgent(RLlamaAgent):
    """From the RLlama README (one trailing space dropped)."""

    def get_system_prompt(self) -> str:
        return """You will be playing a text-based game. Here are some example commands:
        'go west', 'inventory', 'drop teacup', 'examine broom', 'open door', 'look'."""

    def format_observation(self, observation) -> str:
        return observation.split("$$$$$$$ \n\n")[-1].strip()

    def extract_action(self, response: str) -> str:
        command_match = re.search(r"command: (.+?)(?=\n|$)", response, re.IGNORECASE)
        return command_match.group(1) if command_match else "look"


def test_readme_textworld_agent_runs_episodes(tiny):
    agent = TextWorldAgent(
        tiny(),
        algorithm="reinforce",
        batch_size=4,
        episodes_per_update=2,
        max_new_tokens=8,
        lora_rank=2,
        prompt_len=512,
    )
    env = gym.make("rllama/TextWorld-easy-v0", max_steps=3)
    results = []
    for episode in range(3):
        observation, info = env.reset(seed=episode)
        done = False
        while not done:
            action = agent.act(observation)
            # A random model never writes "command: ...": the README's fallback is "look".
            assert action == "look"
            observation, reward, terminated, truncated, info = env.step(action)
            agent.assign_reward(reward)
            done = terminated or truncated
        results.append(agent.terminate_episode(truncated=truncated and not terminated))
    # REINFORCE learns from whole episodes, 2 per update (rows of up to 4 turns).
    assert [bool(r) for r in results] == [False, True, False]
    assert int(agent.state.step) == 1 and np.isfinite(results[1]["loss"])


@pytest.mark.parametrize("algo", ["dqn", "sac"])
def test_off_policy_agents_single_env_and_batched(tiny, algo):
    agent = ScoringBlackjackAgent(
        tiny(), algorithm=algo, batch_size=4, lora_rank=2, replay_capacity=64, replay_batch=8
    )
    results = readme_loop(agent, episodes=6)
    updates = [r for r in results if r]
    assert updates and all(np.isfinite(r["loss"]) for r in updates)
    filled = int(agent.state.replay.valid.sum())
    assert filled == 4 * len(updates)
    history = agent.train("Blackjack-v1", num_steps=8, num_envs=2)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert int(agent.state.replay.valid.sum()) == filled + 2 * 4  # 2 envs x batch_size turns


def test_single_env_loop_writes_episodic_memory(tiny):
    """act / assign_reward / terminate_episode: the train step stores every trained turn in
    episodic memory (key, "observation -> action -> reward", return, the candidate taken)."""
    agent = ScoringBlackjackAgent(
        tiny(), algorithm="ppo", batch_size=4, trainable="heads", memory="episodic",
        memory_tokens=32, epochs=1, gamma=1.0,
    )  # fmt: skip
    results = readme_loop(agent, episodes=6)
    assert any(results)
    mem = agent.state.memory.episodic
    valid = np.asarray(mem.valid)
    assert valid.sum() == 4 * int(agent.state.step) > 0
    actions = np.asarray(mem.actions)[valid]
    assert set(actions.tolist()) <= {0, 1}
    tok = tiny()[2]
    for tokens, mask, action, ret in zip(
        np.asarray(mem.tokens)[valid], np.asarray(mem.token_mask)[valid], actions,
        np.asarray(mem.returns)[valid], strict=True,
    ):  # fmt: skip
        text = tok.decode(tokens[mask])
        assert text.startswith("Current hand total:") and text.endswith("\n"), text
        assert f" -> {action} -> " in text, text  # the env action (0 stay, 1 hit)
        assert -1.0 <= ret <= 1.5  # an undiscounted Blackjack return-to-go


def test_agent_takes_the_launchers_episodic_retrieval_options(tiny):
    """episodic_decay / episodic_recency / episodic_center reach the agent's memory as the
    launcher's flags do; an out-of-range decay is refused in one line."""
    agent = ScoringBlackjackAgent(
        tiny(), trainable="heads", memory="episodic", episodic_decay=0.5, episodic_recency=1.0,
        episodic_center=True,
    )  # fmt: skip
    cfg = agent.train_config.memory.episodic
    assert (cfg.decay, cfg.w_rec, cfg.center_keys) == (0.5, 1.0, True)
    with pytest.raises(ValueError, match=r"need 0 < decay <= 1, got 0.0"):
        ScoringBlackjackAgent(tiny(), trainable="heads", memory="episodic", episodic_decay=0.0)


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_agent_shares_the_system_prompt_and_acts_as_without(tiny, mode):
    """The agent runs its system prompt once per call (``prefix_len`` from
    ``get_system_prompt()``): the same turns' log-probs and values as an agent that runs it
    per row (share_prefix=False), with working memory on; a system prompt that changes
    afterwards is refused in one line."""
    cls = BlackjackAgent if mode == "generate" else ScoringBlackjackAgent
    kw = dict(algorithm="ppo", batch_size=4, max_new_tokens=4, lora_rank=2, memory="working",
              temperature=1.0, top_p=1.0)  # fmt: skip
    shared, plain = cls(tiny(), **kw), cls(tiny(), share_prefix=False, **kw)
    assert shared.train_config.prefix_len > 50 and plain.train_config.prefix_len == 0
    for agent in (shared, plain):
        for obs, reward in (((14, 10, False), -1.0), ((20, 3, True), 1.0)):
            agent.act(obs)
            agent.assign_reward(reward)
    for a, b in zip(shared._episode, plain._episode, strict=True):
        if mode == "score":
            np.testing.assert_array_equal(a.action, b.action)
        else:
            np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
        np.testing.assert_allclose(a.logp, b.logp, rtol=1e-5, atol=1e-5)
        assert a.value == pytest.approx(b.value, abs=1e-5)
    shared.get_system_prompt = lambda: "You play blackjack."
    with pytest.raises(ValueError, match="share_prefix=False"):
        shared.act((12, 2, False))


def test_agent_train_on_a_mesh_and_in_bf16(tiny):
    """``agent.train(mesh=...)`` runs the launcher's sharded loop (here on this process's one
    device): the same updates as without a mesh, within float32 summation order (1e-6);
    ``precision="bf16"`` trains with bfloat16 compute and keeps the LLM's frozen weights in
    bfloat16 from then on."""

    def trained(**kw):
        agent = ScoringBlackjackAgent(tiny(), algorithm="ppo", batch_size=2, trainable="lora")
        history = agent.train("Blackjack-v1", num_steps=8, num_envs=2, **kw)
        return agent, history

    plain, _ = trained()
    meshed, history = trained(mesh="data:1")
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    for a, b in zip(jax.tree.leaves(plain.state.trainable), jax.tree.leaves(meshed.state.trainable),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(
        ValueError, match=r"mesh spec 'data:2' asks for .* = 2 devices, but there are 1"
    ):
        trained(mesh="data:2")
    half, history = trained(precision="bf16")
    assert all(np.isfinite(h["loss"]) for h in history)
    assert half.precision == "bf16"
    frozen = [x for x in jax.tree.leaves(half.state.frozen) if x.ndim >= 2]
    assert frozen and all(x.dtype == jax.numpy.bfloat16 for x in frozen)
