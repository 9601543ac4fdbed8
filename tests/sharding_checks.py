"""Multi-device checks of ``rllama_jax.distributed``, run in their own process on 4 emulated
CPU devices (``--xla_force_host_platform_device_count=4`` must be set before JAX starts, and
would disturb the single-device tests if set in pytest's process).

    python tests/sharding_checks.py CASE [CASE ...]     # or: all

Cases: train_ppo (LoRA, and bf16 mixed precision), train_dqn (full fine-tuning), generate
(with scoring and acting), placement (sharded loading). Prints one JSON object per case
(``{"case": ..., "ok": ..., "error"?: ..., ...}``) on its own line; exit code 0 only when
every case passed. ``tests/test_sharding.py`` asserts on that output.
"""

from __future__ import annotations

import os
import sys

# Low LLVM optimisation: these checks compare numbers, not speed, and compile ~2x faster.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rllama_jax.algos import DQN, PPO  # noqa: E402
from rllama_jax.distributed import (  # noqa: E402
    load_sharded,
    make_mesh,
    make_sharded_act,
    make_sharded_generate,
    make_sharded_score,
    make_sharded_train_step,
    shard_params,
    shard_train_state,
)
from rllama_jax.models import LlamaConfig, init_params, load_pretrained  # noqa: E402
from rllama_jax.models.lora import LoraConfig  # noqa: E402
from rllama_jax.models.native_format import save_native  # noqa: E402
from rllama_jax.rollout import act  # noqa: E402
from rllama_jax.sampling import SamplingConfig, generate, score_candidates  # noqa: E402
from rllama_jax.train import (  # noqa: E402
    Batch,
    Observation,
    TrainConfig,
    init_train_state,
    make_train_step,
    n_step_transitions,
)

# Every split dimension divides by 2: heads 4, kv heads 2, MLP 64, vocab 64, width 32.
MODEL = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
MESHES = {"4,1,1": "data:4", "2,2,1": "data:2,fsdp:2", "1,2,2": "fsdp:2,tensor:2"}
L, A, C = 6, 2, 2
TOL = 1e-5


def params() -> dict:
    return init_params(MODEL, jax.random.key(0), std=0.1)


def observation(rng: np.random.Generator, lead: tuple[int, ...]) -> Observation:
    tokens = rng.integers(3, MODEL.vocab_size, lead + (L,)).astype(np.int32)
    mask = np.ones(lead + (L,), np.int32)
    mask[..., :2] = rng.integers(0, 2, lead + (2,))  # some left padding
    tokens = np.where(mask > 0, tokens, 0)
    return Observation(
        prompt_tokens=tokens,
        prompt_mask=mask,
        candidate_tokens=rng.integers(3, MODEL.vocab_size, lead + (A, C)).astype(np.int32),
        candidate_mask=np.ones(lead + (A, C), np.int32),
        action_mask=np.ones(lead + (A,), bool),
    )


def ppo_batch(seed: int, n: int = 8, t: int = 2) -> Batch:
    rng = np.random.default_rng(seed)
    return Batch(
        obs=observation(rng, (n, t)),
        actions=rng.integers(0, A, (n, t)).astype(np.int32),
        rewards=rng.normal(size=(n, t)).astype(np.float32),
        terminated=np.tile([False, True], (n, t // 2)),
        truncated=np.zeros((n, t), bool),
        valid=np.ones((n, t), bool),
        old_logp=np.log(rng.uniform(0.3, 0.7, (n, t))).astype(np.float32),
        old_values=rng.normal(size=(n, t)).astype(np.float32) * 0.1,
        final_values=np.zeros((n, t), np.float32),
        bootstrap_value=np.zeros((n,), np.float32),
    )


def dqn_batch(seed: int, n: int = 4, t: int = 2) -> Batch:
    """A trajectory [n, t] with the observation after each turn (off-policy rows): 8 n-step
    transitions, some ending in a termination."""
    rng = np.random.default_rng(seed)
    return Batch(
        obs=observation(rng, (n, t)),
        actions=rng.integers(0, A, (n, t)).astype(np.int32),
        rewards=rng.normal(size=(n, t)).astype(np.float32),
        terminated=np.tile([False, True], (n, t // 2)) & (np.arange(n) % 2 == 0)[:, None],
        truncated=np.zeros((n, t), bool),
        valid=np.ones((n, t), bool),
        old_logp=np.zeros((n, t), np.float32),
        old_values=np.zeros((n, t), np.float32),
        final_values=np.zeros((n, t), np.float32),
        bootstrap_value=np.zeros((n,), np.float32),
        next_obs=observation(rng, (n, t)),
    )


def max_diff(a, b) -> float:
    diffs = jax.tree.map(
        lambda x, y: (
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            if np.size(x)
            else 0.0
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def spec_of(x) -> str:
    return str(x.sharding.spec)


def shard_shapes(x) -> list[list[int]]:
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def random_heads(state):
    """Heads start at zero, which makes the first model gradients (through the head) ~0:
    there Adam divides rounding noise by its eps and amplifies it ~lr/eps. Random heads keep
    the comparison about sharding, not about Adam's conditioning."""
    keys = iter(jax.random.split(jax.random.key(5), 16))
    heads = jax.tree.map(
        lambda w: 0.3 * jax.random.normal(next(keys), w.shape), state.trainable["heads"]
    )
    target = {**state.target, "heads": jax.tree.map(jnp.copy, heads)} if state.target else {}
    return state.replace(trainable={**state.trainable, "heads": heads}, target=target)


def run_train(cfg: TrainConfig, make_batch, example) -> dict:
    """Two steps unsharded (one device) and on each mesh; returns max differences."""

    def fresh_state():
        state = init_train_state(cfg, MODEL, params(), jax.random.key(1), replay_example=example)
        return random_heads(state)

    batches = [make_batch(s) for s in (10, 11)]
    ref_step = make_train_step(cfg, MODEL)
    state = fresh_state()
    ref_losses = []
    for b in batches:
        state, metrics = ref_step(state, jax.tree.map(jnp.asarray, b))
        ref_losses.append(float(metrics["loss"]))
    ref = jax.device_get(state)
    moved = max_diff(ref.trainable, fresh_state().trainable)
    out: dict = {"ref_loss": ref_losses, "update_size": moved, "meshes": {}}
    for name, spec in MESHES.items():
        mesh = make_mesh(spec)
        step = make_sharded_train_step(cfg, MODEL, mesh)
        state = shard_train_state(fresh_state(), mesh, MODEL)
        losses = []
        for b in batches:
            state, metrics = step(state, b)
            losses.append(float(metrics["loss"]))
        trainable = state.trainable
        wq = (trainable.get("model") or state.frozen["model"])["layers"]["wq"]
        info = {
            "loss_diff": max(abs(x - y) for x, y in zip(losses, ref_losses, strict=True)),
            "trainable_diff": max_diff(trainable, ref.trainable),
            "opt_state_diff": max_diff(state.opt_state, ref.opt_state),
            "target_diff": max_diff(state.target, ref.target),
            "replay_diff": max_diff(state.replay, ref.replay) if state.replay else 0.0,
            "step": int(state.step),
            "wq_spec": spec_of(wq),
            "wq_shards": shard_shapes(wq),
        }
        if "model" in trainable:
            mu = state.opt_state[1].inner_states["model"].inner_state[0].mu["model"]
            info["mu_wq_spec"] = spec_of(mu["layers"]["wq"])
        if "lora" in trainable:
            info["lora_wq_b_spec"] = spec_of(trainable["lora"]["wq"]["b"])
        if state.replay is not None:
            info["replay_spec"] = spec_of(state.replay.valid)
        out["meshes"][name] = info
    # Parameters get 0.1% of the largest move on top (see test_sharding.sharding_tolerance).
    ok = all(v <= TOL + (1e-3 * moved if k == "trainable_diff" else 0.0)
             for info in out["meshes"].values() for k, v in info.items() if k.endswith("_diff"))  # fmt: skip
    out["ok"] = ok and moved > 100 * TOL  # the parameters really moved
    return out


def case_train_ppo() -> dict:
    cfg = TrainConfig(
        algorithm=PPO(epochs=2), action_mode="score", trainable="lora",
        lora=LoraConfig(rank=4, alpha=8.0), learning_rate=3e-3, head_learning_rate=3e-2,
        minibatches=2,
    )  # fmt: skip
    out = run_train(cfg, ppo_batch, None)
    out["bf16"] = bf16_step(cfg, out["ref_loss"][0])
    out["ok"] = out["ok"] and out["bf16"]["ok"]
    return out


def case_train_dqn() -> dict:
    cfg = TrainConfig(
        algorithm=DQN(updates_per_step=2, replay_capacity=16, replay_batch=8),
        action_mode="score", trainable="full", learning_rate=3e-3, head_learning_rate=3e-2,
    )  # fmt: skip
    example = n_step_transitions(jax.tree.map(jnp.asarray, dqn_batch(0)), cfg.gamma, 1)
    return run_train(cfg, dqn_batch, example)


def bf16_step(cfg: TrainConfig, fp32_loss: float) -> dict:
    """One bf16 mixed-precision step on the (2, 2, 1) mesh: the loss (computed before the
    update, on the same parameters and batch) is within bf16 tolerance of the fp32 loss, and
    the trainable parameters and optimizer state stay float32."""
    mesh = make_mesh(MESHES["2,2,1"])
    state = random_heads(init_train_state(cfg, MODEL, params(), jax.random.key(1)))
    state = shard_train_state(state, mesh, MODEL, precision="bf16")
    step = make_sharded_train_step(cfg, MODEL, mesh, precision="bf16")
    state, metrics = step(state, ppo_batch(10))
    dtypes = lambda tree: sorted({str(x.dtype) for x in jax.tree.leaves(tree)})  # noqa: E731
    loss = float(metrics["loss"])
    out = {
        "loss": loss,
        "fp32_loss": fp32_loss,
        "loss_diff": abs(loss - fp32_loss),
        "trainable_dtypes": dtypes(state.trainable),
        "opt_state_dtypes": dtypes([x for x in jax.tree.leaves(state.opt_state) if x.ndim]),
        "frozen_dtypes": dtypes(state.frozen),
    }
    out["ok"] = (
        np.isfinite(loss)
        and out["loss_diff"] <= 2e-2 * max(1.0, abs(fp32_loss))
        and out["trainable_dtypes"] == ["float32"]
        and out["opt_state_dtypes"] == ["float32"]
        and out["frozen_dtypes"] == ["bfloat16"]
    )
    return out


def case_generate() -> dict:
    """Generation (top-p sampling, same key), candidate scoring and ``rollout.act`` on the
    (1, 2, 2) mesh (rows over fsdp, heads over tensor) against one device."""
    p = params()
    rng = np.random.default_rng(3)
    obs = observation(rng, (4,))
    key = jax.random.key(7)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.6, pad_token_id=0)
    prompt = (obs.prompt_tokens, obs.prompt_mask)
    cand = (obs.candidate_tokens, obs.candidate_mask)
    ref_gen = generate(p, MODEL, *map(jnp.asarray, prompt), key, sampling)
    ref_score = score_candidates(p, MODEL, *map(jnp.asarray, prompt + cand))
    act_cfg = TrainConfig(algorithm="ppo", action_mode="score", trainable="lora")
    act_state = init_train_state(act_cfg, MODEL, params(), jax.random.key(2))
    insert_at = np.zeros((4,), np.int32)
    ref_act = act(
        act_state.trainable, act_state.frozen, act_state.memory, jax.tree.map(jnp.asarray, obs),
        jnp.asarray(insert_at), key, model_config=MODEL, config=act_cfg,
    )  # fmt: skip

    mesh = make_mesh(MESHES["1,2,2"])
    sp = shard_params(p, mesh, MODEL)
    gen = make_sharded_generate(mesh, MODEL, sampling)(sp, *prompt, key)
    score = make_sharded_score(mesh, MODEL)(sp, *prompt, *cand)
    placed = shard_train_state(act_state, mesh, MODEL)
    got = make_sharded_act(mesh, MODEL, act_cfg)(
        placed.trainable, placed.frozen, placed.memory, obs, insert_at, key
    )
    out = {
        "tokens": np.asarray(gen.tokens).tolist(),
        "tokens_equal": np.array_equal(np.asarray(gen.tokens), np.asarray(ref_gen.tokens)),
        "logprob_diff": max_diff(gen.logprobs, ref_gen.logprobs),
        "tokens_spec": spec_of(gen.tokens),
        "wq_spec": spec_of(sp["layers"]["wq"]),
        "score_diff": max_diff(score, ref_score),
        "act_actions_equal": np.array_equal(np.asarray(got.actions), np.asarray(ref_act.actions)),
        "act_diff": max_diff((got.logp, got.values, got.keys), tuple(ref_act[4:])),
    }
    out["ok"] = (
        out["tokens_equal"]
        and out["act_actions_equal"]
        and max(out["logprob_diff"], out["score_diff"], out["act_diff"]) <= TOL
    )
    return out


def case_placement() -> dict:
    mesh = make_mesh("data:1,fsdp:2,tensor:2")
    p = params()
    with tempfile.TemporaryDirectory() as tmp:
        save_native(tmp, jax.device_get(p), MODEL)
        _, plain, _ = load_pretrained(tmp, tokenizer=False)
        _, loaded, _ = load_sharded(tmp, mesh, tokenizer=False)
    flat = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    out = {
        "load_diff": max_diff(loaded, plain),
        "specs": {jax.tree_util.keystr(k): spec_of(v) for k, v in flat.items()},
        "shards": {jax.tree_util.keystr(k): shard_shapes(v) for k, v in flat.items()},
        "num_devices": len(loaded["embed"].sharding.device_set),
    }
    placed = shard_params(p, mesh, MODEL)
    same = jax.tree.map(
        lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim), placed, loaded
    )
    out["shard_params_same_sharding"] = all(jax.tree.leaves(same))
    out["ok"] = out["load_diff"] == 0.0 and out["shard_params_same_sharding"]
    return out


CASES = {
    "train_ppo": case_train_ppo,
    "train_dqn": case_train_dqn,
    "generate": case_generate,
    "placement": case_placement,
}


def main(argv: list[str]) -> int:
    names = list(CASES) if argv in ([], ["all"]) else argv
    if len(jax.devices()) != 4:
        print(json.dumps({"case": "setup", "ok": False, "error": f"{jax.devices()}"}))
        return 1
    failed = 0
    for name in names:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            result = CASES[name]()
        except Exception:  # report and go on: one broken case must not hide the others
            result = {"ok": False, "error": traceback.format_exc()}
        result = {
            "case": name,
            "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            **result,
        }
        result["ok"] = bool(result["ok"])
        failed += not result["ok"]
        print(json.dumps(result, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
