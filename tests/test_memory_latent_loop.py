"""Latent memory through the environment loop and the agent: soft-prompt slots in the act call,
the memory read stored in the batch, train-time recomputation with the current adapter
(act-time and train-time log-probs agree), adapter training, and configuration errors.

Uses the SmolLM2 tokenizer (a real chat template) with a tiny random Llama of its vocabulary,
as the other rollout tests do.
"""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rllama_jax.envs  # noqa: F401  (registers rllama/ envs)
from rllama_jax import RLlamaAgent
from rllama_jax.algos import PPO
from rllama_jax.memory import (
    EpisodicConfig,
    LatentConfig,
    MemoryConfig,
    WorkingConfig,
    init_memory,
    latent_inputs,
    record_experience,
)
from rllama_jax.models import LlamaConfig, init_params
from rllama_jax.models.loading import default_model_dir, load_tokenizer
from rllama_jax.models.lora import LoraConfig
from rllama_jax.rollout import Rollout, RolloutConfig, act
from rllama_jax.sampling import SamplingConfig
from rllama_jax.train import (
    LossInputs,
    Observation,
    TrainConfig,
    evaluate_generate,
    evaluate_score,
    init_train_state,
    make_train_step,
    memory_adapter,
    policy_params,
)

MODEL = LlamaConfig(
    vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip
D = MODEL.hidden_size
M, K, L = 3, 2, 128  # soft-prompt slots, retrieved entries, prompt width before memory


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir())


def latent_memory(mode: str, k: int = K) -> MemoryConfig:
    return MemoryConfig(
        mode=mode,
        representation="latent",
        episodic=EpisodicConfig(capacity=16, key_dim=D, max_tokens=12, k=k),
        working=WorkingConfig(window=3, max_tokens=12, key_dim=D),
        latent=LatentConfig(key_dim=D, hidden_size=D, num_slots=M, adapter_dim=16),
    )


def new_state(cfg: TrainConfig, num_envs: int):
    params = init_params(MODEL, jax.random.key(0), std=0.1)
    return init_train_state(cfg, MODEL, params, jax.random.key(1), num_envs=num_envs)


class PPOWithLogpGap(PPO):
    """PPO whose metrics also hold max |train-time logp - act-time logp| over the valid
    tokens of its minibatch: the exact recomputation the loss sees."""

    def loss(self, x: LossInputs):
        loss, metrics = super().loss(x)
        gap = jnp.max(jnp.where(x.mask, jnp.abs(x.logp - x.old_logp), 0.0))
        return loss, {**metrics, "logp_gap": gap}


def step_with_logp_gap(cfg: TrainConfig):
    """train_step of ``cfg`` (a PPO config) with the loss of ``PPOWithLogpGap``."""
    options = {f.name: getattr(cfg.algorithm, f.name) for f in dataclasses.fields(PPO)}
    return make_train_step(cfg.replace(algorithm=PPOWithLogpGap(**options)), MODEL)


def train_and_check(step, state, batch):
    """One train_step: act-time and train-time log-probs agree, the adapter is trained.
    Returns (state, {adapter leaf: changed})."""
    before = jax.tree.map(np.array, state.trainable["memory_adapter"])
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    assert float(metrics["logp_gap"]) < 1e-5, float(metrics["logp_gap"])
    assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-5
    assert int(state.skipped) == 0 and float(metrics["grad_norm"]) > 0
    after = state.trainable["memory_adapter"]
    # Adam (no weight decay on this group) moves exactly the leaves with a non-zero gradient.
    changed = {name: not np.array_equal(before[name], np.asarray(after[name])) for name in after}
    assert changed["w2"] and changed["w1"] and changed["b2"], changed
    return state, changed


def assert_latent_layout(batch, n: int, t: int, with_episodic: bool, first: bool) -> None:
    obs = batch.obs
    assert obs.prompt_tokens.shape == obs.prompt_mask.shape == obs.soft_slots.shape == (n, t, L + M)
    read = obs.latent_memory
    k = K if with_episodic else 1
    assert read.keys.shape == (n, t, k, D) and read.valid.shape == (n, t, k)
    assert read.summary.shape == (n, t, D) and read.summary_valid.shape == (n, t)
    slots = np.asarray(obs.soft_slots)
    mask = np.asarray(obs.prompt_mask).astype(bool)
    present = np.asarray(read.valid).any(-1) | np.asarray(read.summary_valid)
    # A row with something to remember has M consecutive slots 0..M-1 (all real positions);
    # a row without has none, so its prompt is exactly the memory-free one.
    for i in range(n):
        for s in range(t):
            where = np.flatnonzero(slots[i, s] >= 0)
            if present[i, s]:
                assert len(where) == M and (np.diff(where) == 1).all()
                np.testing.assert_array_equal(slots[i, s, where], np.arange(M))
                assert mask[i, s, where].all()
            else:
                assert len(where) == 0
    assert mask[:, :, -1].all()  # still left-padded
    if first:
        assert not present[:, 0].any()  # nothing remembered at the very first turn
        assert present[:, 1].all()  # working memory holds turn 0 at turn 1


def test_latent_rollout_score_mode_consistent_and_trains_adapter(tok):
    n, t = 2, 4
    envs = [gym.make("rllama/TMaze-v0", corridor_length=1) for _ in range(n)]
    # A frozen LLM: what the loss changes is the heads and the memory adapter.
    cfg = TrainConfig(algorithm=PPO(epochs=1), trainable="heads", memory=latent_memory("both"))
    state = new_state(cfg, n)
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=t, prompt_len=L, candidate_len=3)
    )
    step = step_with_logp_gap(cfg)
    for round_ in range(2):
        state, batch = rollout.collect(state)
        assert_latent_layout(batch, n, t, with_episodic=True, first=round_ == 0)
        if round_ == 0:
            # Slots sit at the start of the user turn's content: the text before them is
            # the system prompt and the user header, the text after is the observation.
            i = np.flatnonzero(np.asarray(batch.obs.soft_slots[0, 1]) >= 0)
            toks = np.asarray(batch.obs.prompt_tokens[0, 1])
            keep = np.asarray(batch.obs.prompt_mask[0, 1]).astype(bool)
            before = tok.decode(toks[: i[0]][keep[: i[0]]])
            assert before.rstrip().endswith("user") and "maze" in before
            assert tok.decode(toks[i[-1] + 1 :]).lstrip().startswith("You walk")
        else:  # the first train_step wrote episodic memory: now retrieval is valid
            assert np.asarray(batch.obs.latent_memory.valid).all()
        # Key consistency check (inside train_step): acting and learning see one policy.
        state, changed = train_and_check(step, state, batch)
        assert changed["w_working"], changed  # working memory reaches the adapter
        if round_ == 1:  # episodic keys (identical ones are possible) reach the values
            assert changed["w_value"], changed
    assert int(state.memory.episodic.valid.sum()) == 2 * n * t


def test_latent_rollout_generate_mode_consistent(tok):
    n, t = 2, 3
    envs = [gym.make("rllama/TMaze-v0", corridor_length=1) for _ in range(n)]
    cfg = TrainConfig(
        algorithm=PPO(epochs=1), action_mode="generate", trainable="lora",
        lora=LoraConfig(rank=2),
        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0, top_p=1.0),
        memory=latent_memory("working"),
    )  # fmt: skip
    state = new_state(cfg, n)
    rollout = Rollout(
        envs, tok, MODEL, cfg, RolloutConfig(num_steps=t, prompt_len=L),
        extract_action=lambda reply: None,  # a random model never parses: fallback action
    )  # fmt: skip
    state, batch = rollout.collect(state)
    assert_latent_layout(batch, n, t, with_episodic=False, first=True)
    assert batch.response_tokens.shape == batch.old_logp.shape == (n, t, 4)

    @jax.jit
    def recompute(trainable, frozen, obs, response, response_mask):
        """train_step's generate-mode evaluation: reply log-probs [M, R] and the gradient
        of their sum with respect to the adapter."""
        model = policy_params(trainable, frozen, cfg)

        def total(adapter):
            logp = evaluate_generate(
                model, trainable["heads"], obs, response, response_mask, MODEL, cfg, adapter
            ).token_logp
            return jnp.sum(logp), logp

        return jax.grad(total, has_aux=True)(memory_adapter(trainable))

    flat = lambda x: jnp.asarray(x).reshape((n * t,) + x.shape[2:])  # noqa: E731
    grads, logp = recompute(
        state.trainable, state.frozen, jax.tree.map(flat, batch.obs),
        flat(batch.response_tokens), flat(batch.response_mask),
    )  # fmt: skip
    rmask = np.asarray(batch.response_mask).astype(bool)
    got = np.asarray(logp).reshape(n, t, -1)
    np.testing.assert_allclose(got[rmask], batch.old_logp[rmask], atol=1e-5)
    norms = {name: float(jnp.abs(g).max()) for name, g in grads.items()}
    assert norms["w2"] > 0 and norms["w_working"] > 0 and norms["slot_embed"] > 0, norms


# Score mode, frozen LLM (only heads and the adapter train), one retrieved entry; shared by the
# tests below so that their act calls compile once.
HEADS_CFG = TrainConfig(
    algorithm=PPO(epochs=1), trainable="heads", memory=latent_memory("episodic", k=1)
)
INSERT_AT = jnp.asarray([4], jnp.int32)


def small_obs() -> Observation:
    prompt = np.random.default_rng(0).integers(3, 1000, (1, 12))
    return Observation(
        prompt_tokens=jnp.asarray(prompt, jnp.int32),
        prompt_mask=jnp.ones((1, 12), jnp.int32),
        candidate_tokens=jnp.asarray([[[40, 41], [50, 51]]], jnp.int32),
        candidate_mask=jnp.ones((1, 2, 2), jnp.int32),
        action_mask=jnp.ones((1, 2), bool),
    )


def test_memory_contents_change_the_action_distribution():
    cfg = HEADS_CFG
    state = new_state(cfg, 1)
    obs = small_obs()

    @jax.jit
    def distribution(trainable, frozen, memory):
        """(what act saw, action log-probs [1, A]) for the same observation."""
        out = act(trainable, frozen, memory, obs, INSERT_AT, jax.random.key(0), MODEL, cfg)
        model = policy_params(trainable, frozen, cfg)
        ev = evaluate_score(
            model, trainable["heads"], out.obs, MODEL, cfg, memory_adapter(trainable)
        )
        return out.obs, ev.log_probs

    def memory_with(key):
        tokens = jnp.ones((1, 12), jnp.int32)
        return record_experience(
            init_memory(cfg.memory, 1), cfg.memory, key, tokens, tokens, jnp.ones(1),
            jnp.ones(1, bool),
        )  # fmt: skip

    run = lambda memory: distribution(state.trainable, state.frozen, memory)  # noqa: E731
    empty, p_empty = run(init_memory(cfg.memory, 1))
    a, p_a = run(memory_with(jax.random.normal(jax.random.key(5), (1, D))))
    b, p_b = run(memory_with(jax.random.normal(jax.random.key(6), (1, D))))
    assert np.asarray(a.latent_memory.valid).all()
    assert not np.allclose(np.asarray(a.latent_memory.keys), np.asarray(b.latent_memory.keys))
    # Different retrieved entries -> different soft prompts -> a different policy.
    assert np.abs(np.asarray(p_a) - np.asarray(p_b)).max() > 1e-4, (p_a, p_b)
    assert np.abs(np.asarray(p_a) - np.asarray(p_empty)).max() > 1e-4
    # The slots sit after the first INSERT_AT prompt tokens (real tokens, not padding).
    slots = np.flatnonzero(np.asarray(a.soft_slots[0]) >= 0)
    first_real = int(np.argmax(np.asarray(a.prompt_mask[0])))
    np.testing.assert_array_equal(slots, first_real + 4 + np.arange(M))
    # Nothing retrieved -> no slot: the memory-free prompt, only wider (masked padding).
    assert (np.asarray(empty.soft_slots) == -1).all()
    keep = np.asarray(empty.prompt_mask[0]).astype(bool)
    np.testing.assert_array_equal(np.asarray(empty.prompt_tokens[0])[keep], obs.prompt_tokens[0])


class ScoringBlackjackAgent(RLlamaAgent):
    def get_system_prompt(self) -> str:
        return "You play blackjack. Answer stay or hit."

    def format_observation(self, observation) -> str:
        return f"Hand {observation[0]}, dealer {observation[1]}, ace {bool(observation[2])}."

    def extract_action(self, response: str):
        return 0 if "stay" in response.lower() else 1

    def candidate_actions(self, observation) -> list[str]:
        return ["stay", "hit"]


def make_agent(tok, **kw):
    model = (MODEL, init_params(MODEL, jax.random.key(0)), tok)
    kw = {"batch_size": 4, **kw}
    return ScoringBlackjackAgent(
        model, algorithm="ppo", lora_rank=2, epochs=1, prompt_len=L, candidate_len=2,
        max_actions=2, **kw,
    )  # fmt: skip


def test_agent_latent_memory_runs_episodes_and_round_trips(tok, tmp_path):
    # batch_size larger than the turns played: no update here (train_step is covered above).
    kw = dict(memory="both", memory_mode="latent", latent_slots=2, latent_dim=16, batch_size=64)
    agent = make_agent(tok, **kw)
    assert agent.train_config.memory.representation == "latent"
    env = gym.make("Blackjack-v1")
    for episode in range(3):
        observation, _ = env.reset(seed=episode)
        done = False
        while not done:
            action = agent.act(observation)
            assert action in (0, 1)
            observation, reward, term, trunc, _ = env.step(action)
            agent.assign_reward(reward)
            done = term or trunc
        assert agent.terminate_episode() == {}
    # The recorded turns form a training batch carrying the memory read of each turn: one
    # row of batch_size turns, those not played yet invalid.
    turns = [x for episode in agent._done for x in episode]
    n = len(turns)
    assert 0 < n < 64
    batch = agent._trajectory([turns], cut=None)
    assert batch.obs.soft_slots.shape == (1, 64, L + 2)
    assert batch.obs.latent_memory.keys.shape == (1, 64, 2, D)
    assert batch.obs.latent_memory.summary.shape == (1, 64, D)
    np.testing.assert_array_equal(batch.valid[0], np.arange(64) < n)
    # Working memory feeds the adapter from an episode's second turn on (cleared at its end).
    later = [False] + [not x.ended for x in turns[:-1]]
    np.testing.assert_array_equal(batch.obs.latent_memory.summary_valid[0, :n], later)
    slots = np.asarray(batch.obs.soft_slots[0, :n])
    np.testing.assert_array_equal((slots >= 0).sum(-1), 2 * np.asarray(later))
    # Save/load carries the adapter (moved off its initial values first).
    adapter = jax.tree.map(lambda x: x + 0.5, agent.state.trainable["memory_adapter"])
    agent.state = agent.state.replace(
        trainable={**agent.state.trainable, "memory_adapter": adapter}
    )
    agent.save(str(tmp_path / "ckpt"))
    other = make_agent(tok, **kw)
    other.load(str(tmp_path / "ckpt"))
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, adapter),
        jax.tree.map(np.asarray, other.state.trainable["memory_adapter"]),
    )


def test_latent_configuration_errors(tok):
    with pytest.raises(ValueError, match="memory_mode='latent' needs a memory"):
        make_agent(tok, memory="none", memory_mode="latent")
    with pytest.raises(ValueError, match="memory_mode must be"):
        make_agent(tok, memory="both", memory_mode="soft")
    lat = LatentConfig(key_dim=D, hidden_size=D, num_slots=M)
    with pytest.raises(ValueError, match="mode is 'none'"):
        MemoryConfig(mode="none", representation="latent", latent=lat)
    with pytest.raises(ValueError, match="needs a LatentConfig"):
        MemoryConfig(mode="working", representation="latent", working=WorkingConfig(2, 4, D))
    with pytest.raises(ValueError, match="key_dim"):
        MemoryConfig(
            mode="working", representation="latent", working=WorkingConfig(2, 4, D),
            latent=lat.replace(key_dim=D + 1),
        )  # fmt: skip
    with pytest.raises(ValueError, match="num_slots"):
        LatentConfig(key_dim=D, hidden_size=D, num_slots=0)
    wrong = MemoryConfig(
        mode="working", representation="latent", working=WorkingConfig(2, 4, D),
        latent=lat.replace(hidden_size=D * 2),
    )  # fmt: skip
    with pytest.raises(ValueError, match="hidden_size"):
        new_state(TrainConfig(trainable="heads", memory=wrong), 1)
    # The adapter is trainable in every mode (and so in the optimizer state).
    for mode in ("full", "lora", "heads"):
        state = new_state(TrainConfig(trainable=mode, memory=latent_memory("working")), 1)
        assert set(state.trainable["memory_adapter"]) >= {"w1", "w2", "slot_embed"}
    # An observation with soft-prompt slots cannot be evaluated without the adapter.
    obs = small_obs()
    read = latent_inputs(init_memory(HEADS_CFG.memory, 1), HEADS_CFG.memory, jnp.zeros((1, D)))
    obs = obs.replace(soft_slots=jnp.full((1, 12), -1, jnp.int32), latent_memory=read)
    model = init_params(MODEL, jax.random.key(0))
    with pytest.raises(ValueError, match="adapter"):
        evaluate_score(model, {}, obs, MODEL, HEADS_CFG)
    # A state built without latent memory cannot act with a latent config.
    plain = new_state(TrainConfig(trainable="heads"), 1)
    with pytest.raises(ValueError, match="memory_adapter"):
        act(
            plain.trainable, plain.frozen, init_memory(HEADS_CFG.memory, 1), small_obs(),
            INSERT_AT, jax.random.key(0), MODEL, HEADS_CFG,
        )  # fmt: skip
