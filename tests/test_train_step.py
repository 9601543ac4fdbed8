"""train_step on a tiny random Llama: probe tasks for every algorithm (after Andy Jones' RL
debugging probes), NaN skipping, one trace per algorithm, and LoRA/trainable subsets.

Probes are synthetic one- or two-turn tasks built directly as batches: the "environment"
is a reward function of (observation, action). Each must be solved within a bounded number of
train steps; targets and tolerances are stated per probe.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rllama_jax.algos import make_algorithm, option_names
from rllama_jax.models import LlamaConfig, forward, init_params, positions_from_mask
from rllama_jax.models.lora import LoraConfig, merge_lora, with_lora
from rllama_jax.train import (
    Batch,
    Observation,
    TrainConfig,
    Trajectory,
    Transitions,
    evaluate_score,
    init_train_state,
    make_train_step,
    policy_params,
)

MODEL = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip
PARAMS = init_params(MODEL, jax.random.key(0), std=0.1)
L, A, C = 6, 2, 2
OBS = np.array([[0, 0, 5, 6, 7, 8], [0, 0, 9, 10, 11, 12]], np.int32)  # two situations
OBS_MASK = (OBS > 0).astype(np.int32)
CANDS = np.array([[20, 21], [30, 31]], np.int32)  # two candidate actions
GAMMA = 0.9


def fresh_params():
    """A private copy: the train state is donated to train_step, so it owns its weights."""
    return jax.tree.map(jnp.copy, PARAMS)


def observation(which: np.ndarray) -> Observation:
    """Observation rows [*which.shape] for situation ids ``which``."""
    shape = which.shape
    return Observation(
        prompt_tokens=jnp.asarray(OBS[which]),
        prompt_mask=jnp.asarray(OBS_MASK[which]),
        candidate_tokens=jnp.broadcast_to(jnp.asarray(CANDS), shape + (A, C)),
        candidate_mask=jnp.ones(shape + (A, C), jnp.int32),
        action_mask=jnp.ones(shape + (A,), bool),
    )


def make(algo: str, **kw) -> tuple[TrainConfig, object, object]:
    """Config, fresh state and train step for ``algo``: keyword arguments the algorithm
    takes (``option_names``) are its hyperparameters, the others ``TrainConfig``'s; algorithms
    with several passes over a batch (PPO, GRPO) take 2 unless told."""
    options = {k: kw.pop(k) for k in list(kw) if k in option_names(algo)}
    if "epochs" in option_names(algo):
        options.setdefault("epochs", 2)
    cfg = TrainConfig(
        algorithm=make_algorithm(algo, **options), action_mode="score",
        trainable=kw.pop("trainable", "lora"), lora=LoraConfig(rank=4, alpha=8.0),
        learning_rate=kw.pop("lr", 3e-3), head_learning_rate=3e-2, gamma=GAMMA, **kw,
    )  # fmt: skip
    example = None
    if cfg.off_policy:
        example = transitions(np.zeros(4, int), np.zeros(4, int), np.zeros(4), np.zeros(4))
    state = init_train_state(cfg, MODEL, fresh_params(), jax.random.key(1), replay_example=example)
    return cfg, state, make_train_step(cfg, MODEL)


@functools.partial(jax.jit, static_argnums=(0,))
def act(cfg: TrainConfig, trainable, frozen, obs: Observation):
    model = policy_params(trainable, frozen, cfg)
    return evaluate_score(model, trainable["heads"], obs, MODEL, cfg)


def flat_obs(obs: Observation) -> Observation:
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), obs)


def on_policy_round(cfg, state, step, which, reward_fn, key, terminated, group_ids=None):
    """One rollout of situations ``which`` [N, T] then one train_step."""
    n, t = which.shape
    obs = observation(which)
    ev = act(cfg, state.trainable, state.frozen, flat_obs(obs))
    actions = jax.random.categorical(key, ev.log_probs).reshape(n, t)
    logp = jnp.take_along_axis(ev.log_probs, actions.reshape(-1, 1), -1).reshape(n, t)
    rewards = reward_fn(which, np.asarray(actions))
    batch = Batch(
        obs=obs, actions=actions, rewards=jnp.asarray(rewards, jnp.float32),
        terminated=jnp.asarray(terminated), truncated=jnp.zeros((n, t), bool),
        valid=jnp.ones((n, t), bool), old_logp=logp, old_values=ev.values.reshape(n, t),
        final_values=jnp.zeros((n, t)), bootstrap_value=jnp.zeros((n,)),
        group_ids=None if group_ids is None else jnp.asarray(group_ids),
    )  # fmt: skip
    return step(state, batch)


def values_and_probs(cfg, state, which):
    ev = act(cfg, state.trainable, state.frozen, observation(np.asarray(which)))
    return np.asarray(ev.values), np.exp(np.asarray(ev.log_probs)), ev


ON_POLICY_VALUE = ["ppo", "a2c", "reinforce"]


def value_cfg(algo):
    extra = {"baseline": "value"} if algo == "reinforce" else {}
    return make(algo, trainable="heads", **extra)


@pytest.mark.parametrize("algo", ON_POLICY_VALUE)
def test_value_probes(algo):
    """Constant, observation-dependent and two-step delayed rewards: the value head must
    reach its target within 0.1 (rewards are in [-1, 1]) after 60 train steps each."""
    rng = np.random.default_rng(0)
    one_turn = np.ones((8, 1), bool)
    # 1. constant reward 1 -> V = 1
    cfg, state, step = value_cfg(algo)
    for i in range(60):
        which = rng.integers(0, 2, (8, 1))
        state, _ = on_policy_round(
            cfg, state, step, which, lambda w, a: np.ones(w.shape), jax.random.key(i), one_turn
        )
    v, _, _ = values_and_probs(cfg, state, [0, 1])
    np.testing.assert_allclose(v, [1.0, 1.0], atol=0.1)
    # 2. reward +1 in situation 0, -1 in situation 1 -> V tracks the observation
    cfg, state, step = value_cfg(algo)
    for i in range(60):
        which = rng.integers(0, 2, (8, 1))
        state, _ = on_policy_round(
            cfg, state, step, which, lambda w, a: np.where(w == 0, 1.0, -1.0),
            jax.random.key(i), one_turn,
        )  # fmt: skip
    v, _, _ = values_and_probs(cfg, state, [0, 1])
    np.testing.assert_allclose(v, [1.0, -1.0], atol=0.1)
    # 3. situation 0 (reward 0) then situation 1 (reward 1, end) -> V(0) = gamma
    cfg, state, step = value_cfg(algo)
    which = np.tile([[0, 1]], (4, 1))
    term = np.tile([[False, True]], (4, 1))
    for i in range(60):
        state, _ = on_policy_round(
            cfg, state, step, which, lambda w, a: (w == 1).astype(float), jax.random.key(i), term
        )
    v, _, _ = values_and_probs(cfg, state, [0, 1])
    np.testing.assert_allclose(v, [GAMMA, 1.0], atol=0.1)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "reinforce", "grpo"])
def test_action_probe_on_policy(algo):
    """Reward 1 for candidate 1 in situation 0 and candidate 0 in situation 1: after at most
    40 train steps the policy picks the rewarded action with probability > 0.9."""
    cfg, state, step = make(algo, lr=1e-2)
    rng = np.random.default_rng(1)
    reward = lambda w, a: (a == 1 - w).astype(float)  # noqa: E731
    for i in range(40):
        if algo == "grpo":
            which = np.repeat(rng.integers(0, 2, (4, 1)), 4, axis=0)  # 4 groups of 4
            groups = np.repeat(np.arange(4), 4)
        else:
            which, groups = rng.integers(0, 2, (16, 1)), None
        state, metrics = on_policy_round(
            cfg, state, step, which, reward, jax.random.key(100 + i), np.ones((16, 1), bool),
            groups,
        )  # fmt: skip
        _, probs, _ = values_and_probs(cfg, state, [0, 1])
        if probs[0, 1] > 0.9 and probs[1, 0] > 0.9:
            break
    assert probs[0, 1] > 0.9 and probs[1, 0] > 0.9, (algo, probs, i)
    assert int(state.skipped) == 0


def transitions(which, actions, rewards, discounts, next_which=None) -> Transitions:
    """Replay rows (what ``init_train_state`` sizes the replay buffer from)."""
    next_which = which if next_which is None else next_which
    return Transitions(
        obs=observation(np.asarray(which)), actions=jnp.asarray(actions, jnp.int32),
        rewards=jnp.asarray(rewards, jnp.float32), discounts=jnp.asarray(discounts, jnp.float32),
        next_obs=observation(np.asarray(next_which)), valid=jnp.ones(len(which), bool),
    )  # fmt: skip


def one_step(which, actions, rewards, terminated, next_which=None) -> Trajectory:
    """A trajectory [N, 1] of one-turn rows (situation ``which`` -> ``next_which``): what an
    off-policy train step turns into the one-step transitions (s, a, r, s', gamma * (1 -
    terminated)) of its replay buffer."""
    which = np.asarray(which)
    n = len(which)
    next_which = which if next_which is None else np.asarray(next_which)
    col = lambda x, dtype: jnp.asarray(np.asarray(x).reshape(n, 1), dtype)  # noqa: E731
    return Trajectory(
        obs=observation(which[:, None]), actions=col(actions, jnp.int32),
        rewards=col(rewards, jnp.float32), terminated=col(terminated, bool),
        truncated=jnp.zeros((n, 1), bool), valid=jnp.ones((n, 1), bool),
        old_logp=jnp.zeros((n, 1)), old_values=jnp.zeros((n, 1)),
        final_values=jnp.zeros((n, 1)), bootstrap_value=jnp.zeros((n,)),
        next_obs=observation(next_which[:, None]),
    )  # fmt: skip


@pytest.mark.parametrize("algo", ["dqn", "sac"])
def test_off_policy_probes(algo):
    """Q-learning probes on uniformly random transitions (off-policy data):
    action-dependent one-step reward -> greedy action correct and Q within 0.15 of (1, 0);
    two-step delayed reward -> Q(s0, a) within 0.15 of gamma * 1."""
    rng = np.random.default_rng(2)
    cfg, state, step = make(algo, trainable="heads", updates_per_step=4, replay_batch=32)
    qname = "q" if algo == "dqn" else "q1"
    for _ in range(60):
        which = rng.integers(0, 2, 16)
        actions = rng.integers(0, 2, 16)
        rewards = (actions == 1 - which).astype(float)
        state, metrics = step(state, one_step(which, actions, rewards, np.ones(16, bool)))
    _, probs, ev = values_and_probs(cfg, state, [0, 1])
    q = np.asarray(ev.q[qname])
    np.testing.assert_allclose(q, [[0.0, 1.0], [1.0, 0.0]], atol=0.15)
    if algo == "sac":  # the soft policy follows the soft Q-values
        assert probs[0, 1] > 0.5 and probs[1, 0] > 0.5, probs
    # Delayed: situation 0 -> (reward 0) -> situation 1 -> (reward 1) -> end.
    cfg, state, step = make(algo, trainable="heads", updates_per_step=4, replay_batch=32)
    for _ in range(80):
        first = rng.integers(0, 2, 16)  # 1 = the transition out of situation 1
        actions = rng.integers(0, 2, 16)
        rewards = first.astype(float)
        nxt = np.ones(16, int)
        state, _ = step(state, one_step(first, actions, rewards, first == 1, nxt))
    _, _, ev = values_and_probs(cfg, state, [0, 1])
    q = np.asarray(ev.q[qname])
    # SAC's soft value adds alpha * entropy; with alpha -> small it approaches gamma.
    target0 = GAMMA * 1.0
    assert np.all(np.abs(q[1] - 1.0) < 0.15), q
    assert np.all(np.abs(q[0] - target0) < 0.15 + (0.1 if algo == "sac" else 0.0)), q


def test_dqn_greedy_policy_probe_with_lora():
    """DQN with LoRA trains the LLM and the Q head together; greedy Q picks the rewarded
    action in both situations."""
    rng = np.random.default_rng(3)
    cfg, state, step = make("dqn", updates_per_step=2, double=True)
    for _ in range(60):
        which = rng.integers(0, 2, 16)
        actions = rng.integers(0, 2, 16)
        state, _ = step(state, one_step(which, actions, actions == 1 - which, np.ones(16, bool)))
    _, _, ev = values_and_probs(cfg, state, [0, 1])
    q = np.asarray(ev.q["q"])
    assert q[0, 1] > q[0, 0] and q[1, 0] > q[1, 1], q


# ---------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_nan_in_batch_skips_update(algo):
    cfg, state, step = make(algo)
    before = jax.tree.map(np.asarray, state.trainable)
    if cfg.off_policy:
        batch = one_step([0, 1, 0, 1], [0, 1, 1, 0], [1.0, np.nan, 0.0, 1.0], np.ones(4, bool))
    else:
        which = np.array([[0], [1], [0], [1]])
        obs = observation(which)
        batch = Batch(
            obs=obs, actions=jnp.zeros((4, 1), jnp.int32),
            rewards=jnp.asarray([[1.0], [np.nan], [0.0], [1.0]]),
            terminated=jnp.ones((4, 1), bool), truncated=jnp.zeros((4, 1), bool),
            valid=jnp.ones((4, 1), bool), old_logp=jnp.full((4, 1), -0.69),
            old_values=jnp.zeros((4, 1)), final_values=jnp.zeros((4, 1)),
            bootstrap_value=jnp.zeros(4),
        )  # fmt: skip
    state, metrics = step(state, batch)
    assert int(state.skipped) >= 1
    assert int(metrics["skipped_updates"]) == int(state.skipped)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.trainable))


@pytest.mark.parametrize("algo", ["ppo", "a2c", "reinforce", "grpo", "dqn", "sac"])
def test_train_step_traces_once(algo):
    options = {"epochs": 1} if "epochs" in option_names(algo) else {}
    cfg = TrainConfig(
        algorithm=make_algorithm(algo, **options), trainable="lora", lora=LoraConfig(rank=2)
    )
    example = transitions([0] * 4, [0] * 4, [0.0] * 4, [0.0] * 4) if cfg.off_policy else None
    state = init_train_state(cfg, MODEL, fresh_params(), jax.random.key(0), replay_example=example)
    raw = make_train_step(cfg, MODEL, jit=False)
    chex.clear_trace_counter()  # the counter is keyed by code, shared across parameters
    step = jax.jit(chex.assert_max_traces(raw, n=1), donate_argnums=0)
    rng = np.random.default_rng(0)
    for _i in range(3):
        if cfg.off_policy:
            batch = one_step(
                rng.integers(0, 2, 4), rng.integers(0, 2, 4), rng.random(4), np.zeros(4, bool)
            )
        else:
            which = rng.integers(0, 2, (4, 1))
            batch = Batch(
                obs=observation(which), actions=jnp.asarray(rng.integers(0, 2, (4, 1))),
                rewards=jnp.asarray(rng.random((4, 1)), jnp.float32),
                terminated=jnp.ones((4, 1), bool), truncated=jnp.zeros((4, 1), bool),
                valid=jnp.ones((4, 1), bool), old_logp=jnp.full((4, 1), -0.69),
                old_values=jnp.zeros((4, 1)), final_values=jnp.zeros((4, 1)),
                bootstrap_value=jnp.zeros(4), group_ids=jnp.asarray([0, 0, 1, 1]),
            )  # fmt: skip
        state, metrics = step(state, batch)
    assert int(state.step) == 3
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())


def test_ahead_of_time_compiled_step_matches_the_jitted_step():
    """``make_train_step(...).compile(state, batch)`` (what the benchmarks time) is called
    like the step and gives the same update; calling it twice works (it was called with the
    jitted function's three internal arguments before, and failed)."""
    cfg, state_a, step = make("ppo", epochs=1)
    _, state_b, _ = make("ppo", epochs=1)
    which = np.array([[0], [1], [0], [1]])
    batch = Batch(
        obs=observation(which), actions=jnp.asarray([[0], [1], [1], [0]]),
        rewards=jnp.asarray([[1.0], [0.0], [0.5], [1.0]]),
        terminated=jnp.ones((4, 1), bool), truncated=jnp.zeros((4, 1), bool),
        valid=jnp.ones((4, 1), bool), old_logp=jnp.full((4, 1), -0.69),
        old_values=jnp.zeros((4, 1)), final_values=jnp.zeros((4, 1)),
        bootstrap_value=jnp.zeros(4),
    )  # fmt: skip
    compiled = step.compile(state_b, batch)
    for _ in range(2):
        state_a, metrics_a = step(state_a, batch)
        state_b, metrics_b = compiled(state_b, batch)
    chex.assert_trees_all_close(state_a.trainable, state_b.trainable, rtol=0, atol=0)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    assert state_b.frozen is not None and int(state_b.step) == 2


def test_lora_changes_only_adapters_and_merge_matches():
    cfg, state, step = make("ppo", lr=1e-2)
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    lora_before = jax.tree.map(np.asarray, state.trainable["lora"])
    which = np.array([[0], [1], [0], [1]])
    for i in range(3):
        state, _ = on_policy_round(
            cfg, state, step, which, lambda w, a: (a == 1).astype(float), jax.random.key(i),
            np.ones((4, 1), bool),
        )  # fmt: skip
    jax.tree.map(
        np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, state.frozen)
    )
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)), lora_before, state.trainable["lora"]
    )
    assert any(jax.tree.leaves(changed))
    assert "model" not in state.trainable  # the frozen base is not in the optimizer
    # Merged weights W + scale * a @ b give the same logits as the factored adapters.
    lora = state.trainable["lora"]
    tokens = jnp.asarray(OBS)
    mask = jnp.asarray(OBS_MASK)
    pos = positions_from_mask(mask)
    factored = forward(with_lora(PARAMS, lora, cfg.lora), MODEL, tokens, pos, mask).logits
    merged = forward(merge_lora(PARAMS, lora, cfg.lora), MODEL, tokens, pos, mask).logits
    base = forward(PARAMS, MODEL, tokens, pos, mask).logits
    np.testing.assert_allclose(factored, merged, atol=1e-5)
    assert np.abs(np.asarray(factored - base)).max() > 1e-4
    # merge_lora is exactly base + delta on every targeted matrix.
    merged_params = merge_lora(PARAMS, lora, cfg.lora)
    for t, ab in lora.items():
        delta = np.einsum("lir,lro->lio", ab["a"], ab["b"]) * cfg.lora.scale
        np.testing.assert_allclose(
            merged_params["layers"][t], np.asarray(PARAMS["layers"][t]) + delta, atol=1e-6
        )


def test_invalid_combinations_fail_clearly():
    with pytest.raises(ValueError, match=r"dqn needs action_mode in \('score',\)"):
        TrainConfig(algorithm="dqn", action_mode="generate")
    with pytest.raises(ValueError, match="trainable='heads' with action_mode='generate'"):
        TrainConfig(algorithm="ppo", action_mode="generate", trainable="heads")
    cfg, state, step = make("ppo", minibatches=3)
    which = np.array([[0], [1], [0], [1]])
    with pytest.raises(ValueError, match="not divisible by minibatches=3"):
        on_policy_round(
            cfg, state, step, which, lambda w, a: w * 0.0, jax.random.key(0), np.ones((4, 1), bool)
        )


def test_ppo_kl_penalty_uses_reference():
    cfg, state, step = make("ppo", kl_coef=0.1, trainable="full", lr=1e-3)
    assert "ref_model" in state.frozen
    which = np.array([[0], [1], [0], [1]])
    for i in range(3):
        state, metrics = on_policy_round(
            cfg, state, step, which, lambda w, a: (a == 1).astype(float), jax.random.key(i),
            np.ones((4, 1), bool),
        )  # fmt: skip
    # After updates the policy moved away from the reference: the KL estimate is positive.
    assert float(metrics["kl_ref"]) > 0.0


@pytest.mark.parametrize("hidden", [0, 16])
def test_sac_twin_critics_start_independent_and_stay_apart(hidden):
    """With zero-initialised linear heads, q1 and q2 got identical gradients forever, so
    min(q1, q2) was q1: no twin pessimism. They now start from independent small weights."""
    cfg, state, step = make("sac", trainable="heads", head_hidden=hidden, replay_batch=8)
    heads = state.trainable["heads"]
    w1, w2 = np.asarray(heads["q1"]["w"]), np.asarray(heads["q2"]["w"])
    assert not np.allclose(w1, w2)
    fan_in = w1.shape[0]
    assert 0 < np.abs(w1).max() < 5 * 0.01 / np.sqrt(fan_in)  # small: Q starts near 0
    assert not np.any(np.asarray(heads["policy"]["w"]))  # other heads still start at zero
    rng = np.random.default_rng(0)
    for _ in range(3):
        which, actions = rng.integers(0, 2, 8), rng.integers(0, 2, 8)
        state, _ = step(state, one_step(which, actions, actions.astype(float), np.ones(8, bool)))
    _, _, ev = values_and_probs(cfg, state, [0, 1])
    q1, q2 = np.asarray(ev.q["q1"]), np.asarray(ev.q["q2"])
    assert np.abs(q1 - q2).max() > 1e-6  # the minimum is over two different critics
