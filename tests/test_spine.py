"""The redesigned spine end to end on a tiny random Llama: one regression test per bug the
redesign fixed (A), every algorithm through every entry point (B), a one-step probe that
every algorithm must solve through the agent API (C), no algorithm-name branches outside
``rllama_jax/algos`` (D) and one trace of the train step per algorithm (E).

Speed: the agent and the launcher are built from ONE set of settings (``experiment`` /
``agent_for``), so for a given (algorithm, mode, memory) they produce the same
``TrainConfig`` and the same trajectory shapes. Their acting function is then one jit cache
entry (the launcher's train step, a separate ``jax.jit``, compiles its own copy: XLA's
persistent compilation cache could share it, but reading executables back from it crashed
the CPU runtime once in a full-suite run, so this module does not use it). Score mode trains heads only (the frozen LLM's features are cached at acting time,
so the train step runs no LLM); generate mode trains LoRA adapters.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import pathlib

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from rllama_jax import RLlamaAgent
from rllama_jax import agent as agent_module
from rllama_jax import loop as loop_module
from rllama_jax.algos import (
    A2C,
    ALGORITHMS,
    DQN,
    GRPO,
    PPO,
    SAC,
    Reinforce,
    algorithm_class,
    make_algorithm,
    option_names,
)
from rllama_jax.envs.base import TextEnv
from rllama_jax.experiment import ExperimentConfig, run_experiment
from rllama_jax.experiment import run as run_module
from rllama_jax.experiment.build import rollout_config
from rllama_jax.experiment.build import train_config as launcher_train_config
from rllama_jax.experiment.flags import config_from_flags, define_experiment_flags
from rllama_jax.experiment.metrics import read_records
from rllama_jax.loop import learn
from rllama_jax.models import forward, load_pretrained, positions_from_mask
from rllama_jax.rollout import Rollout
from rllama_jax.sampling import (
    SamplingConfig,
    policy_log_softmax,
    process_logits,
    sequence_logprobs,
)
from rllama_jax.train import Observation, Trajectory, evaluate_score, policy_params
from rllama_jax.trajectory import n_step_transitions

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYSTEM = "You stand at a fork in the road. Answer with one word: stay or go."
CANDIDATES = ("stay", "go")  # "stay" (action 0) is the rewarded one
PROBE_ID = "spine/Probe-v0"
T = 2  # turns per row: the agent's batch_size, the launcher's steps_per_update
GAMMA = 0.9
MODES = ("score", "generate")
MEMORIES = ("none", "episodic")


def observe(turn: int) -> str:
    return f"Step {turn}: do you stay or go?"


class ProbeEnv(TextEnv):
    """``length`` turns per episode; "stay" pays 1, "go" 0, plus ``jitter`` times a number
    that differs between instances (so two envs of a GRPO group, which share a seed, still
    get different returns and the group advantage is never all zero)."""

    system_prompt = SYSTEM
    _instances = itertools.count()

    def __init__(self, length: int = 1, jitter: float = 0.0) -> None:
        super().__init__(num_actions=2)
        self.length, self.jitter = length, jitter
        self.offset = 1 + next(ProbeEnv._instances) % 50
        self.turn = 0

    def _start(self, seed):
        self.turn = 0
        self.candidates = list(CANDIDATES)
        return observe(0), {}

    def _transition(self, index):
        self.turn += 1
        reward = (1.0 if index == 0 else 0.0) + self.jitter * self.offset
        return observe(self.turn), reward, self.turn >= self.length, {}

    def render_step(self, observation, action, reward):
        return f"{observation} -> {action} -> {reward:+g}"


if PROBE_ID not in gym.registry:
    gym.register(PROBE_ID, entry_point=ProbeEnv, kwargs={"jitter": 0.01})


class ProbeAgent(RLlamaAgent):
    def get_system_prompt(self) -> str:
        return SYSTEM

    def format_observation(self, observation) -> str:
        return observation

    def extract_action(self, response: str) -> int:
        return 0 if "stay" in response.lower() else 1

    def candidate_actions(self, observation) -> list[str]:
        return list(CANDIDATES)


# ---------------------------------------------------------------------------- settings
# Launcher flags every run here shares (the agent takes the same values, see agent_for).
BASE = dict(
    model="tiny", env=PROBE_ID, steps_per_update=T, prompt_len=48, max_actions=2,
    candidate_len=2, share_prefix=False, feature_cache=0, head_norm=False, head_hidden=0,
    learning_rate=3e-3, head_learning_rate=3e-2, gamma=GAMMA, minibatches=1, lora_rank=2,
    lora_alpha=4.0, max_new_tokens=3, temperature=0.9, top_p=0.1, memory_tokens=8,
    episodic_capacity=32, episodic_k=2, working_window=3, eval_every=0, checkpoint_every=0,
    seed=0,
)  # fmt: skip
# Algorithm flags (each a hyperparameter of that algorithm; the launcher refuses others).
ALGO_FLAGS = {
    "ppo": dict(epochs=1, kl_coef=0.05),
    "a2c": {},
    "reinforce": {},
    "grpo": dict(epochs=1, group_size=2, kl_coef=0.05),
    "dqn": dict(replay_capacity=16, replay_batch=4, updates_per_step=1),
    "sac": dict(replay_capacity=16, replay_batch=4, updates_per_step=1),
}


def experiment(algo: str, mode: str, memory: str, updates: int = 1, **kw) -> ExperimentConfig:
    """The launcher settings of one matrix cell: score mode trains heads, generate mode
    LoRA; whole-episode algorithms get 2 envs (one GRPO group of 2), for training and for
    the final evaluation alike."""
    envs = 2 if algorithm_class(algo).whole_episodes else 1
    evals = dict(eval_envs=envs, eval_episodes=envs)  # one greedy episode per env
    settings = {**BASE, **evals, **ALGO_FLAGS[algo], **kw}
    return ExperimentConfig(
        algo=algo, action_mode=mode, memory=memory,
        trainable="heads" if mode == "score" else "lora",
        num_envs=envs, total_steps=envs * T * updates, **settings,
    )  # fmt: skip


def agent_for(cfg: ExperimentConfig, tiny, algorithm=None, **kw) -> ProbeAgent:
    """A fresh agent with the launcher settings ``cfg`` (same TrainConfig, same shapes)."""
    algo = algorithm or make_algorithm(cfg.algo, **cfg.algorithm_options())
    return ProbeAgent(
        tiny, algorithm=algo, action_mode=cfg.action_mode, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.steps_per_update,
        episodes_per_update=cfg.num_envs if algo.whole_episodes else None,
        memory=cfg.memory, episodic_capacity=cfg.episodic_capacity, episodic_k=cfg.episodic_k,
        working_window=cfg.working_window, memory_tokens=cfg.memory_tokens,
        trainable=cfg.trainable, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        prompt_len=cfg.prompt_len, max_actions=cfg.max_actions,
        candidate_len=cfg.candidate_len, seed=cfg.seed, learning_rate=cfg.learning_rate,
        head_learning_rate=cfg.head_learning_rate, head_hidden=cfg.head_hidden,
        gamma=cfg.gamma, minibatches=cfg.minibatches, max_grad_norm=cfg.max_grad_norm,
        policy_temperature=cfg.policy_temperature, remat=cfg.remat,
        share_prefix=cfg.share_prefix, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():
    """The launcher's ``--model=tiny`` (random 2-layer Llama, SmolLM2 tokenizer), seed 0."""
    return tuple(load_pretrained("tiny", seed=0))


@pytest.fixture(scope="module")
def agents(tiny):
    """One agent per (algorithm, mode, memory), shared by the matrix's agent entry points."""
    cache: dict[tuple[str, str, str], ProbeAgent] = {}

    def get(algo: str, mode: str, memory: str) -> ProbeAgent:
        if (algo, mode, memory) not in cache:
            cache[algo, mode, memory] = agent_for(experiment(algo, mode, memory), tiny)
        return cache[algo, mode, memory]

    return get


@pytest.fixture
def learned(monkeypatch):
    """Every trajectory handed to ``loop.learn`` (host copies), by the agent's single-env
    API, ``agent.train`` and the launcher alike; with the trainable parameters before it."""
    seen: list[tuple[Trajectory, dict]] = []
    real = loop_module.learn

    def spy(state, traj, train_step, config):
        seen.append((jax.tree.map(np.array, traj), host(state.trainable)))
        return real(state, traj, train_step, config)

    monkeypatch.setattr(loop_module, "learn", spy)
    monkeypatch.setattr(agent_module, "learn", spy)
    return seen


# ---------------------------------------------------------------------------- helpers
def host(tree):
    """A host copy (the train step donates the state's buffers)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def changed(before, after) -> bool:
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    return any(not np.array_equal(a, np.asarray(b)) for a, b in pairs)


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def stored(state) -> int:
    """Entries written to the episodic store so far (its write counter)."""
    return int(state.memory.episodic.counter)


def play(agent, episodes: int, rewards=None, length: int = 1) -> list[dict]:
    """The README's single-env loop on ``ProbeEnv(length)`` for ``episodes`` episodes;
    ``rewards(episode, turn, env_reward)`` replaces the env's reward. Returns the metrics
    of the updates that happened."""
    env = ProbeEnv(length=length)
    updates = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        done, turn = False, 0
        while not done:
            action = agent.act(observation)
            observation, reward, terminated, truncated, _ = env.step(action)
            agent.assign_reward(reward if rewards is None else rewards(episode, turn, reward))
            done, turn = terminated or truncated, turn + 1
        metrics = agent.terminate_episode()
        if metrics:
            updates.append(metrics)
    return updates


def distinct(episode: int, turn: int, reward: float) -> float:
    """Episode returns that all differ (a GRPO group / REINFORCE mean baseline then has a
    non-zero advantage whatever the policy picks)."""
    return reward + 0.1 * (episode + 1)


def episodes_per_update(agent) -> int:
    return agent.episodes_per_update if agent.algorithm.whole_episodes else T


_forward = jax.jit(forward, static_argnums=1)


def reply_logits(model_config, model, obs: Observation, response) -> np.ndarray:
    """Logits [B, R, V] (float64 copy) predicting each reply token, from one plain forward
    pass over prompt + reply."""
    tokens = np.concatenate([obs.prompt_tokens, response], axis=1)
    mask = np.concatenate([obs.prompt_mask, np.ones_like(response)], axis=1).astype(bool)
    logits = _forward(model, model_config, tokens, positions_from_mask(mask), mask).logits
    length = obs.prompt_tokens.shape[1]
    return np.asarray(logits, np.float64)[:, length - 1 : -1]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ============================================================================ A. regressions
def test_grpo_trains_through_the_agent_api(tiny, learned):
    """Bug 1: GRPO through act/terminate_episode and agent.train (it used to stop with
    "needs group_ids"): the single-env batch is one group, its advantages are the returns
    standardised within it (not all zero), the gradient is non-zero and the parameters move."""
    agent = agent_for(experiment("grpo", "score", "none"), tiny)
    before = host(agent.state.trainable)
    updates = play(agent, 2, rewards=lambda e, t, r: [1.0, 3.0][e])
    assert len(updates) == 1 and all_finite(updates[0])
    assert updates[0]["grad_norm"] > 0 and updates[0]["skipped_updates"] == 0
    assert agent.group_warning and "one group" in agent.group_warning
    traj, _ = learned[-1]
    np.testing.assert_array_equal(traj.group_ids, [0, 0])
    adv, _ = agent.algorithm.advantages(traj, GAMMA)
    # Returns 1 and 3: mean 2, sample std sqrt(2); advantage (R - 2) / (sqrt(2) + 1e-4)
    # on the valid turn of each row (float32: 1e-5).
    expected = np.array([[-1.0, 0.0], [1.0, 0.0]]) / (np.sqrt(2.0) + 1e-4)
    np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-5)
    assert changed(before, agent.state.trainable)
    before = host(agent.state.trainable)
    envs = [gym.make(PROBE_ID) for _ in range(2)]
    history = agent.train(envs, num_steps=2 * T)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert history[0]["grad_norm"] > 0
    np.testing.assert_array_equal(learned[-1][0].group_ids, [0, 0])  # one group of 2 seeds
    assert changed(before, agent.state.trainable)


@pytest.mark.parametrize("algo", ["dqn", "sac"])
def test_off_policy_algorithms_write_episodic_memory(tiny, learned, algo):
    """Bug 2: DQN and SAC write their turns to episodic memory like the on-policy ones:
    after one update of T one-turn episodes the store holds T entries whose returns are the
    turns' rewards (one-turn episodes: return = reward) and whose actions are the taken ones."""
    agent = agent_for(experiment(algo, "score", "episodic"), tiny)
    assert stored(agent.state) == 0
    assert len(play(agent, T, rewards=distinct)) == 1
    traj, _ = learned[-1]
    mem = agent.state.memory.episodic
    valid = np.asarray(mem.valid)
    assert stored(agent.state) == T and valid.sum() == T
    np.testing.assert_allclose(np.sort(np.asarray(mem.returns)[valid]),
                               np.sort(traj.rewards.ravel()), atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(np.sort(np.asarray(mem.actions)[valid]),
                                  np.sort(traj.actions.ravel()))  # fmt: skip


def test_generate_mode_log_probs_are_untruncated(tiny, learned):
    """Bug 3: the ratio / KL / entropy of generate mode use the temperature-scaled
    distribution WITHOUT top-p: a token outside the nucleus (acting probability exactly 0)
    has a finite log-prob, and a train step with a KL penalty on such replies reports the
    k3 KL of the untruncated distributions, a ratio of 1 and no skipped minibatch."""
    sampling = SamplingConfig(temperature=0.9, top_p=0.1)
    logits = jnp.asarray([[4.0, 2.0, 1.0, 0.0]])
    assert float(process_logits(logits, sampling)[0, 3]) < -1e29  # outside the nucleus
    np.testing.assert_allclose(
        policy_log_softmax(logits, sampling), jax.nn.log_softmax(logits / 0.9), atol=1e-6
    )

    agent = agent_for(experiment("ppo", "generate", "none"), tiny)
    tcfg, model_config = agent.train_config, agent.model_config
    assert agent.algorithm.kl_coef > 0 and tcfg.sampling.top_p == 0.1
    # Move the policy away from the reference (the base LLM): random LoRA B factors.
    keys = iter(jax.random.split(jax.random.key(1), 64))
    lora = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype),
        agent.state.trainable["lora"],
    )
    agent.state = agent.state.replace(trainable={**agent.state.trainable, "lora": lora})
    play(agent, T)
    traj, _ = learned[-1]
    model = policy_params(agent.state.trainable, agent.state.frozen, tcfg)
    obs = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), traj.obs)
    rows, r = obs.prompt_tokens.shape[0], traj.response_tokens.shape[-1]
    # Each reply: the policy's LEAST likely first token, then padding (masked out).
    pad = np.zeros((rows, 1), np.int32)
    raw = reply_logits(model_config, model, obs, pad)[:, 0]
    worst = raw.argmin(-1).astype(np.int32)
    acting = np.asarray(process_logits(jnp.asarray(raw, jnp.float32), tcfg.sampling))
    assert np.all(acting[np.arange(rows), worst] < -1e29)  # acting never draws it
    response = np.zeros((rows, r), np.int32)
    response[:, 0] = worst
    rmask = np.zeros((rows, r), bool)
    rmask[:, 0] = True
    logp, _ = sequence_logprobs(
        model, model_config, obs.prompt_tokens, obs.prompt_mask, response, rmask, tcfg.sampling
    )
    logp = np.asarray(logp)
    # Finite, and log_softmax(logits / 0.9) over the whole vocabulary: float32 against
    # float64 over 49k logits, 1e-4.
    pi = log_softmax(raw / tcfg.sampling.temperature)[np.arange(rows), worst]
    np.testing.assert_allclose(logp[:, 0], pi, atol=1e-4)
    ref_raw = reply_logits(model_config, agent.state.frozen["model"], obs, pad)[:, 0]
    ref = log_softmax(ref_raw / tcfg.sampling.temperature)[np.arange(rows), worst]
    k3 = np.expm1(ref - pi) - (ref - pi)
    assert k3.mean() > 1e-3  # the reply is far from the reference's choice too
    hand = traj.replace(
        response_tokens=response.reshape(traj.response_tokens.shape),
        response_mask=rmask.reshape(traj.response_mask.shape),
        old_logp=logp.reshape(traj.old_logp.shape),
    )
    agent.state, m = learn(agent.state, hand, agent._train_step, tcfg)
    assert all_finite(m) and m["skipped_updates"] == 0
    # k3 of the untruncated log-probs, token mean (one token per row): 1e-3 relative for
    # the float32 log-ratios.
    np.testing.assert_allclose(m["kl_ref"], k3.mean(), rtol=1e-3)
    np.testing.assert_allclose(m["ratio_mean"], 1.0, atol=1e-4)  # old_logp is the policy's


def test_sac_twin_critics_differ_with_linear_heads(tiny):
    """Bug 4: with linear heads (--head_hidden=0) SAC's q1 and q2 start from different
    weights (both used to start at zero: identical forever, min(q1, q2) = q1), in the agent
    and in the launcher's state alike, and they give different Q-values."""
    cfg = experiment("sac", "score", "none")
    assert cfg.head_hidden == 0
    agent = agent_for(cfg, tiny)
    heads = agent.state.trainable["heads"]
    assert "w1" not in heads["q1"]  # linear
    assert not np.allclose(heads["q1"]["w"], heads["q2"]["w"])
    model_config, params, tok = tiny
    tcfg = launcher_train_config(cfg, model_config, tok)
    assert tcfg == agent.train_config  # the launcher builds the very same configuration
    hidden = jax.random.normal(jax.random.key(0), (3, 2, model_config.hidden_size))
    from rllama_jax.heads import apply_head

    q1, q2 = apply_head(heads["q1"], hidden), apply_head(heads["q2"], hidden)
    assert np.abs(np.asarray(q1 - q2)).max() > 1e-6


def test_agent_bootstraps_an_episode_cut_by_its_batch(tiny, learned):
    """Bug 5: a 3-turn episode with batch_size 2: the first row ends on a turn whose episode
    goes on, so it is not terminal and bootstraps from the value of the next turn (here
    V = 0.5 everywhere); the cut episode's third turn opens the next batch."""
    agent = agent_for(experiment("ppo", "score", "none"), tiny)
    tr = agent.state.trainable
    value = {**tr["heads"]["value"], "b": jnp.full((1,), 0.5, jnp.float32)}
    agent.state = agent.state.replace(trainable={**tr, "heads": {**tr["heads"], "value": value}})
    rewards = iter([1.0, 2.0, 3.0, 4.0])
    first = play(agent, 1, rewards=lambda e, t, r: next(rewards), length=3)
    assert len(first) == 1
    traj, _ = learned[-1]
    np.testing.assert_array_equal(traj.rewards, [[1.0, 2.0]])
    np.testing.assert_array_equal(traj.terminated, [[False, False]])
    np.testing.assert_allclose(traj.old_values, [[0.5, 0.5]], atol=1e-6)
    np.testing.assert_allclose(traj.bootstrap_value, [0.5], atol=1e-6)  # V(turn 3)
    _, ret = agent.algorithm.advantages(traj, GAMMA)
    # Last turn: r + gamma * V(next turn) = 2 + 0.9 * 0.5 (float32: 1e-5).
    np.testing.assert_allclose(np.asarray(ret)[0, 1], 2.0 + GAMMA * 0.5, atol=1e-5)
    assert len(play(agent, 1, rewards=lambda e, t, r: next(rewards))) == 1
    traj, _ = learned[-1]
    np.testing.assert_array_equal(traj.rewards, [[3.0, 4.0]])  # the rest of the cut episode
    np.testing.assert_array_equal(traj.terminated, [[True, True]])
    np.testing.assert_array_equal(traj.bootstrap_value, [0.0])


def test_reinforce_rows_are_whole_episodes(tiny, learned):
    """Bug 6: REINFORCE learns from whole episodes, one per row from its first turn
    (padding after its end), with Monte-Carlo returns and no bootstrap, through the
    single-env API and agent.train."""
    agent = agent_for(experiment("reinforce", "score", "none"), tiny)
    rewards = iter([1.0, 2.0, 3.0])
    play(agent, 1, rewards=lambda e, t, r: next(rewards), length=1)
    assert len(play(agent, 1, rewards=lambda e, t, r: next(rewards), length=2)) == 1
    traj, _ = learned[-1]
    np.testing.assert_array_equal(traj.valid, [[True, False], [True, True]])
    np.testing.assert_array_equal(traj.terminated, [[True, False], [False, True]])
    np.testing.assert_array_equal(traj.rewards, [[1.0, 0.0], [2.0, 3.0]])
    np.testing.assert_array_equal(traj.bootstrap_value, [0.0, 0.0])
    _, ret = agent.algorithm.advantages(traj, GAMMA)
    np.testing.assert_allclose(ret, [[1.0, 0.0], [2.0 + GAMMA * 3.0, 3.0]], atol=1e-6)
    # agent.train: one-turn episodes, so each row is its episode's turn then padding (a
    # layout that continued episodes along the row would have both turns valid).
    agent.train([gym.make(PROBE_ID) for _ in range(2)], num_steps=2 * T)
    traj, _ = learned[-1]
    np.testing.assert_array_equal(traj.valid, [[True, False], [True, False]])
    np.testing.assert_array_equal(traj.bootstrap_value, [0.0, 0.0])
    np.testing.assert_array_equal(traj.obs.prompt_tokens[0, 0], traj.obs.prompt_tokens[1, 0])
    _, ret = agent.algorithm.advantages(traj, GAMMA)
    np.testing.assert_allclose(ret, traj.rewards * traj.valid, atol=1e-6)


@pytest.mark.parametrize("algo", ["a2c", "reinforce"])
def test_epochs_is_not_an_option_of_single_pass_algorithms(tiny, algo):
    """Bug 7: A2C and REINFORCE make one pass per batch (a second would be off-policy):
    they have no ``epochs`` option, and the agent and the launcher's flags refuse one."""
    cls = algorithm_class(algo)
    assert "epochs" not in option_names(algo) and cls().epochs == 1
    assert make_algorithm(algo, epochs=4).epochs == 1
    with pytest.raises(TypeError):
        cls(epochs=4)
    with pytest.raises(ValueError, match=f"epochs: not an option of {algo}"):
        ProbeAgent(tiny, algorithm=algo, epochs=4)
    fv = flags.FlagValues()
    define_experiment_flags(fv)
    fv(["train.py", f"--algo={algo}", "--epochs=4"])
    with pytest.raises(ValueError, match=f"--epochs=4 does not apply to --algo={algo}"):
        config_from_flags(fv).validate()
    assert "epochs" in option_names("ppo") and PPO(epochs=3).epochs == 3


def test_generate_mode_entropy_bonus(tiny, learned):
    """Bug 8: generate mode's entropy bonus: the entropy metric is the token-mean entropy of
    the untruncated temperature-scaled distribution at the reply positions (finite, > 0),
    and ent_coef changes the update: from the same state and trajectory, ent_coef 10 (vs
    the launcher's 0.03) takes other parameters, and raises the entropy."""
    cfg = experiment("a2c", "generate", "none")
    base = agent_for(cfg, tiny)
    bonus = agent_for(cfg, tiny, algorithm=A2C(**{**cfg.algorithm_options(), "ent_coef": 10.0}))
    assert base.algorithm.ent_coef == 0.03
    start = host(base.state.trainable)
    jax.tree.map(np.testing.assert_array_equal, start, host(bonus.state.trainable))
    (m_base,) = play(base, T)
    traj, _ = learned[-1]
    tcfg = bonus.train_config
    model = policy_params(jax.tree.map(jnp.asarray, start), bonus.state.frozen, tcfg)
    obs = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), traj.obs)
    response = traj.response_tokens.reshape(-1, traj.response_tokens.shape[-1])
    mask = traj.response_mask.reshape(response.shape) & traj.valid.reshape(-1, 1)
    logp = log_softmax(reply_logits(bonus.model_config, model, obs, response) / 0.9)
    entropy = -(np.exp(logp) * logp).sum(-1)
    expected = (entropy * mask).sum() / mask.sum()
    # float32 logits of 49k tokens against float64: 1e-4 relative on an entropy of ~10.
    assert np.isfinite(m_base["entropy"]) and m_base["entropy"] > 1.0
    np.testing.assert_allclose(m_base["entropy"], expected, rtol=1e-4)
    state, m1 = learn(bonus.state, traj, bonus._train_step, tcfg)
    np.testing.assert_allclose(m1["entropy"], m_base["entropy"], rtol=1e-6)  # same inputs
    assert changed(host(base.state.trainable), state.trainable)
    bonus.state, m2 = learn(state, traj, bonus._train_step, tcfg)
    assert m2["entropy"] > m1["entropy"]  # the bonus dominates: the update raised entropy


def test_dqn_n_step_targets_and_epsilon_schedule(tiny, learned):
    """Bug 9: DQN's n-step transitions (a 3-step return by hand) and its decaying epsilon
    (the acting distribution at update 0 and after the decay)."""
    n, t = 2, 5
    rewards = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
    terminated = np.zeros((n, t), bool)
    terminated[1, 1] = True  # row 1: an episode of 2 turns, then one of 3
    turn_ids = np.broadcast_to(np.arange(t), (n, t))

    def obs(ids):
        return Observation(prompt_tokens=np.asarray(ids, np.int32)[..., None],
                           prompt_mask=np.ones(ids.shape + (1,), np.int32))  # fmt: skip

    traj = Trajectory(
        obs=obs(turn_ids), rewards=rewards, terminated=terminated,
        truncated=np.zeros((n, t), bool), valid=np.ones((n, t), bool),
        old_logp=np.zeros((n, t)), old_values=np.zeros((n, t)), final_values=np.zeros((n, t)),
        bootstrap_value=np.zeros(n), actions=np.zeros((n, t), np.int32),
        next_obs=obs(100 + turn_ids),
    )  # fmt: skip
    g = 0.5
    tr = n_step_transitions(traj, g, 3)
    # (return, bootstrap discount, index of the bootstrap observation s_{t+m}) by hand.
    row0 = [(1 + g * 2 + g**2 * 3, g**3, 2), (2 + g * 3 + g**2 * 4, g**3, 3),
            (3 + g * 4 + g**2 * 5, g**3, 4), (4 + g * 5, g**2, 4), (5, g, 4)]  # fmt: skip
    row1 = [(1 + g * 2, 0.0, 1), (2, 0.0, 1), (3 + g * 4 + g**2 * 5, g**3, 4),
            (4 + g * 5, g**2, 4), (5, g, 4)]  # fmt: skip
    want = np.array(row0 + row1)
    np.testing.assert_allclose(tr.rewards, want[:, 0], atol=1e-6)
    np.testing.assert_allclose(tr.discounts, want[:, 1], atol=1e-6)
    np.testing.assert_array_equal(tr.next_obs.prompt_tokens[:, 0], 100 + want[:, 2])
    np.testing.assert_array_equal(DQN(n_step=3).transitions(traj, g).rewards, tr.rewards)

    algo = DQN(epsilon_start=0.5, epsilon_end=0.1, epsilon_decay=10)
    eps = [float(algo.epsilon(jnp.asarray(k))) for k in (0, 5, 10, 50)]
    np.testing.assert_allclose(eps, [0.5, 0.3, 0.1, 0.1], atol=1e-6)
    # Acting: the launcher's schedule, 0.3 -> 0.05 over 100 updates. With 2 candidates the
    # greedy one has probability 1 - eps/2, the other eps/2 (float32: 1e-5).
    cfg = experiment("dqn", "score", "none")
    agent = agent_for(cfg, tiny)
    assert (agent.algorithm.epsilon_start, agent.algorithm.epsilon_end) == (0.3, 0.05)
    play(agent, T)
    p = np.exp(learned[-1][0].old_logp)
    assert np.all(np.isclose(p, 0.85, atol=1e-5) | np.isclose(p, 0.15, atol=1e-5)), p
    agent.state = agent.state.replace(step=jnp.asarray(cfg.epsilon_decay, jnp.int32))
    play(agent, T)
    p = np.exp(learned[-1][0].old_logp)
    assert np.all(np.isclose(p, 0.975, atol=1e-5) | np.isclose(p, 0.025, atol=1e-5)), p


def test_parse_penalty_and_fallback_flags_reach_the_rollout(tiny, agents):
    """Bug 10: --parse_penalty and --fallback_action are launcher flags, reach the rollout
    config, and act there: every unparseable reply takes the fallback action ("go", reward
    0) and the penalty is added."""
    fv = flags.FlagValues()
    define_experiment_flags(fv)
    argv = [f"--{k}={v}" for k, v in BASE.items()]
    fv(["train.py", *argv, "--action_mode=generate", "--trainable=lora",
        "--parse_penalty=-0.25", "--fallback_action=1"])  # fmt: skip
    cfg = config_from_flags(fv)
    cfg.validate()
    rcfg = rollout_config(cfg)
    assert (rcfg.parse_penalty, rcfg.fallback_action) == (-0.25, 1)
    agent = agents("ppo", "generate", "none")
    model_config, _, tok = tiny
    rollout = Rollout(
        [ProbeEnv()], tok, model_config, agent.train_config, rcfg, extract_action=lambda r: None
    )
    _, traj = rollout.collect(agent.state)
    np.testing.assert_array_equal(traj.rewards, np.full((1, T), -0.25, np.float32))
    assert rollout.parse_failures == T


def test_launcher_evaluates_grpo_with_fewer_eval_envs_than_its_group(tmp_path):
    """The launcher accepts --eval_envs / --eval_episodes that do not fill a GRPO group;
    it must then evaluate (evaluation plays independent episodes: groups do not apply) or
    refuse those flags up front, not stop at its first evaluation after training."""
    cfg = experiment("grpo", "score", "none", eval_envs=1, eval_episodes=1,
                     workdir=str(tmp_path / "run"))  # fmt: skip
    try:
        cfg.validate()
    except ValueError as err:  # refused before anything runs: fine too
        assert "eval" in str(err), err
        return
    result = run_experiment(cfg, progress=False, log=lambda *_: None)
    assert result.updates == 1 and np.isfinite(result.eval_return)


class SixTurns(ProbeEnv):
    """Six turns, +1 each whatever the action: every whole episode returns exactly 6."""

    def __init__(self) -> None:
        super().__init__(length=6)

    def _transition(self, index):
        observation, _, done, info = super()._transition(index)
        return observation, 1.0, done, info


def test_evaluation_plays_whole_episodes_for_whole_episode_algorithms(tiny):
    """Evaluation plays independent episodes whatever the training layout: it used to take
    GRPO's / REINFORCE's whole-episode rows, so (4 steps per collect) a 6-turn episode was
    cut after 4 turns and scored 4, and GRPO's groups were imposed on the eval envs."""
    from rllama_jax.experiment.evaluation import evaluate

    env_id = "spine/SixTurns-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=SixTurns)
    for algo in ("reinforce", "grpo"):
        cfg = experiment(algo, "score", "none", env=env_id)
        agent = agent_for(cfg, tiny)
        result = evaluate(agent.state, cfg, tiny[0], agent.train_config, tiny[2],
                          episodes=3, num_envs=3, steps_per_collect=4)  # fmt: skip
        np.testing.assert_array_equal(result.returns, [6.0, 6.0, 6.0])


def test_score_mode_kl_is_exact(tiny, learned):
    """Bug 11: score mode's KL to the reference is the exact categorical KL over the
    candidates (not a sampled estimate): the train step's kl_ref equals, to 1e-5 (float32),
    sum_a pi(a) log(pi(a) / ref(a)) averaged over the turns, computed here in numpy from
    the stored features (policy = scores + linear policy head; reference = scores)."""
    agent = agent_for(experiment("ppo", "score", "none"), tiny)
    tr = agent.state.trainable
    d = agent.model_config.hidden_size
    w = np.random.default_rng(0).normal(0.0, 0.3, (d, 1)).astype(np.float32)
    policy = {**tr["heads"]["policy"], "w": jnp.asarray(w)}
    agent.state = agent.state.replace(trainable={**tr, "heads": {**tr["heads"], "policy": policy}})
    (metrics,) = play(agent, T)
    traj, before = learned[-1]
    f = traj.obs.features
    scores = np.asarray(f.scores, np.float64) / agent.train_config.policy_temperature
    head = np.asarray(f.candidate_hidden, np.float64) @ before["heads"]["policy"]["w"][:, 0]
    logits = scores + head + before["heads"]["policy"]["b"][0]

    logp, logq = log_softmax(logits), log_softmax(scores)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)
    assert kl.mean() > 1e-2  # the head moved the policy well away from the reference
    np.testing.assert_allclose(metrics["kl_ref"], kl[traj.valid].mean(), atol=1e-5)


def test_registered_algorithm_is_accepted_by_name():
    """An algorithm added with ``@register`` is named like a built-in one: TrainConfig used
    to check names against the built-in tuple and refused it."""
    from typing import ClassVar

    from rllama_jax.algos import REGISTRY, register
    from rllama_jax.train import TrainConfig

    @register
    @dataclasses.dataclass(frozen=True)
    class Weighted(Reinforce):
        name: ClassVar[str] = "spine_weighted"
        beta: float = 2.0

    try:
        cfg = TrainConfig(algorithm="spine_weighted")
        assert type(cfg.algorithm) is Weighted and cfg.algorithm.beta == 2.0
        with pytest.raises(ValueError, match="'spine_nope' is not one of .*spine_weighted"):
            TrainConfig(algorithm="spine_nope")
    finally:
        del REGISTRY["spine_weighted"]


# ============================================================================ B. the matrix
CELLS = [
    (algo, mode, memory)
    for algo in ALGORITHMS
    for mode in MODES
    if mode in algorithm_class(algo).modes
    for memory in MEMORIES
]


@pytest.mark.parametrize("entry", ["single_env", "agent_train", "launcher"])
@pytest.mark.parametrize("algo, mode, memory", CELLS)
def test_matrix(algo, mode, memory, entry, agents, learned, monkeypatch, tmp_path):
    """Every algorithm x entry point x action mode x memory: one update, after which the
    trainable parameters changed, every metric is finite and, with episodic memory, the
    store holds exactly the valid turns learned from."""
    if entry == "launcher":
        cfg = experiment(algo, mode, memory, workdir=str(tmp_path / "run"))
        box = {}
        real = run_module.train_loop

        def spy(rollout, state, train_step, num_updates, **kw):
            box["before"] = host(state.trainable)
            box["stored"] = stored(state) if memory != "none" else None
            box["after"] = real(rollout, state, train_step, num_updates, **kw)
            return box["after"]

        monkeypatch.setattr(run_module, "train_loop", spy)
        run_experiment(cfg, progress=False, log=lambda *_: None)
        records = read_records(cfg.workdir)
        assert [r["update"] for r in records] == [1]
        metrics = [{k: v for k, v in r.items() if isinstance(v, float)} for r in records]
        before, state, start = box["before"], box["after"], box["stored"]
    else:
        agent = agents(algo, mode, memory)
        before = host(agent.state.trainable)
        start = stored(agent.state) if memory != "none" else None
        if entry == "single_env":
            metrics = play(agent, episodes_per_update(agent), rewards=distinct)
        else:
            n = agent.episodes_per_update if agent.algorithm.whole_episodes else 1
            metrics = agent.train([gym.make(PROBE_ID) for _ in range(n)], num_steps=n * T)
        state = agent.state
    assert len(metrics) == 1 and len(learned) == 1
    assert all_finite(metrics) and "loss" in metrics[0]
    assert metrics[0].get("skipped_updates", 0) == 0
    assert changed(before, state.trainable) and all_finite(state.trainable)
    if memory == "none":
        assert state.memory.episodic is None
    else:
        turns = int(learned[0][0].valid.sum())
        assert stored(state) - start == turns > 0


# ============================================================================ C. probes
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_probe_learns_the_rewarded_action(tiny, learned, algo):
    """A one-step env where "stay" pays 1 and "go" 0: through act/assign_reward/
    terminate_episode the agent must prefer "stay" with probability > 0.9 (DQN: greedy Q
    picks it with Q(stay) > 0.9; SAC: both) within 40 updates."""
    agent = agent_for(experiment(algo, "score", "none"), tiny)
    cfg = agent.train_config
    update, solved = 0, False
    while not solved and update < 40:
        update += 1
        play(agent, episodes_per_update(agent))
        obs = jax.tree.map(lambda x: x[0, :1], learned[-1][0].obs)  # features of the state
        model = policy_params(agent.state.trainable, agent.state.frozen, cfg)
        ev = evaluate_score(model, agent.state.trainable["heads"], obs, agent.model_config, cfg)
        p_stay = float(np.exp(ev.log_probs[0, 0]))
        q = {k: np.asarray(v[0]) for k, v in ev.q.items()}
        q_min = np.minimum(q["q1"], q["q2"]) if algo == "sac" else q.get("q")
        if algo == "dqn":
            solved = q_min[0] > 0.9 and q_min[0] > q_min[1]
        elif algo == "sac":
            solved = p_stay > 0.9 and q_min[0] > 0.9 and q_min[0] > q_min[1]
        else:
            solved = p_stay > 0.9
    assert solved, (algo, update, p_stay, q)


# ============================================================================ D. no name branches
ALGO_CLASSES = {cls.__name__ for cls in (PPO, A2C, Reinforce, GRPO, DQN, SAC)}


def algorithm_name_branches(source: str) -> list[str]:
    """Comparisons against an algorithm's name (``x == "dqn"``, ``name in ("ppo", ...)``,
    ``case "sac":``) and type tests against an algorithm class, as "line: code"."""
    found = []

    def is_name(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in ALGORITHMS

    for node in ast.walk(ast.parse(source)):
        hit = False
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                if is_name(operand):
                    hit = True
                if isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                    hit |= any(is_name(e) for e in operand.elts)
        elif isinstance(node, ast.MatchValue):
            hit = is_name(node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
            "isinstance", "issubclass"
        ):  # fmt: skip
            names = {getattr(n, "id", getattr(n, "attr", "")) for n in ast.walk(node.args[1])}
            hit = bool(names & ALGO_CLASSES)
        if hit:
            found.append(f"{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_no_algorithm_name_branches_outside_algos():
    """What differs between algorithms lives in their objects: no module outside
    rllama_jax/algos compares against an algorithm's name or class."""
    # The checker catches each form (so an empty result below means something).
    for snippet in ('if cfg.algo == "dqn": pass', 'ok = algorithm.name != "ppo"',
                    'off = algo in ("dqn", "sac")', 'x = "grpo" == name',
                    'match algo:\n    case "a2c": pass', "y = isinstance(a, algos.SAC)"):  # fmt: skip
        assert algorithm_name_branches(snippet), snippet
    assert not algorithm_name_branches("if f.name == name and cfg.algo in ALGORITHMS: pass")
    package = ROOT / "rllama_jax"
    files = [p for p in package.rglob("*.py") if (package / "algos") not in p.parents]
    assert len(files) > 20
    offenders = {
        str(p.relative_to(ROOT)): hits
        for p in files
        if (hits := algorithm_name_branches(p.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_one_minus_infinity_constant():
    """Masked logits, scores and Q-values share ``rllama_jax.models.NEG_INF``: no module
    writes its own large negative literal (attention used -1e30, the losses -1e9)."""
    package = ROOT / "rllama_jax"
    literals = {}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                    and isinstance(node.operand, ast.Constant)
                    and isinstance(node.operand.value, float) and node.operand.value >= 1e8):  # fmt: skip
                literals.setdefault(str(path.relative_to(ROOT)), []).append(node.lineno)
    assert {k: len(v) for k, v in literals.items()} == {"rllama_jax/models/llama.py": 1}


# ============================================================================ E. compile once
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_train_step_traces_once_per_algorithm(tiny, algo):
    """Three single-env updates then two agent.train updates: the agent's train step is
    traced once (a Python counter in the algorithm's per-trajectory method, which runs only
    while tracing) and its jit holds one compiled program."""
    base = make_algorithm(algo, **experiment(algo, "score", "none").algorithm_options())
    cls = type(base)
    method = "transitions" if cls.off_policy else "advantages"
    traces = []

    real = getattr(cls, method)

    def counted(self, traj, gamma):
        traces.append(1)
        return real(self, traj, gamma)

    counting = dataclasses.dataclass(frozen=True)(
        type(f"Counting{cls.__name__}", (cls,), {method: counted})
    )
    algorithm = counting(**{f.name: getattr(base, f.name) for f in dataclasses.fields(cls)})
    agent = agent_for(experiment(algo, "score", "none"), tiny, algorithm=algorithm)
    per_update = episodes_per_update(agent)
    assert len(play(agent, 3 * per_update, rewards=distinct)) == 3
    n = agent.episodes_per_update if agent.algorithm.whole_episodes else 1
    for _ in range(2):
        agent.train([gym.make(PROBE_ID) for _ in range(n)], num_steps=n * T)
    assert int(agent.state.step) == 5
    assert len(traces) == 1
    assert agent._train_step._cache_size() == 1


def test_equal_settings_share_one_compiled_train_step(tiny):
    """The agent and the launcher on equal settings get the same jitted train step (so the
    launcher after an agent, or a second agent, compiles nothing again); other settings
    get their own."""
    from rllama_jax.train import make_train_step

    cfg = experiment("ppo", "score", "none")
    agent = agent_for(cfg, tiny)
    launcher = launcher_train_config(cfg, tiny[0], tiny[2])
    assert launcher == agent.train_config
    assert make_train_step(launcher, tiny[0]) is agent._train_step
    other = dataclasses.replace(launcher, learning_rate=launcher.learning_rate * 2)
    assert make_train_step(other, tiny[0]) is not agent._train_step
