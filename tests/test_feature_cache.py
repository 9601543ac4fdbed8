"""Frozen-LLM feature caching: with only heads training in score mode, acting stores the
LLM's scores and hidden states and the train step reuses them; the update must equal the
one that recomputes everything through the LLM."""

from __future__ import annotations

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rllama_jax.envs  # noqa: F401
from rllama_jax.algos import DQN, make_algorithm
from rllama_jax.models import LlamaConfig, init_params
from rllama_jax.models.loading import default_model_dir, load_tokenizer
from rllama_jax.rollout import Rollout, RolloutConfig, transitions_example
from rllama_jax.train import TrainConfig, init_train_state, make_train_step

MODEL = LlamaConfig(
    vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip
ROLL = RolloutConfig(num_steps=3, prompt_len=160, max_actions=2, candidate_len=2)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir())


def _strip(obs):
    return obs.replace(features=None)


@pytest.mark.parametrize("algorithm", ["ppo", "dqn"])
def test_cached_features_give_the_same_update(tok, algorithm):
    algo = make_algorithm(algorithm, epochs=1, replay_batch=4, replay_capacity=16)
    cfg = TrainConfig(algorithm=algo, trainable="heads", head_learning_rate=1e-2)
    assert cfg.caches_features
    assert not cfg.replace(trainable="lora").caches_features
    example = transitions_example(cfg, ROLL, MODEL) if cfg.off_policy else None
    params = init_params(MODEL, jax.random.key(0))

    def fresh(example=example):
        return init_train_state(cfg, MODEL, jax.tree.map(jnp.copy, params), jax.random.key(1),
                                num_envs=4, replay_example=example)  # fmt: skip

    state = fresh()
    # Non-zero heads, so the update depends on the features.
    state = state.replace(
        trainable={**state.trainable, "heads": jax.tree.map(
            lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
            state.trainable["heads"])}
    )  # fmt: skip
    heads0 = jax.tree.map(np.asarray, state.trainable["heads"])
    envs = [gym.make("rllama/Blackjack-v0") for _ in range(4)]
    rollout = Rollout(envs, tok, MODEL, cfg, ROLL, seed=3)
    state, batch = rollout.collect(state)
    if cfg.off_policy:
        assert batch.next_obs.features is not None
        stripped = batch.replace(obs=_strip(batch.obs), next_obs=_strip(batch.next_obs))
    else:
        assert batch.next_obs is None
        stripped = batch.replace(obs=_strip(batch.obs))
    f = batch.obs.features
    assert f.scores.shape == batch.obs.action_mask.shape
    assert f.candidate_hidden.shape == batch.obs.action_mask.shape + (MODEL.hidden_size,)
    step = make_train_step(cfg, MODEL)

    def restart(example=example):
        state = fresh(example)
        heads = jax.tree.map(jnp.asarray, heads0)
        return state.replace(trainable={**state.trainable, "heads": heads})

    # Without features in the replay buffer (DQN) or the batch, the step recomputes them.
    plain = None
    if example is not None:
        plain = example.replace(obs=_strip(example.obs), next_obs=_strip(example.next_obs))
    s_cached, m_cached = step(restart(), jax.tree.map(jnp.asarray, batch))
    s_full, m_full = step(restart(plain), jax.tree.map(jnp.asarray, stripped))
    np.testing.assert_allclose(m_cached["loss"], m_full["loss"], rtol=1e-5, atol=1e-6)
    for a, b, h0 in zip(
        jax.tree.leaves(s_cached.trainable["heads"]),
        jax.tree.leaves(s_full.trainable["heads"]),
        jax.tree.leaves(heads0),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert not np.allclose(np.asarray(a), h0)  # the heads did move


def test_shared_prefix_scoring_equals_left_padded_scoring(tok):
    from rllama_jax.rollout import shared_prefix_length
    from rllama_jax.tokenization import left_pad, pad_after_prefix
    from rllama_jax.train import evaluate_score, init_train_state
    from rllama_jax.trajectory import Observation

    env = gym.make("rllama/Blackjack-v0")
    p = shared_prefix_length(tok, env.unwrapped.system_prompt)
    assert p > 50  # the system prompt is most of a Blackjack prompt
    from rllama_jax.memory import LatentConfig, MemoryConfig, WorkingConfig

    latent = MemoryConfig(mode="working", representation="latent",
                          working=WorkingConfig(4, 8, 32), latent=LatentConfig(32, 32))  # fmt: skip
    with pytest.raises(ValueError, match="latent memory"):
        TrainConfig(prefix_len=p, memory=latent)
    base = TrainConfig(algorithm="ppo", trainable="lora")
    shared = base.replace(prefix_len=p)
    envs = [gym.make("rllama/Blackjack-v0") for _ in range(3)]
    plain_roll = Rollout(envs, tok, MODEL, base, ROLL, seed=5)
    with pytest.raises(ValueError, match="share"):
        Rollout(envs, tok, MODEL, base.replace(prefix_len=p + 1), ROLL)
    shared_roll = Rollout(envs, tok, MODEL, shared, ROLL, seed=5)
    a = plain_roll.encode(plain_roll.raw_obs, plain_roll.candidates)
    b = shared_roll.encode(shared_roll.raw_obs, shared_roll.candidates)
    # [prefix | pad | rest]: same real tokens in the same order as the left-padded rows.
    assert (b.prompt_tokens[:, :p] == b.prompt_tokens[0, :p]).all() and b.prompt_mask[:, :p].all()
    for i in range(3):
        np.testing.assert_array_equal(
            a.prompt_tokens[i][a.prompt_mask[i] == 1], b.prompt_tokens[i][b.prompt_mask[i] == 1]
        )
    with pytest.raises(ValueError, match="shared"):
        pad_after_prefix([[1, 2, 3], [1, 9, 3]], 8, 2)
    np.testing.assert_array_equal(pad_after_prefix([[1, 2, 3]], 5, 2)[0], [[1, 2, 0, 0, 3]])
    assert left_pad([[3]], 3)[0].tolist() == [[0, 0, 3]]
    state = init_train_state(base, MODEL, init_params(MODEL, jax.random.key(0)),
                             jax.random.key(1))  # fmt: skip
    heads = {"value": jax.tree.map(lambda x: x + 0.3, state.trainable["heads"]["value"])}
    model = state.frozen["model"]
    ea = evaluate_score(model, heads, jax.tree.map(jnp.asarray, a), MODEL, base)
    eb = evaluate_score(model, heads, jax.tree.map(jnp.asarray, b), MODEL, shared)
    for x, y in [
        (ea.log_probs, eb.log_probs),
        (ea.values, eb.values),
        (ea.prompt_hidden, eb.prompt_hidden),
        (ea.features.scores, eb.features.scores),
    ]:
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert isinstance(b, Observation)


def test_memoized_features_leave_the_rollout_unchanged(tok):
    """A rollout that skips the LLM for prompts it has seen (and runs it on only the unseen
    rows of a step, packed into a smaller batch) collects the same batches (actions,
    log-probs, values, features) as one that runs the LLM on every row of every step."""
    from rllama_jax.feature_cache import FeatureCache

    cfg = TrainConfig(algorithm="ppo", trainable="heads")
    n = 16
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)),
                             jax.random.key(1), num_envs=n)  # fmt: skip
    state = state.replace(
        trainable={**state.trainable, "heads": jax.tree.map(
            lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape),
            state.trainable["heads"])}
    )  # fmt: skip
    cache = FeatureCache(capacity=1000)
    inserted = []
    insert = cache.insert
    cache.insert = lambda obs, f: (inserted.append(obs.prompt_tokens.shape[0]), insert(obs, f))
    roll = RolloutConfig(num_steps=4, prompt_len=160, max_actions=2, candidate_len=2)
    envs = lambda: [gym.make("rllama/Blackjack-v0") for _ in range(n)]  # noqa: E731
    plain = Rollout(envs(), tok, MODEL, cfg, roll, seed=5)
    memo = Rollout(envs(), tok, MODEL, cfg, roll, seed=5, feature_cache=cache)
    for _ in range(8):
        _, a = plain.collect(state)
        _, b = memo.collect(state)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
        for x, y in [(a.old_logp, b.old_logp), (a.old_values, b.old_values),
                     (a.obs.features.scores, b.obs.features.scores),
                     (a.obs.features.candidate_hidden, b.obs.features.candidate_hidden),
                     (a.obs.features.prompt_hidden, b.obs.features.prompt_hidden)]:  # fmt: skip
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
    # 16 envs x 40 acts over Blackjack's ~280 states: the first acts run the whole batch,
    # later ones only the few unseen rows (<= 7 of them, in one 8-row call) or nothing.
    assert cache.hits + cache.misses == 8 * 5
    assert inserted[0] == n and any(k < 8 for k in inserted)
    assert cache.hits > 0


def test_feature_cache_is_lru_and_refuses_prompts_with_memory(tok, tmp_path):
    from rllama_jax.feature_cache import FeatureCache
    from rllama_jax.memory import MemoryConfig, WorkingConfig
    from rllama_jax.train import Observation, ScoreFeatures

    def obs(rows):
        t = np.asarray(rows, np.int32)[:, None].repeat(3, 1)
        return Observation(t, np.ones_like(t), t[:, None, :2], np.ones_like(t[:, None, :2]),
                           np.ones((len(rows), 1), bool))  # fmt: skip

    def feats(rows):
        r = np.asarray(rows, np.float32)
        return ScoreFeatures(r[:, None], r[:, None, None].repeat(4, 2), r[:, None].repeat(4, 1))

    cache = FeatureCache(capacity=3)
    assert cache.lookup(obs([1, 2])) is None
    cache.insert(obs([1, 2]), feats([1, 2]))
    got = cache.lookup(obs([2, 1, 2]))
    np.testing.assert_array_equal(got.scores[:, 0], [2, 1, 2])
    assert got.candidate_hidden.shape == (3, 1, 4)
    cache.insert(obs([3, 4]), feats([3, 4]))  # evicts the least recently used row: 1
    assert len(cache) == 3
    assert cache.lookup(obs([1])) is None
    assert cache.lookup(obs([2, 3, 4])) is not None
    assert (cache.hits, cache.misses) == (2, 2)
    path = str(tmp_path / "features.npz")  # save / load keeps the rows and their order
    cache.save(path)
    again = FeatureCache.load(path, capacity=2)  # the 2 most recently used: 3 and 4
    assert len(again) == 2 and again.lookup(obs([2])) is None
    np.testing.assert_array_equal(again.lookup(obs([4, 3])).prompt_hidden[:, 0], [4, 3])
    with pytest.raises(ValueError, match="capacity must be positive"):
        FeatureCache(0)
    cfg = TrainConfig(algorithm="ppo", trainable="heads",
                      memory=MemoryConfig(mode="working", working=WorkingConfig(
                          window=2, max_tokens=8, key_dim=MODEL.hidden_size)))  # fmt: skip
    with pytest.raises(ValueError, match="prompts without memory"):
        Rollout([gym.make("rllama/Blackjack-v0")], tok, MODEL, cfg, ROLL,
                feature_cache=FeatureCache())  # fmt: skip


def test_head_input_norm_is_calibrated_once_and_never_trained(tok):
    """Normalising heads: identity until calibrated, statistics from valid rows only, no
    gradient reaches them, and DQN's target heads get the same statistics."""
    from rllama_jax.heads import apply_head, calibrate_head, init_head
    from rllama_jax.train import calibrate_heads

    x = jax.random.normal(jax.random.key(0), (6, 5)) * jnp.arange(1.0, 6.0) + 3.0
    plain = init_head(jax.random.key(1), 5, 1, hidden=8)
    normed = init_head(jax.random.key(1), 5, 1, hidden=8, normalize=True)
    plain["w"] = normed["w"] = jnp.ones((8, 1))
    np.testing.assert_allclose(apply_head(normed, x), apply_head(plain, x), rtol=0, atol=1e-6)
    mask = jnp.array([1, 1, 1, 1, 0, 0], bool)
    x = x.at[4:].set(1e6)  # masked rows must not move the statistics
    cal = calibrate_head(normed, x, mask, rel_eps=0.0)
    z = (x[:4] - cal["in_mean"]) * cal["in_scale"]
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)
    grads = jax.grad(lambda p: apply_head(p, x[:4]).sum())(cal)
    assert not np.any(np.asarray(grads["in_mean"])) and not np.any(np.asarray(grads["in_scale"]))
    with pytest.raises(ValueError, match="normalize=True"):
        calibrate_head(plain, x, mask)
    with pytest.raises(ValueError, match="head_input_norm"):
        TrainConfig(trainable="lora", head_input_norm=True)

    cfg = TrainConfig(algorithm=DQN(replay_batch=4, replay_capacity=16), trainable="heads",
                      head_input_norm=True, head_hidden=8)  # fmt: skip
    example = transitions_example(cfg, ROLL, MODEL)
    state = init_train_state(cfg, MODEL, init_params(MODEL, jax.random.key(0)),
                             jax.random.key(1), num_envs=2, replay_example=example)  # fmt: skip
    rollout = Rollout([gym.make("rllama/Blackjack-v0") for _ in range(2)], tok, MODEL, cfg, ROLL)
    state, batch = rollout.collect(state)
    state = calibrate_heads(state, batch.obs, batch.valid)
    q = state.trainable["heads"]["q"]
    assert batch.valid.all()
    feats = batch.obs.features.candidate_hidden.reshape(-1, MODEL.hidden_size)
    np.testing.assert_allclose(q["in_mean"], feats.mean(0), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(state.target["heads"]["q"]["in_scale"], q["in_scale"])
    before = jax.tree.map(np.asarray, q)
    state, _ = make_train_step(cfg, MODEL)(state, jax.tree.map(jnp.asarray, batch))
    after = state.trainable["heads"]["q"]
    np.testing.assert_array_equal(after["in_mean"], before["in_mean"])
    np.testing.assert_array_equal(after["in_scale"], before["in_scale"])
    assert not np.array_equal(after["w"], before["w"])  # the head itself did train


def test_dqn_acts_epsilon_greedily_on_its_q_values():
    """DQN's acting policy is epsilon-greedy over its Q head, not the LLM's candidate scores
    (which here prefer the other action), with epsilon decaying linearly over train steps;
    ``evaluate_score`` itself stays the candidates' policy (the algorithm shapes acting)."""
    from rllama_jax.losses import masked_log_softmax
    from rllama_jax.memory import MemoryConfig, init_memory
    from rllama_jax.rollout import act
    from rllama_jax.train import Observation, ScoreFeatures, evaluate_score

    algo = DQN(epsilon_start=0.5, epsilon_end=0.1, epsilon_decay=10)
    cfg = TrainConfig(algorithm=algo, trainable="heads", head_hidden=0)
    d = MODEL.hidden_size
    h = jax.random.normal(jax.random.key(0), (3, 3, d))
    heads = {"q": {"w": jax.random.normal(jax.random.key(1), (d, 1)), "b": jnp.zeros(1)}}
    q = np.asarray(h @ heads["q"]["w"])[..., 0]
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
    best = np.argmax(np.where(mask, q, -1e9), -1)
    scores = -10.0 * np.eye(3, dtype=np.float32)[best]
    t = np.zeros((3, 4), np.int32)
    obs = Observation(t, t, np.zeros((3, 3, 2), np.int32), np.zeros((3, 3, 2), np.int32), mask,
                      features=ScoreFeatures(jnp.asarray(scores), h, h[:, 0]))  # fmt: skip
    ev = evaluate_score({}, heads, obs, MODEL, cfg)
    # The candidates' own policy avoids the greedy-Q action.
    assert (np.argmax(np.asarray(ev.log_probs), -1) != best).all()
    n = mask.sum(-1)
    for update, eps in [(0, 0.5), (5, 0.3), (10, 0.1), (50, 0.1)]:
        np.testing.assert_allclose(float(algo.epsilon(update)), eps, rtol=1e-6)
        logits = algo.acting_logits(ev.logits, ev.q, jnp.asarray(mask), jnp.asarray(update))
        probs = np.exp(np.asarray(masked_log_softmax(logits, jnp.asarray(mask))))
        expected = np.where(mask, eps / n[:, None], 0.0)
        expected[np.arange(3), best] += 1 - eps
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    # ``act`` (what the rollout calls) samples from those logits: with no exploration left
    # it takes the greedy-Q action, and its log-prob is that of the epsilon-greedy policy.
    greedy_cfg = cfg.replace(algorithm=DQN(epsilon_start=0.0, epsilon_end=0.0))
    out = act(
        {"heads": heads}, {"model": {}}, init_memory(MemoryConfig(), 3), obs,
        np.zeros(3, np.int32), jax.random.key(3), MODEL, greedy_cfg, False, 0,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.actions), best)
    np.testing.assert_allclose(np.asarray(out.logp), 0.0, atol=1e-6)
    out = act(
        {"heads": heads}, {"model": {}}, init_memory(MemoryConfig(), 3), obs,
        np.zeros(3, np.int32), jax.random.key(3), MODEL, cfg, False, 50,
    )  # fmt: skip
    chosen = np.asarray(out.actions)
    want = np.where(chosen == best, 1 - 0.1 + 0.1 / n, 0.1 / n)
    np.testing.assert_allclose(np.exp(np.asarray(out.logp)), want, rtol=1e-5)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_text_memory_after_a_shared_prefix_equals_the_unshared_prompt(tok, mode):
    """With working and episodic memory as text, the region goes right after the shared
    prefix ([prefix | pad | memory + rest]): acting with ``prefix_len`` sees the same tokens
    in the same order as the unshared prompt and gives the same greedy action/reply, log-prob
    and value (1e-5), and the train step's policy on those prompts agrees too."""
    from rllama_jax.memory import EpisodicConfig, MemoryConfig, WorkingConfig
    from rllama_jax.rollout import act, shared_prefix_length
    from rllama_jax.sampling import SamplingConfig
    from rllama_jax.train import evaluate_generate, evaluate_score, policy_params

    make = lambda: gym.make("rllama/TMaze-v0", corridor_length=5)  # noqa: E731  (7 turns)
    p = shared_prefix_length(tok, make().unwrapped.system_prompt)
    d = MODEL.hidden_size
    memory = MemoryConfig(
        mode="both", episodic=EpisodicConfig(capacity=16, key_dim=d, max_tokens=12, k=2),
        working=WorkingConfig(window=3, max_tokens=12, key_dim=d),
    )  # fmt: skip
    base = TrainConfig(
        algorithm="ppo", trainable="lora", action_mode=mode, memory=memory,
        sampling=SamplingConfig(max_new_tokens=3, temperature=1.0, top_p=1.0),
    )  # fmt: skip
    shared = base.replace(prefix_len=p)
    roll = Rollout([make() for _ in range(3)], tok, MODEL, shared, ROLL, seed=5,
                   extract_action=(lambda reply: reply) if mode == "generate" else None)  # fmt: skip
    state = init_train_state(shared, MODEL, init_params(MODEL, jax.random.key(0)),
                             jax.random.key(1), num_envs=3)  # fmt: skip
    state, traj = roll.collect(state)
    state, _ = make_train_step(shared, MODEL)(state, traj)  # writes episodic memory
    state, _ = roll.collect(state)  # 6 turns into 7-turn episodes: working memory is full
    assert bool(jnp.any(state.memory.working.valid)) and bool(jnp.any(state.memory.episodic.valid))
    obs = jax.tree.map(jnp.asarray, roll.encode(roll.raw_obs, roll.candidates))
    outs = {
        name: act(state.trainable, state.frozen, state.memory, obs, jnp.asarray(roll.insert_at),
                  jax.random.key(3), MODEL, cfg, greedy=True)
        for name, cfg in (("plain", base), ("shared", shared))
    }  # fmt: skip
    a, b = outs["plain"], outs["shared"]
    assert (np.asarray(b.obs.prompt_tokens[:, :p]) == np.asarray(obs.prompt_tokens[0, :p])).all()
    for i in range(3):  # the same real tokens, memory region included, in the same order
        ma, mb = np.asarray(a.obs.prompt_mask[i], bool), np.asarray(b.obs.prompt_mask[i], bool)
        np.testing.assert_array_equal(np.asarray(a.obs.prompt_tokens[i])[ma],
                                      np.asarray(b.obs.prompt_tokens[i])[mb])  # fmt: skip
    assert int(np.asarray(a.obs.prompt_mask).sum()) > int(np.asarray(obs.prompt_mask).sum())
    if mode == "score":
        np.testing.assert_array_equal(np.asarray(a.actions), np.asarray(b.actions))
    else:
        np.testing.assert_array_equal(np.asarray(a.response_tokens), np.asarray(b.response_tokens))
    for x, y in ((a.logp, b.logp), (a.values, b.values), (a.keys, b.keys)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
    model = policy_params(state.trainable, state.frozen, base)
    heads = state.trainable["heads"]
    if mode == "score":
        ea = evaluate_score(model, heads, a.obs, MODEL, base)
        eb = evaluate_score(model, heads, b.obs, MODEL, shared)
        pairs = [(ea.log_probs, eb.log_probs), (ea.values, eb.values)]
    else:
        ea = evaluate_generate(model, heads, a.obs, a.response_tokens, a.response_mask, MODEL, base)
        eb = evaluate_generate(model, heads, b.obs, b.response_tokens, b.response_mask, MODEL,
                               shared)  # fmt: skip
        pairs = [(ea.token_logp, eb.token_logp), (ea.values, eb.values)]
    for x, y in pairs:
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
