"""The launcher's run on 1, 2 and 4 devices (``--mesh``): per-device train-step FLOPs, step
times from the run's own metrics, and agreement of the final parameters with the first mesh.

Each mesh runs in its own process (the emulated CPU device count,
``--xla_force_host_platform_device_count``, is fixed when JAX starts) through
``run_experiment``, the function behind ``experiments/train.py``. On one CPU the emulated
devices share the same cores: this shows that the sharded loop is correct and how the work
divides (per-device FLOPs), not a speed-up; on a multi-GPU host pass real meshes with
``--child``.

    python benchmarks/bench_launcher_mesh.py        # data:1; data:2; data:4; data:2,fsdp:2
    python benchmarks/bench_launcher_mesh.py --child --mesh=data:-1 --model=smollm2-135m-instruct
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "meshes", "data:1;data:2;data:4;data:2,fsdp:2", "Mesh specs separated by ';', one process each."
)
flags.DEFINE_string("model", "tiny", "--model of the runs.")
flags.DEFINE_string("env", "tmaze", "--env of the runs.")
flags.DEFINE_string("memory", "working", "--memory of the runs.")
flags.DEFINE_string("trainable", "lora", "--trainable of the runs.")
flags.DEFINE_integer("num_envs", 16, "--num_envs.")
flags.DEFINE_integer("updates", 5, "Updates per run (the first, compiling, is not timed).")
flags.DEFINE_boolean("child", False, "Run one mesh in this process (on its real devices).")
flags.DEFINE_string("mesh", "data:-1", "Mesh of a --child run.")
flags.DEFINE_string("workdir", "", "Workdir of a --child run (default: a temporary one).")
flags.DEFINE_string("json_out", "", "Write the results as JSON here.")


def settings() -> dict:
    return dict(
        model=FLAGS.model, env=FLAGS.env, memory=FLAGS.memory, trainable=FLAGS.trainable,
        algo="ppo", num_envs=FLAGS.num_envs, steps_per_update=4,
        total_steps=FLAGS.updates * FLAGS.num_envs * 4, epochs=2, minibatches=2,
        learning_rate=1e-3, eval_every=0, eval_episodes=FLAGS.num_envs,
        eval_envs=FLAGS.num_envs, checkpoint_every=0,
    )  # fmt: skip


def run_child() -> dict:
    import jax

    from rllama_jax.distributed import Placement
    from rllama_jax.experiment import ExperimentConfig, load_run, run_experiment
    from rllama_jax.experiment.memory_check import example_batch
    from rllama_jax.experiment.metrics import read_records

    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench-mesh-")
    cfg = ExperimentConfig(**settings(), mesh=FLAGS.mesh, workdir=workdir)
    start = time.perf_counter()
    run_experiment(cfg, progress=False, log=lambda *_: None)
    wall = time.perf_counter() - start
    records = read_records(workdir)[1:]  # the first update compiles
    cfg, model_config, _, tcfg, state = load_run(workdir, mesh=FLAGS.mesh)
    placement = Placement(cfg.mesh, model_config, cfg.precision)
    batch = example_batch(cfg, tcfg, model_config, state)
    compiled = placement.train_step(tcfg).lower(state, batch).compile()
    flops = float(compiled.cost_analysis().get("flops", float("nan")))
    train_s = statistics.median(r["train_seconds"] for r in records)
    collect_s = statistics.median(r["collect_seconds"] for r in records)
    return {
        "mesh": FLAGS.mesh,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "train_step_device_gflop": round(flops / 1e9, 4),
        "train_s": round(train_s, 3),
        "collect_s": round(collect_s, 3),
        "steps_per_s": round(cfg.steps_per_batch / (train_s + collect_s), 2),
        "run_wall_s": round(wall, 1),
        "workdir": workdir,
    }


def _leaves(workdir: str):
    import jax
    import numpy as np

    from rllama_jax.experiment import load_run

    return [np.asarray(x, np.float64) for x in jax.tree.leaves(load_run(workdir)[-1].trainable)]


def run_parent() -> list[dict]:
    import numpy as np

    results, base = [], tempfile.mkdtemp(prefix="bench-mesh-")
    for spec in FLAGS.meshes.split(";"):
        devices = math.prod(int(e.split(":")[1]) for e in spec.split(","))
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        workdir = os.path.join(base, spec.replace(":", "").replace(",", "-"))
        flags_ = [f"--mesh={spec}", f"--workdir={workdir}", f"--model={FLAGS.model}",
                  f"--env={FLAGS.env}", f"--memory={FLAGS.memory}",
                  f"--trainable={FLAGS.trainable}", f"--num_envs={FLAGS.num_envs}",
                  f"--updates={FLAGS.updates}"]  # fmt: skip
        proc = subprocess.run(
            [sys.executable, __file__, "--child", *flags_], env=env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1]))
    ref = _leaves(results[0]["workdir"])
    for r in results:
        got = _leaves(r["workdir"])
        r["max_param_diff_vs_first"] = float(
            max(np.max(np.abs(a - b), initial=0.0) for a, b in zip(ref, got, strict=True))
        )
    return results


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    if FLAGS.child:
        print(json.dumps(run_child()))
        return
    results = run_parent()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {settings()}")  # fmt: skip
    print("| mesh | devices | train step GFLOP / device | train s | collect s | steps/s | "
          "max |param diff| vs first |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mesh']} | {r['devices']} | {r['train_step_device_gflop']} | {r['train_s']} "
              f"| {r['collect_s']} | {r['steps_per_s']} | {r['max_param_diff_vs_first']:.1e} |")  # fmt: skip
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
