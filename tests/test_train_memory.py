"""What keeps a train step that fine-tunes the LLM within memory, and that it changes no
numbers: layer rematerialisation, micro-batches with exact gradient accumulation, LM-head
logits only where a log-prob is needed, and the pre-flight memory check.

Tolerances: everything is float32 on a tiny random Llama. Rematerialisation recomputes the
same operations on the same values, but XLA fuses the recomputed layer (and the cache, now
a per-layer scan input) differently, so sums round differently: losses agree to relative
1e-6, gradients to 1e-5 of each leaf's largest entry (float32 eps is 1.2e-7; a gradient
entry sums hundreds of products, and entries that nearly cancel keep the absolute error of
their terms, hence a tolerance relative to the leaf's scale, not to each entry; measured
differences are below 1e-6 of it). A micro-batched step runs the model on fewer rows at a
time and sums gradients in another order: rounding of the same size, so gradients agree to
1e-5 of the leaf's scale and metrics to relative 1e-5; after one AdamW step (update ~ lr * g / (|g| + eps) per
weight) parameters agree to 1e-3 x lr, since a weight whose gradient is near eps = 1e-8 can
move its update by rounding-size gradient changes divided by eps.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rllama_jax.algos import A2C, GRPO, PPO, make_algorithm
from rllama_jax.experiment.config import ExperimentConfig
from rllama_jax.experiment.memory_check import (
    TrainMemoryError,
    check_train_memory,
    example_batch,
)
from rllama_jax.models import LlamaConfig, forward, init_params, positions_from_mask
from rllama_jax.models.lora import LoraConfig
from rllama_jax.sampling import SamplingConfig, build_prefix, score_candidates, sequence_logprobs
from rllama_jax.train import (
    Batch,
    Observation,
    TrainConfig,
    evaluate_generate,
    evaluate_score,
    init_train_state,
    make_train_step,
    policy_params,
)
from rllama_jax.train import step as step_module

MODEL = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip
PARAMS = init_params(MODEL, jax.random.key(0), std=0.1)
P = 3  # shared prefix tokens
L, A, C, R = 9, 2, 3, 4
N, T = 8, 2  # 16 turns per batch


def prompts(rng: np.random.Generator, rows: int, prefix: bool) -> tuple[np.ndarray, ...]:
    """Prompts [rows, L]: ``prefix``: the same P tokens unpadded in [0, P), then each row's
    own 2-6 tokens left-padded (``tokenization.pad_after_prefix``); else left-padded rows."""
    tokens = np.zeros((rows, L), np.int32)
    mask = np.zeros((rows, L), np.int32)
    start = P if prefix else 0
    for i in range(rows):
        k = int(rng.integers(2, L - start + 1))
        tokens[i, L - k :] = rng.integers(4, 60, k)
        mask[i, L - k :] = 1
    if prefix:
        tokens[:, :P] = [1, 2, 3]
        mask[:, :P] = 1
    return tokens, mask


def observation(rng, rows: int, prefix: bool = False, score: bool = True) -> Observation:
    tokens, mask = prompts(rng, rows, prefix)
    if not score:
        return Observation(jnp.asarray(tokens), jnp.asarray(mask))
    cand = rng.integers(4, 60, (rows, A, C)).astype(np.int32)
    cmask = np.ones((rows, A, C), np.int32)
    cmask[:, 1, 2:] = 0  # candidates of different lengths
    cand = np.where(cmask, cand, 0)
    return Observation(
        jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(cand), jnp.asarray(cmask),
        jnp.ones((rows, A), bool),
    )  # fmt: skip


def config(algo: str = "ppo", mode: str = "score", **kw) -> TrainConfig:
    algorithms = {
        "ppo": PPO(normalize_advantages=True, ent_coef=0.01, epochs=1),
        "a2c": A2C(normalize_advantages=True, ent_coef=0.01),
        "grpo": GRPO(kl_coef=0.0, epochs=1),
    }
    return TrainConfig(
        algorithm=algorithms.get(algo) or make_algorithm(algo), action_mode=mode,
        trainable=kw.pop("trainable", "lora"), lora=LoraConfig(rank=4, alpha=8.0),
        learning_rate=1e-3, head_learning_rate=1e-2, gamma=0.9,
        minibatches=kw.pop("minibatches", 2),
        sampling=SamplingConfig(temperature=1.0, top_p=1.0), **kw,
    )  # fmt: skip


def batch(cfg: TrainConfig, seed: int = 0) -> Batch:
    """A random [N, T] batch with uneven validity (some turns padding) and, in generate mode,
    replies of different lengths: per-micro-batch token and turn counts differ, so a mean of
    per-micro-batch means would not be the minibatch mean."""
    rng = np.random.default_rng(seed)
    score = cfg.action_mode == "score"
    obs = observation(rng, N * T, prefix=cfg.prefix_len > 0, score=score)
    obs = jax.tree.map(lambda x: x.reshape((N, T) + x.shape[1:]), obs)
    valid = np.ones((N, T), bool)
    valid[[1, 4, 6], 1] = False
    fields = {}
    if score:
        fields["actions"] = jnp.asarray(rng.integers(0, A, (N, T)), jnp.int32)
        old_logp = jnp.asarray(np.log(rng.uniform(0.2, 0.8, (N, T))), jnp.float32)
    else:
        lengths = rng.integers(1, R + 1, (N, T))
        rmask = np.arange(R)[None, None, :] < lengths[..., None]
        fields["response_tokens"] = jnp.asarray(np.where(rmask, rng.integers(4, 60, (N, T, R)), 0))
        fields["response_mask"] = jnp.asarray(rmask)
        old_logp = jnp.asarray(np.where(rmask, -rng.uniform(2, 5, (N, T, R)), 0.0), jnp.float32)
    if cfg.algorithm.name == "grpo":
        fields["group_ids"] = jnp.asarray(np.arange(N) // 2, jnp.int32)
    return Batch(
        obs=obs, rewards=jnp.asarray(rng.normal(size=(N, T)), jnp.float32),
        terminated=jnp.asarray(np.tile([False, True], (N, 1))), truncated=jnp.zeros((N, T), bool),
        valid=jnp.asarray(valid), old_logp=old_logp,
        old_values=jnp.asarray(rng.normal(size=(N, T)) * 0.1, jnp.float32),
        final_values=jnp.zeros((N, T)), bootstrap_value=jnp.zeros((N,)), **fields,
    )  # fmt: skip


def state_for(cfg: TrainConfig, seed: int = 1):
    params = jax.tree.map(jnp.copy, PARAMS)
    state = init_train_state(cfg, MODEL, params, jax.random.key(seed))
    # Non-zero adapters (LoRA's b starts at 0, which would hide half of the gradient paths).
    lora = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape, x.dtype),
        state.trainable["lora"],
    )
    return state.replace(trainable={**state.trainable, "lora": lora})


def assert_trees_close(a, b, rtol, atol):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
        a, b,
    )  # fmt: skip


def assert_gradients_close(a, b, rel):
    """Leaf by leaf, |a - b| <= rel x the leaf's largest |b|: float32 rounding of sums over
    many terms is relative to the terms' scale, not to each (possibly cancelling) element."""

    def check(x, y):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=0, atol=rel * max(np.abs(y).max(), 1e-30))

    jax.tree.map(check, a, b)


# ------------------------------------------------------------------ shared prefix
def test_generate_mode_shared_prefix_equals_the_unshared_computation():
    """Generate mode with ``prefix_len``: the prefix's keys/values run once (batch 1, with
    gradients through LoRA) and every row continues it. Reply log-probs, entropies, values
    and the gradients of a PPO-like loss w.r.t. adapters and heads equal those of the same
    [prefix | pad | rest] rows run whole (1e-5); acting (greedy generation) writes the same
    reply tokens with the same log-probs."""
    from rllama_jax.rollout import act

    unshared = config("ppo", "generate")
    shared = unshared.replace(prefix_len=P)
    state = state_for(unshared)
    heads = {"value": jax.tree.map(lambda x: x + 0.3, state.trainable["heads"]["value"])}
    trainable = {**state.trainable, "heads": heads}
    rng = np.random.default_rng(5)
    obs = observation(rng, 6, prefix=True, score=False)
    resp = jnp.asarray(rng.integers(4, 60, (6, R)), jnp.int32)
    rmask = jnp.asarray(np.arange(R)[None] < rng.integers(1, R + 1, (6, 1)))
    adv = jnp.asarray(rng.normal(size=6), jnp.float32)

    def outputs(trainable, cfg):
        model = policy_params(trainable, state.frozen, cfg)
        return evaluate_generate(model, trainable["heads"], obs, resp, rmask, MODEL, cfg)

    def loss(trainable, cfg):
        ev = outputs(trainable, cfg)
        pg = -jnp.sum(ev.token_logp * adv[:, None]) / jnp.sum(rmask)
        return pg - 0.01 * jnp.mean(ev.entropy) + jnp.mean(ev.values**2)

    a, b = outputs(trainable, unshared), outputs(trainable, shared)
    for x, y in [(a.token_logp, b.token_logp), (a.entropy, b.entropy), (a.values, b.values)]:
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g0, g1 = grad(trainable, unshared), grad(trainable, shared)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g0["lora"]))
    assert_gradients_close(g1, g0, rel=1e-5)
    # Acting: the same greedy replies (same tokens, log-probs within float32 rounding).
    s = state.replace(trainable=trainable)
    outs = [
        act(s.trainable, s.frozen, s.memory, obs, jnp.zeros(6, jnp.int32), jax.random.key(0),
            MODEL, cfg.replace(sampling=SamplingConfig(max_new_tokens=R, temperature=1.0,
                                                       top_p=1.0)), greedy=True)
        for cfg in (unshared, shared)
    ]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(outs[0].response_tokens),
                                  np.asarray(outs[1].response_tokens))  # fmt: skip
    np.testing.assert_allclose(np.asarray(outs[1].logp), np.asarray(outs[0].logp), atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs[1].values), np.asarray(outs[0].values), atol=1e-5)


# ------------------------------------------------------------------ rematerialisation
@pytest.mark.parametrize(
    "mode,prefix", [("score", False), ("score", True), ("generate", False), ("generate", True)]
)
def test_remat_same_loss_and_gradients(mode, prefix):
    """PPO with LoRA: the loss's forward with and without jax.checkpoint on the layers gives
    the same loss and the same gradients (relative 1e-6: the same float32 operations)."""
    cfg = config("ppo", mode, prefix_len=P if prefix else 0)
    state = state_for(cfg)
    rng = np.random.default_rng(3)
    obs = observation(rng, 6, prefix=prefix, score=mode == "score")
    resp = jnp.asarray(rng.integers(4, 60, (6, R)), jnp.int32)
    rmask = jnp.asarray(np.arange(R)[None] < rng.integers(1, R + 1, (6, 1)))
    adv = jnp.asarray(rng.normal(size=6), jnp.float32)

    def loss(trainable, remat):
        model = policy_params(trainable, state.frozen, cfg)
        heads = trainable["heads"]
        if mode == "score":
            ev = evaluate_score(model, heads, obs, MODEL, cfg, remat=remat)
            logp = ev.log_probs[:, 0]
            return -jnp.mean(logp * adv) + jnp.mean(ev.values**2)
        ev = evaluate_generate(model, heads, obs, resp, rmask, MODEL, cfg, remat=remat)
        return -jnp.sum(ev.token_logp * adv[:, None]) / jnp.sum(rmask) + jnp.mean(ev.values**2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l0, g0 = grad(state.trainable, False)
    l1, g1 = grad(state.trainable, True)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g0["lora"]))
    assert_gradients_close(g1, g0, rel=1e-5)


def test_remat_train_step_same_update():
    """The whole train step (PPO, LoRA, score mode with the shared prefix) with remat on and
    off: same loss, gradient norm and parameters after the update."""
    results = []
    for remat in (False, True):
        cfg = config("ppo", prefix_len=P, remat=remat)
        step = make_train_step(cfg, MODEL)
        state, metrics = step(state_for(cfg), batch(cfg))
        results.append((state.trainable, metrics))
    (t0, m0), (t1, m1) = results
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-6)
    assert_trees_close(t1, t0, rtol=0, atol=1e-3 * 1e-3)


def test_remat_jaxpr_checkpoints_layers():
    """remat=True really puts the scanned layer body under jax.checkpoint (a remat
    primitive in the jaxpr), remat=False does not."""
    tokens = jnp.ones((2, 5), jnp.int32)
    mask = jnp.ones((2, 5), bool)
    pos = positions_from_mask(mask)

    def f(params, remat):
        return forward(params, MODEL, tokens, pos, mask, remat=remat).logits.sum()

    with_remat = str(jax.make_jaxpr(jax.grad(f), static_argnums=1)(PARAMS, True))
    without = str(jax.make_jaxpr(jax.grad(f), static_argnums=1)(PARAMS, False))
    assert "remat" in with_remat or "checkpoint" in with_remat
    assert "remat" not in without and "checkpoint" not in without


# ------------------------------------------------------------------ micro-batches
CASES = [
    ("ppo", "score", 0),
    ("ppo", "score", P),
    ("ppo", "generate", 0),
    ("ppo", "generate", P),
    ("a2c", "score", 0),
    ("grpo", "generate", 0),
]


@pytest.mark.parametrize("algo,mode,prefix", CASES)
@pytest.mark.parametrize("micro", [2, 4])
def test_microbatches_match_whole_minibatch(algo, mode, prefix, micro):
    """A step on 8-row minibatches split into micro-batches of 2 or 4 rows gives the same
    loss, gradient norm and parameters as the whole minibatch: denominators (valid turns,
    reply tokens, sequences) and advantage normalisation stay the minibatch's."""
    out = {}
    for rows in (0, micro):
        cfg = config(algo, mode, prefix_len=prefix, microbatch_rows=rows)
        state, metrics = make_train_step(cfg, MODEL)(state_for(cfg), batch(cfg))
        out[rows] = (state.trainable, metrics)
    (t0, m0), (t1, m1) = out[0], out[micro]
    assert set(m0) == set(m1)
    for key in m0:
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-5, atol=1e-7)
    assert float(m0["grad_norm"]) > 0
    assert_trees_close(t1, t0, rtol=0, atol=1e-3 * 1e-3)


def test_microbatch_gradient_equals_minibatch_gradient():
    """The accumulated gradient itself (not only the AdamW step taken from it): PPO with
    advantage normalisation, uneven valid turns and entropy, one 16-row minibatch in 8
    micro-batches of 2 rows vs at once: relative 1e-5."""
    results = []
    for rows in (0, 2):
        results.append(minibatch_gradient(config("ppo", microbatch_rows=rows, minibatches=1)))
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(results[0])) > 0
    assert_gradients_close(results[1], results[0], rel=1e-5)


def minibatch_gradient(cfg: TrainConfig):
    """The gradient the step computes (one epoch, one minibatch): the update is replaced by
    one that returns the gradient as the new parameters."""

    def grab(optimizer, trainable, opt_state, grads, loss):
        return grads, opt_state, jnp.zeros((), jnp.int32)

    real = step_module._guarded_update
    step_module._guarded_update = grab
    try:
        new, _ = make_train_step(cfg, MODEL)(state_for(cfg), batch(cfg))
    finally:
        step_module._guarded_update = real
    return jax.tree.map(np.asarray, new.trainable)


def test_microbatched_step_compiles_once_and_scans():
    """Two steps, one trace and one compilation; the micro-batches are a lax.scan: the model
    is traced as often with 4 micro-batches as with 2."""
    cfg = config("ppo", microbatch_rows=2)
    raw = make_train_step(cfg, MODEL, jit=False)
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(raw, n=1), donate_argnums=0)
    state = state_for(cfg)
    for seed in range(2):
        state, metrics = step(state, batch(cfg, seed))
    assert step._cache_size() == 1
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))

    traces = {}
    real = step_module.evaluate_score

    def counting(*args, **kwargs):
        traces["n"] = traces.get("n", 0) + 1
        return real(*args, **kwargs)

    step_module.evaluate_score = counting
    try:
        counts = []
        for rows in (4, 2):  # 2 and 4 micro-batches of the 8-row minibatch
            traces.clear()
            c = config("ppo", microbatch_rows=rows)
            jax.jit(make_train_step(c, MODEL, jit=False)).lower(state_for(c), batch(c))
            counts.append(traces["n"])
    finally:
        step_module.evaluate_score = real
    assert counts[0] == counts[1]


def test_microbatch_rows_must_divide_minibatch():
    cfg = config("ppo", microbatch_rows=3)
    with pytest.raises(ValueError, match="microbatch_rows=3 does not divide the 8 rows"):
        make_train_step(cfg, MODEL)(state_for(cfg), batch(cfg))
    with pytest.raises(ValueError, match="microbatch_rows=3 does not divide"):
        ExperimentConfig(
            num_envs=8, steps_per_update=2, minibatches=2, microbatch_rows=3
        ).validate()
    ExperimentConfig(num_envs=8, steps_per_update=2, minibatches=2, microbatch_rows=4).validate()


# ------------------------------------------------------------------ logits where needed
def test_candidate_logprobs_match_full_logits():
    """score_candidates computes the LM head at the positions that predict a candidate
    token only; the log-probs equal those read off full [B, L + C, V] logits of each
    (prompt, candidate) sequence, with and without the shared prefix."""
    rng = np.random.default_rng(5)
    for prefix in (False, True):
        obs = observation(rng, 4, prefix=prefix)
        pre = build_prefix(PARAMS, MODEL, obs.prompt_tokens[0, :P]) if prefix else None
        cut = P if prefix else 0
        s = score_candidates(
            PARAMS, MODEL, obs.prompt_tokens[:, cut:], obs.prompt_mask[:, cut:],
            obs.candidate_tokens, obs.candidate_mask, prefix=pre,
        )  # fmt: skip
        for a in range(A):
            tokens = jnp.concatenate([obs.prompt_tokens, obs.candidate_tokens[:, a]], 1)
            mask = jnp.concatenate([obs.prompt_mask, obs.candidate_mask[:, a]], 1).astype(bool)
            # Positions as the prefix path lays them out: prefix, then each row's own tokens.
            pos = positions_from_mask(mask)
            logits = forward(PARAMS, MODEL, tokens, pos, mask).logits  # [B, L + C, V]
            logp = jax.nn.log_softmax(logits[:, L - 1 : -1], -1)
            ref = jnp.take_along_axis(logp, obs.candidate_tokens[:, a, :, None], -1)[..., 0]
            ref = jnp.where(obs.candidate_mask[:, a].astype(bool), ref, 0.0)
            np.testing.assert_allclose(s.token_logp[:, a], ref, atol=1e-5)


def test_reply_logprobs_match_full_logits():
    """sequence_logprobs (generate mode's training log-probs) runs the LM head on the reply
    positions only: same log-probs as full logits over the whole sequence."""
    rng = np.random.default_rng(6)
    obs = observation(rng, 4, score=False)
    resp = jnp.asarray(rng.integers(4, 60, (4, R)), jnp.int32)
    rmask = jnp.asarray(np.arange(R)[None] < np.array([[1], [2], [3], [4]]))
    logp, _ = sequence_logprobs(PARAMS, MODEL, obs.prompt_tokens, obs.prompt_mask, resp, rmask)
    tokens = jnp.concatenate([obs.prompt_tokens, resp], 1)
    mask = jnp.concatenate([obs.prompt_mask.astype(bool), rmask], 1)
    logits = forward(PARAMS, MODEL, tokens, positions_from_mask(mask), mask).logits
    full = jax.nn.log_softmax(logits[:, L - 1 : -1], -1)
    ref = jnp.where(rmask, jnp.take_along_axis(full, resp[..., None], -1)[..., 0], 0.0)
    np.testing.assert_allclose(logp, ref, atol=1e-5)


# ------------------------------------------------------------------ the memory check
def test_memory_check_refuses_what_cannot_fit_and_accepts_what_can():
    """The check compiles the run's step on the rollout's batch shapes; with a fake 64 KiB
    available it refuses in one line naming the flags to change, with plenty it passes."""
    cfg = ExperimentConfig(
        model="tiny", trainable="lora", num_envs=4, steps_per_update=2, minibatches=2,
        prompt_len=12, candidate_len=2, share_prefix=False,
    )  # fmt: skip
    tcfg = TrainConfig(
        algorithm=PPO(epochs=1), trainable="lora", lora=LoraConfig(rank=2), minibatches=2,
        remat=False,
    )  # fmt: skip
    state = init_train_state(tcfg, MODEL, jax.tree.map(jnp.copy, PARAMS), jax.random.key(0))
    step = make_train_step(tcfg, MODEL)
    with pytest.raises(TrainMemoryError) as err:
        check_train_memory(step, state, cfg, tcfg, MODEL, available=2**16)
    message = str(err.value)
    assert "\n" not in message
    for flag in ("--microbatch_rows", "--remat", "--minibatches", "--num_envs"):
        assert flag in message
    estimate = check_train_memory(step, state, cfg, tcfg, MODEL, available=2**40)
    assert estimate is not None and 2**16 < estimate.needed < 2**30
    # The example batch has the shapes the step is run on: it runs.
    shapes = example_batch(cfg, tcfg, MODEL, state)
    concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    concrete = concrete.replace(valid=jnp.ones_like(concrete.valid))
    new_state, metrics = step(state, concrete)
    assert int(new_state.step) == 1


@pytest.mark.parametrize(
    "settings",
    [
        dict(trainable="lora"),
        dict(trainable="heads"),  # frozen-LLM features in the observation
        dict(trainable="lora", action_mode="generate", max_new_tokens=3),
        dict(trainable="lora", algo="grpo", group_size=2, memory="episodic"),
        dict(trainable="lora", algo="dqn"),
    ],
)
def test_example_batch_has_the_rollouts_shapes(settings):
    """The abstract batch the check compiles for has the structure, shapes and dtypes of
    what the rollout collects (so the check compiles the very step the run executes)."""
    from rllama_jax.experiment import build
    from rllama_jax.rollout import Rollout, transitions_example

    cfg = ExperimentConfig(model="tiny", num_envs=4, steps_per_update=2, **settings)
    model_config, params, tokenizer = build.load_model(cfg.model)
    tcfg = build.train_config(cfg, model_config, tokenizer)
    rollout = Rollout(
        build.make_envs(cfg, cfg.num_envs), tokenizer, model_config, tcfg,
        build.rollout_config(cfg), seed=0,
        extract_action=build.extract_action(cfg) if cfg.action_mode == "generate" else None,
    )  # fmt: skip
    replay = None
    if tcfg.off_policy:
        replay = transitions_example(tcfg, build.rollout_config(cfg), model_config)
    state = init_train_state(
        tcfg, model_config, params, jax.random.key(0), num_envs=4, replay_example=replay
    )
    example = example_batch(cfg, tcfg, model_config, state)
    _, real = rollout.collect(state)
    assert (real.next_obs is not None) == tcfg.off_policy
    spec = lambda x: (tuple(x.shape), jnp.dtype(x.dtype))  # noqa: E731
    assert jax.tree.structure(example) == jax.tree.structure(real)
    assert jax.tree.map(spec, example) == jax.tree.map(spec, real)
