"""Sharded train_step on 1, 2 and 4 devices: step time, compile time, and (for CPU runs)
agreement with the first mesh's loss. Also the runnable example of README "Scaling out".

Each mesh runs in its own process, because the number of emulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) is fixed when JAX starts. The step
is PPO with LoRA in score mode (N envs x T turns, prompts of L tokens, A candidates of C
tokens) on a random Llama (``--model=tiny`` / ``small``) or a real checkpoint loaded straight
into its shardings (``--model=smollm2-135m-instruct``, a directory or a .gguf).

On one CPU the emulated devices share the same cores: this shows that sharding is correct
and what it costs in compile time and communication, not a speed-up.

    python experiments/bench_sharding.py                      # 1, 2, 4 emulated CPU devices
    python experiments/bench_sharding.py --child --mesh=data:2,fsdp:2,tensor:2   # on 8 GPUs
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "meshes",
    ["data:1", "data:2", "data:4", "fsdp:2,tensor:2"],
    "Mesh specs, one process each (devices = product of the sizes).",
)
flags.DEFINE_string("model", "small", "tiny | small (random Llamas) or a load_pretrained name.")
flags.DEFINE_integer("envs", 8, "N environments (rows) per batch.")
flags.DEFINE_integer("turns", 2, "T turns per environment.")
flags.DEFINE_integer("prompt_len", 32, "L prompt tokens.")
flags.DEFINE_integer("actions", 4, "A candidate actions.")
flags.DEFINE_integer("action_len", 4, "C tokens per candidate.")
flags.DEFINE_integer("repeats", 3, "Timed steps after the compile step; the median is reported.")
flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "Mixed precision (bf16 for TPU/GPU).")
flags.DEFINE_boolean("child", False, "Run one mesh in this process (on its real devices).")
flags.DEFINE_string("mesh", "data:-1", "Mesh spec of a --child run.")
flags.DEFINE_boolean("distributed", False, "jax.distributed.initialize() first (multi-host).")
flags.DEFINE_string("json_out", "", "Write the results as JSON here.")

RANDOM_MODELS = {
    "tiny": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8,
    ),
    "small": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
        num_kv_heads=4, head_dim=32,
    ),
}  # fmt: skip


def run_child() -> dict:
    """One mesh, in this process: build, place, compile, time."""
    from rllama_jax.distributed import maybe_initialize_distributed

    maybe_initialize_distributed(FLAGS.distributed)

    import jax
    import numpy as np

    from rllama_jax.algos import PPO
    from rllama_jax.distributed import (
        load_sharded,
        make_mesh,
        make_sharded_train_step,
        place,
        shard_batch,
        shard_train_state,
    )
    from rllama_jax.models import LlamaConfig, init_params
    from rllama_jax.train import Batch, Observation, TrainConfig, init_train_state

    mesh = make_mesh(FLAGS.mesh)
    start = time.perf_counter()
    if FLAGS.model in RANDOM_MODELS:
        model = LlamaConfig(**RANDOM_MODELS[FLAGS.model])
        params = init_params(model, jax.random.key(0))
    else:
        model, params, _ = load_sharded(FLAGS.model, mesh, tokenizer=False)
    load_s = time.perf_counter() - start

    cfg = TrainConfig(algorithm=PPO(epochs=1), action_mode="score", trainable="lora")
    state = init_train_state(cfg, model, params, jax.random.key(1))
    state = shard_train_state(state, mesh, model, precision=FLAGS.precision)
    n, t, length, a, c = FLAGS.envs, FLAGS.turns, FLAGS.prompt_len, FLAGS.actions, FLAGS.action_len
    rng = np.random.default_rng(0)
    vocab = model.vocab_size
    batch = Batch(
        obs=Observation(
            prompt_tokens=rng.integers(3, vocab, (n, t, length)).astype(np.int32),
            prompt_mask=np.ones((n, t, length), np.int32),
            candidate_tokens=rng.integers(3, vocab, (n, t, a, c)).astype(np.int32),
            candidate_mask=np.ones((n, t, a, c), np.int32),
            action_mask=np.ones((n, t, a), bool),
        ),
        actions=rng.integers(0, a, (n, t)).astype(np.int32),
        rewards=rng.normal(size=(n, t)).astype(np.float32),
        terminated=np.zeros((n, t), bool),
        truncated=np.zeros((n, t), bool),
        valid=np.ones((n, t), bool),
        old_logp=np.full((n, t), -np.log(a), np.float32),
        old_values=np.zeros((n, t), np.float32),
        final_values=np.zeros((n, t), np.float32),
        bootstrap_value=np.zeros((n,), np.float32),
    )
    batch = shard_batch(batch, mesh)
    step = make_sharded_train_step(cfg, model, mesh, precision=FLAGS.precision)

    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(state)
    first_s = time.perf_counter() - start
    losses = [float(metrics["loss"])]
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
    # Per-device work from XLA's cost analysis of the partitioned program (the program just
    # timed). Unlike CPU times, it shows what each device of a real mesh computes.
    fn, in_shardings = step.jitted(state, batch)
    start = time.perf_counter()
    compiled = fn.lower(*place((state, batch), in_shardings)).compile()
    recompile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    wq = (state.frozen.get("model") or state.trainable["model"])["layers"]["wq"]
    return {
        "mesh": FLAGS.mesh,
        "mesh_shape": dict(mesh.shape),
        "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "processes": jax.process_count(),
        "model": FLAGS.model,
        "params": model.num_params(),
        "load_s": round(load_s, 2),
        "first_step_s": round(first_s, 2),
        "step_ms": round(1000 * statistics.median(times), 1),
        "step_ms_all": [round(1000 * x, 1) for x in times],
        "device_gflop": round(float(cost.get("flops", float("nan"))) / 1e9, 4),
        "cost_analysis_compile_s": round(recompile_s, 2),
        "losses": losses,
        "wq_spec": str(wq.sharding.spec),
    }


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.child:
        result = run_child()
        print("RESULT " + json.dumps(result))
        return
    from rllama_jax.distributed import parse_mesh_spec

    results = []
    for spec in FLAGS.meshes:
        devices = 1
        for size in parse_mesh_spec(spec).values():
            devices *= size
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        ).strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
        args = [a for a in sys.argv[1:] if not a.startswith(("--meshes", "--json_out"))]
        cmd = [sys.executable, __file__, "--child", f"--mesh={spec}", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{spec}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(line[-1][len("RESULT ") :]))
    base = results[0]["losses"] if results else []
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"model {FLAGS.model}, PPO LoRA score mode, batch {FLAGS.envs} x {FLAGS.turns} turns x "
        f"{FLAGS.prompt_len} tokens, {FLAGS.actions} x {FLAGS.action_len} candidates, "
        f"{FLAGS.precision}\n"
    )
    print(
        "| mesh | devices | wq spec | GFLOP per device | compile + first step s | "
        "step ms (median) | max loss diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        diff = max(abs(x - y) for x, y in zip(r["losses"], base, strict=True))
        print(
            f"| {r['mesh']} | {r['devices']} | `{r['wq_spec']}` | {r['device_gflop']} | "
            f"{r['first_step_s']} | {r['step_ms']} | {diff:.1e} |"
        )
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
