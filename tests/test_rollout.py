"""The score-mode environment loop: batch shapes and masks, truncation vs termination,
auto-reset, and that its batches train."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rllama_jax.envs  # noqa: F401  (registers rllama/ envs)
from rllama_jax.algos import DQN, GRPO, PPO, Reinforce
from rllama_jax.memory import EpisodicConfig, MemoryConfig, WorkingConfig
from rllama_jax.models import LlamaConfig, init_params
from rllama_jax.models.loading import default_model_dir, load_tokenizer
from rllama_jax.models.lora import LoraConfig
from rllama_jax.rollout import Rollout, RolloutConfig
from rllama_jax.sampling import SamplingConfig
from rllama_jax.train import (
    TrainConfig,
    evaluate_score,
    init_train_state,
    make_train_step,
    n_step_transitions,
    remember_batch,
)

MODEL = LlamaConfig(
    vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir())


def test_tmaze_rollout_shapes_truncation_and_training(tok):
    n, t = 3, 7
    # corridor 3 -> 5 observations per episode; max_steps=4 truncates every episode at step 4.
    envs = [gym.make("rllama/TMaze-v0", corridor_length=3, max_steps=4) for _ in range(n)]
    cfg = TrainConfig(algorithm=PPO(epochs=1), trainable="lora", lora=LoraConfig(rank=2))
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    # A value head that is not identically zero, so bootstrap values are visible.
    heads = state.trainable["heads"]
    heads["value"]["b"] = jnp.asarray([0.5])
    rollout = Rollout(
        envs,
        tok,
        MODEL,
        cfg,
        RolloutConfig(num_steps=t, prompt_len=128, max_actions=2, candidate_len=3),
    )
    state, batch = rollout.collect(state)
    assert batch.obs.prompt_tokens.shape == (n, t, 128)
    assert batch.obs.candidate_tokens.shape == (n, t, 2, 3)
    assert batch.actions.shape == batch.rewards.shape == batch.old_logp.shape == (n, t)
    # Every row's last prompt token is real (left padding) and the prompt ends with the
    # assistant header of the chat template.
    assert batch.obs.prompt_mask[:, :, -1].all()
    text = tok.decode(batch.obs.prompt_tokens[0, 0][batch.obs.prompt_mask[0, 0].astype(bool)])
    assert "signpost" in text and text.rstrip().endswith("assistant")
    # Corridor steps offer one candidate: the second action slot is masked there.
    assert not batch.obs.action_mask[:, 1, 1].any()
    assert (batch.actions[:, 1] == 0).all()
    # Steps 0-3 then truncation at the 4th step (index 3), reset, again at index 7 > t.
    assert batch.truncated[:, 3].all() and not batch.terminated[:, 3].any()
    assert not batch.truncated[:, [0, 1, 2, 4, 5, 6]].any()
    np.testing.assert_allclose(batch.final_values[:, 3], 0.5, atol=1e-6)
    assert (batch.final_values[:, [0, 1, 2, 4, 5, 6]] == 0).all()
    # After the reset at step 4 the signpost is seen again.
    text4 = tok.decode(batch.obs.prompt_tokens[0, 4][batch.obs.prompt_mask[0, 4].astype(bool)])
    assert "signpost" in text4
    np.testing.assert_allclose(batch.bootstrap_value, 0.5, atol=1e-6)
    assert np.all(batch.old_logp <= 0)
    step = make_train_step(cfg, MODEL)
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    assert int(state.skipped) == 0 and np.isfinite(float(metrics["loss"]))


def test_blackjack_rollout_records_episode_returns(tok):
    envs = [gym.make("rllama/Blackjack-v0") for _ in range(2)]
    cfg = TrainConfig(algorithm=PPO(epochs=1), trainable="heads")
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    rollout = Rollout(envs, tok, MODEL, cfg, RolloutConfig(num_steps=6, prompt_len=256))
    state, batch = rollout.collect(state)
    # Blackjack rewards are -1, 0, +1 and only terminal steps pay.
    assert set(np.unique(batch.rewards)) <= {-1.0, 0.0, 1.0}
    assert (batch.rewards[~batch.terminated] == 0).all()
    assert rollout.episodes.count == int(batch.terminated.sum())
    assert len(rollout.episodes.recent) == rollout.episodes.count
    np.testing.assert_allclose(rollout.episodes.total, batch.rewards.sum())
    np.testing.assert_allclose(sum(rollout.episodes.recent), batch.rewards.sum())


def memory_config(tok, mode: str) -> MemoryConfig:
    d = MODEL.hidden_size
    return MemoryConfig(
        mode=mode,
        representation="text",
        episodic=EpisodicConfig(capacity=16, key_dim=d, max_tokens=12, k=2),
        working=WorkingConfig(window=3, max_tokens=12, key_dim=d),
        episodic_header=tuple(tok(" Past:", add_special_tokens=False)["input_ids"]),
        working_header=tuple(tok(" Recent:", add_special_tokens=False)["input_ids"]),
    )


def decode_prompt(tok, batch, i, t) -> str:
    mask = np.asarray(batch.obs.prompt_mask[i, t]).astype(bool)
    return tok.decode(np.asarray(batch.obs.prompt_tokens[i, t])[mask])


def test_working_memory_reaches_prompt_and_clears_at_episode_end(tok):
    envs = [gym.make("rllama/TMaze-v0", corridor_length=1) for _ in range(2)]
    cfg = TrainConfig(
        algorithm=PPO(epochs=1), trainable="heads", memory=memory_config(tok, "working")
    )
    state = init_train_state(
        cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1), num_envs=2
    )
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=4, prompt_len=128, candidate_len=3)
    )
    state, batch = rollout.collect(state)
    first, second, third, after = (decode_prompt(tok, batch, 0, t) for t in range(4))
    assert "Recent:" not in first  # nothing remembered yet
    # Step 1 (corridor) sees step 0 (the signpost) in its recent steps, inside the user turn.
    assert "Recent:" in second and "signpost" in second.split("Recent:")[1]
    cue = "LEFT" if "LEFT" in first else "RIGHT"
    assert f"signpost {cue}" in third  # the junction still remembers the cue
    assert batch.terminated[:, 2].all()  # corridor 1 -> 3 steps per episode
    assert "Recent:" not in after  # cleared at episode end
    assert batch.obs.prompt_tokens.shape[-1] > 128  # the memory region widened the prompt


def test_episodic_memory_written_by_train_step_and_retrieved(tok):
    envs = [gym.make("rllama/KeyedBandit-v0", num_situations=2) for _ in range(2)]
    cfg = TrainConfig(
        algorithm=PPO(epochs=1), trainable="heads", memory=memory_config(tok, "episodic")
    )
    state = init_train_state(
        cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1), num_envs=2
    )
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=2, prompt_len=128, candidate_len=4)
    )
    state, batch = rollout.collect(state)
    assert "Past:" not in decode_prompt(tok, batch, 0, 0)
    assert batch.memory_keys.shape == (2, 2, MODEL.hidden_size)
    step = make_train_step(cfg, MODEL)
    state, _ = step(state, jax.tree.map(jnp.asarray, batch))
    assert int(state.memory.episodic.valid.sum()) == 4
    stored = np.asarray(state.memory.episodic.returns)[np.asarray(state.memory.episodic.valid)]
    np.testing.assert_allclose(np.sort(stored), np.sort(batch.rewards.reshape(-1)))
    state, batch2 = rollout.collect(state)
    text = decode_prompt(tok, batch2, 0, 0)
    assert "Past:" in text and "lever" in text.split("Past:")[1], text


def test_generate_mode_rollout_and_parse_failures(tok):
    envs = [gym.make("rllama/Blackjack-v0") for _ in range(2)]
    cfg = TrainConfig(
        algorithm=PPO(epochs=1),
        action_mode="generate",
        trainable="lora",
        lora=LoraConfig(rank=2),
        sampling=SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=1.0),
    )
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    seen = []

    def extract(reply: str):
        seen.append(reply)
        return None  # a random model's reply never parses: every turn falls back

    rollout = Rollout(
        envs,
        tok,
        MODEL,
        cfg,
        RolloutConfig(num_steps=3, prompt_len=256, fallback_action=0, parse_penalty=-0.5),
        extract_action=extract,
    )
    state, batch = rollout.collect(state)
    assert len(seen) == 6 and rollout.parse_failures == 6
    # Fallback 0 = stay: every episode ends after one turn, reward in {-1, 0, 1} - 0.5.
    assert batch.terminated.all()
    assert set(np.unique(batch.rewards)) <= {-1.5, -0.5, 0.5}
    assert batch.response_tokens.shape == (2, 3, 5) and batch.old_logp.shape == (2, 3, 5)
    assert (batch.old_logp[~batch.response_mask.astype(bool)] == 0).all()
    step = make_train_step(cfg, MODEL)
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    assert int(state.skipped) == 0 and np.isfinite(float(metrics["loss"]))


def test_grpo_layout_one_episode_per_row_grouped_by_seed(tok):
    envs = [gym.make("rllama/TMaze-v0", corridor_length=2) for _ in range(4)]
    cfg = TrainConfig(
        algorithm=GRPO(group_size=2, epochs=1), trainable="lora", lora=LoraConfig(rank=2)
    )
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=6, prompt_len=128, candidate_len=3)
    )
    state, batch = rollout.collect(state)
    np.testing.assert_array_equal(batch.group_ids, [0, 0, 1, 1])
    # Rows of a group start from the same state (same cue).
    assert decode_prompt(tok, batch, 0, 0) == decode_prompt(tok, batch, 1, 0)
    assert decode_prompt(tok, batch, 2, 0) == decode_prompt(tok, batch, 3, 0)
    # corridor 2 -> 4 turns, then padding turns that do not count.
    assert batch.valid[:, :4].all() and not batch.valid[:, 4:].any()
    assert batch.terminated[:, 3].all()
    assert (batch.rewards[:, 4:] == 0).all()
    step = make_train_step(cfg, MODEL)
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    assert int(state.skipped) == 0 and np.isfinite(float(metrics["loss"]))
    # The next collect starts new groups from new seeds.
    state, batch2 = rollout.collect(state)
    assert batch2.valid[:, 0].all()


def test_off_policy_transitions_link_next_observations(tok):
    envs = [gym.make("rllama/TMaze-v0", corridor_length=3, max_steps=2) for _ in range(2)]
    cfg = TrainConfig(algorithm=DQN(n_step=3), trainable="heads")
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=3, prompt_len=128, candidate_len=3)
    )
    state = init_train_state(
        cfg,
        MODEL,
        init_params(MODEL, jax.random.key(0)),
        jax.random.key(1),
        replay_example=_example(rollout),
    )
    state, traj = rollout.collect(state)
    assert traj.next_obs is not None  # DQN learns from (s, a, r, s') rows
    assert traj.actions.shape == traj.rewards.shape == (2, 3)
    traj = jax.tree.map(jnp.asarray, traj)
    tr = n_step_transitions(traj, cfg.gamma, 1)
    text = lambda o, i: tok.decode(o.prompt_tokens[i][o.prompt_mask[i].astype(bool)])  # noqa: E731
    # Row-major [N*T]: env 0 has turns 0, 1, 2. Turn 0 -> its successor is turn 1's obs.
    assert text(tr.next_obs, 0) == text(tr.obs, 1)
    # Turn 1 is truncated (max_steps 2): s' is the true final observation (a corridor),
    # not turn 2's observation (the next episode's signpost), and it is bootstrapped.
    assert "corridor" in text(tr.next_obs, 1) and "signpost" in text(tr.obs, 2)
    np.testing.assert_allclose(tr.discounts[:3], cfg.gamma)
    assert tr.actions.shape == tr.rewards.shape == (6,)
    # DQN's own rows are n-step (n_step=3) within an episode: turn 0's episode is cut at
    # turn 1, so its row sums two rewards, bootstraps from that true final observation with
    # gamma^2, and never reaches into the next episode.
    dq = cfg.algorithm.transitions(traj, cfg.gamma)
    np.testing.assert_allclose(dq.discounts[0], cfg.gamma**2, rtol=1e-6)
    np.testing.assert_allclose(
        dq.rewards[0], traj.rewards[0, 0] + cfg.gamma * traj.rewards[0, 1], rtol=1e-6
    )
    assert text(dq.next_obs, 0) == text(tr.next_obs, 1)
    step = make_train_step(cfg, MODEL)
    state, metrics = step(state, traj)
    assert int(state.replay.valid.sum()) == 6


def _example(rollout):
    from rllama_jax.rollout import transitions_example

    # Heads-only DQN caches the frozen LLM's features: the replay buffer holds them too.
    return transitions_example(rollout.train_config, rollout.config, rollout.model_config)


def test_episodic_memory_entries_one_per_line_and_actions_recorded(tok):
    """Rendered entries end with a newline (entries never run together in the prompt), and
    the train step's write stores which candidate each remembered step took."""
    envs = [gym.make("rllama/KeyedBandit-v0", num_situations=2) for _ in range(3)]
    cfg = TrainConfig(
        algorithm=PPO(epochs=1), trainable="heads", memory=memory_config(tok, "episodic")
    )
    state = init_train_state(
        cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1), num_envs=3
    )
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=1, prompt_len=128, candidate_len=4)
    )
    looks = []  # the policy's views of observations it does not act on
    look = rollout._look
    rollout._look = lambda *a: looks.append(1) or look(*a)
    state, batch = rollout.collect(state)
    for i in range(3):
        mask = batch.memory_mask[i, 0].astype(bool)
        entry = tok.decode(batch.memory_tokens[i, 0][mask])
        assert entry.endswith("\n") and entry.count("\n") == 1 and " -> " in entry, entry
    np.testing.assert_array_equal(batch.memory_actions, batch.actions)
    # One-step episodes all end inside the batch: no extra forward for a bootstrap value.
    assert not looks and not batch.bootstrap_value.any()
    state = state.replace(memory=remember_batch(state, jax.tree.map(jnp.asarray, batch), cfg))
    mem = state.memory.episodic
    valid = np.asarray(mem.valid)
    assert valid.sum() == 3
    np.testing.assert_array_equal(
        np.sort(np.asarray(mem.actions)[valid]), np.sort(batch.actions[:, 0])
    )
    assert (np.asarray(mem.actions)[~valid] == -1).all()
    state, batch2 = rollout.collect(state)
    text = decode_prompt(tok, batch2, 0, 0)
    lines = text.split("Past:")[1].split("\n")  # k=2 entries, each on its own line
    assert all(" -> pull lever " in line for line in lines[:2]), text
    assert lines[2].startswith("You face"), text


def test_episodic_control_steers_a_frozen_policy_and_train_step_agrees(tok):
    """With episodic control, the act-time bias is control x the memory's action values and
    moves the policy toward the lever that paid for this very observation; the logits the
    train step recomputes from the stored observation are the acting ones."""
    n = 4
    envs = [gym.make("rllama/KeyedBandit-v0", num_situations=1) for _ in range(n)]
    base = memory_config(tok, "episodic")
    control = 5.0
    ep = dataclasses.replace(base.episodic, control=control, control_k=4)
    cfg = TrainConfig(
        algorithm=Reinforce(), trainable="full", memory=dataclasses.replace(base, episodic=ep),
    )  # fmt: skip
    state = init_train_state(
        cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1), num_envs=n
    )
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=1, prompt_len=128, candidate_len=4),
        greedy=True,
    )  # fmt: skip
    state, batch = rollout.collect(state)
    assert not np.asarray(batch.obs.action_bias).any()  # empty memory: no opinion
    paying = envs[0].unwrapped.paying_arms[envs[0].unwrapped.situation]
    # Remember that the paying lever paid, as if each env had pulled it.
    batch = batch.replace(
        actions=np.full_like(batch.actions, paying), memory_actions=np.full_like(batch.actions, paying),
        rewards=np.ones_like(batch.rewards),
    )  # fmt: skip
    state = state.replace(memory=remember_batch(state, jax.tree.map(jnp.asarray, batch), cfg))
    state, batch2 = rollout.collect(state)
    bias = np.asarray(batch2.obs.action_bias[:, 0])
    # One situation, so every key matches exactly: kernel weight 1 per entry, 4 entries.
    want = np.zeros_like(bias)
    want[:, paying] = control * n / (1 + n)
    np.testing.assert_allclose(bias, want, rtol=1e-6, atol=1e-6)
    assert (batch2.actions[:, 0] == paying).all()
    step_obs = jax.tree.map(lambda x: jnp.asarray(x)[:, 0], batch2.obs)
    ev = evaluate_score(state.trainable["model"], state.trainable["heads"], step_obs, MODEL, cfg)
    logp = np.take_along_axis(np.asarray(ev.log_probs), batch2.actions[:, :1], axis=1)[:, 0]
    np.testing.assert_allclose(logp, batch2.old_logp[:, 0], atol=1e-5)


def test_heads_mode_kl_reference_is_the_llm_without_the_policy_head(tok):
    """With only heads training, the KL reference is the frozen LLM's own candidate policy:
    0 while the zero-initialised policy head is untouched, > 0 once it has moved (it used
    to include the current head, which made the penalty identically 0)."""
    envs = [gym.make("rllama/Blackjack-v0") for _ in range(4)]
    cfg = TrainConfig(algorithm=GRPO(group_size=2, epochs=1), trainable="heads")
    assert cfg.algorithm.kl_coef > 0
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=4, prompt_len=160, candidate_len=3)
    )
    state, batch = rollout.collect(state)
    step = make_train_step(cfg, MODEL)
    batch = jax.tree.map(jnp.asarray, batch)
    _, metrics = step(jax.tree.map(jnp.copy, state), batch)
    assert float(metrics["kl_ref"]) == 0.0
    head = state.trainable["heads"]["policy"]
    assert not np.asarray(head["w"]).any()  # the output layer: zero at init
    head["w"] = 0.5 * jax.random.normal(jax.random.key(2), head["w"].shape)
    _, metrics = step(state, batch)
    assert float(metrics["kl_ref"]) > 1e-4


def test_history_baseline_shows_the_episodes_past_turns(tok):
    """RolloutConfig.history=H: each prompt holds the last H turns of its own episode as
    user/assistant messages (the reward opening the next user message), and nothing from
    the previous episode; the agent's act() builds the same prompts; a prompt that outgrows
    prompt_len says which setting to raise."""
    from rllama_jax import RLlamaAgent
    from rllama_jax.rollout import history_messages

    assert history_messages([("o1", "a1", 1.0), ("o2", "a2", -1.0)], "o3") == [
        {"role": "user", "content": "o1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "Reward: +1\no2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "Reward: -1\no3"},
    ]  # fmt: skip
    cfg = TrainConfig(algorithm=PPO(epochs=1), trainable="lora", lora=LoraConfig(rank=2))
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)), jax.random.key(1))
    # corridor 1: signpost, corridor, junction: 3 turns per episode.
    make = lambda: gym.make("rllama/TMaze-v0", corridor_length=1)  # noqa: E731
    rcfg = RolloutConfig(num_steps=4, prompt_len=256, max_actions=2, candidate_len=3, history=2)
    rollout = Rollout([make()], tok, MODEL, cfg, rcfg, seed=3)
    _, traj = rollout.collect(state)
    text = [tok.decode(np.asarray(traj.obs.prompt_tokens[0, s])[np.asarray(
        traj.obs.prompt_mask[0, s], bool)]) for s in range(4)]  # fmt: skip
    assert "Reward:" not in text[0] and text[0].count("<|im_start|>user") == 1
    assert text[1].count("<|im_start|>user") == 2 and "Reward: +0" in text[1]
    assert text[2].count("<|im_start|>user") == 3  # signpost and corridor turns
    assert "go forward" in text[2] and "signpost" in text[2].lower()
    assert text[3].count("<|im_start|>user") == 1  # a new episode: no history
    # The agent's single-env loop shows the same past turns.

    class Agent(RLlamaAgent):
        def get_system_prompt(self):
            return make().unwrapped.system_prompt

        def format_observation(self, observation):
            return observation

        def extract_action(self, response):
            return response

        def candidate_actions(self, observation):
            return ["turn left", "turn right"] if "junction" in observation else ["go forward"]

    agent = Agent((MODEL, init_params(MODEL, jax.random.key(0)), tok), history=2,
                  prompt_len=256, max_actions=2, candidate_len=3, lora_rank=2)  # fmt: skip
    env = make()
    o, _ = env.reset(seed=3)
    for _ in range(3):
        a = agent.act(o)
        o, r, *_ = env.step(agent.candidate_actions(o).index(a))
        agent.assign_reward(r)
    seen = agent._episode[-1].obs
    mine = tok.decode(np.asarray(seen.prompt_tokens[0])[np.asarray(seen.prompt_mask[0], bool)])
    assert mine.count("<|im_start|>user") == 3 and "Reward: +0" in mine
    with pytest.raises(ValueError, match="act_batch"):
        agent.act_batch([o, o])
    short = Rollout([make()], tok, MODEL, cfg, dataclasses.replace(rcfg, prompt_len=90), seed=3)
    with pytest.raises(ValueError, match="does not fit prompt_len=90.*--prompt_len"):
        short.collect(state)
