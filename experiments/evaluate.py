"""Evaluate a run's checkpoint: greedy and sampled returns over N episodes, mean ± SE.

    python experiments/evaluate.py --run=runs/blackjack-ppo --episodes=10000
    python experiments/evaluate.py --run=runs/blackjack-ppo --modes=greedy --step=40
    python experiments/evaluate.py --run=runs/blackjack-ppo --mesh=data:-1   # all devices

Writes ``eval_<step>.json`` into the run directory next to printing the table.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging

from rllama_jax.distributed import Placement, check_mesh_spec, maybe_initialize_distributed
from rllama_jax.experiment import evaluate, load_run
from rllama_jax.experiment.build import feature_cache

flags.DEFINE_string("run", None, "Workdir of a run made by experiments/train.py.", required=True)
flags.DEFINE_integer("step", -1, "Checkpoint (update count) to evaluate; -1: the latest.")
flags.DEFINE_integer("episodes", 1000, "Episodes per mode.")
flags.DEFINE_integer("num_envs", 64, "Environments stepped together.")
flags.DEFINE_list("modes", ["greedy", "sampled"], "greedy and/or sampled.")
flags.DEFINE_integer("seed", -1, "Seed of the evaluation episodes; -1: the run's eval seed.")
flags.DEFINE_string(
    "mesh",
    "",
    "Evaluate on this device mesh (as train.py's --mesh); '': "
    "the default device, whatever mesh the run trained on.",
)
flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: jax.distributed.initialize() first (as train.py's --distributed; needs --mesh).",
)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    bad = sorted(set(FLAGS.modes) - {"greedy", "sampled"})
    if bad:
        raise app.UsageError(f"--modes: unknown {bad}; use greedy and/or sampled")
    if not os.path.exists(os.path.join(FLAGS.run, "config.json")):
        raise app.UsageError(f"--run={FLAGS.run} is not a run directory (no config.json)")
    if FLAGS.distributed and not FLAGS.mesh:
        raise app.UsageError("--distributed needs --mesh (e.g. --mesh=data:-1)")
    try:
        if FLAGS.mesh:
            check_mesh_spec(FLAGS.mesh)
        maybe_initialize_distributed(FLAGS.distributed)
        cfg, model_config, tokenizer, tcfg, state = load_run(
            FLAGS.run, None if FLAGS.step < 0 else FLAGS.step, mesh=FLAGS.mesh
        )
        placement = Placement(cfg.mesh, model_config, cfg.precision) if cfg.mesh else None
        if placement is not None:
            num_envs = min(FLAGS.num_envs, FLAGS.episodes)
            placement.check_rows(num_envs, "--num_envs (at most --episodes)")
            placement.check_rows(FLAGS.episodes, "--episodes")
    except ValueError as err:
        raise app.UsageError(f"--mesh={FLAGS.mesh}: {err}") from None
    lead = jax.process_index() == 0
    say = print if lead else (lambda *_: None)
    results = {"run": FLAGS.run, "step": int(state.step), "episodes": FLAGS.episodes}
    say(f"{cfg.env} / {cfg.algo} / {cfg.model}: checkpoint after {int(state.step)} updates")
    features = None  # frozen LLM: what the run computed (caches are per process)
    if placement is None or placement.processes == 1:
        features = feature_cache(cfg, tcfg, FLAGS.run)
    for mode in FLAGS.modes:
        start = time.perf_counter()
        res = evaluate(
            state, cfg, model_config, tcfg, tokenizer, episodes=FLAGS.episodes,
            num_envs=FLAGS.num_envs, greedy=mode == "greedy",
            seed=None if FLAGS.seed < 0 else FLAGS.seed, feature_cache=features,
            placement=placement,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        say(f"  {mode:<8} return {res}  ({seconds:.0f} s)")
        results[mode] = {"mean": res.mean, "se": res.se, "seconds": seconds}
    if not lead:
        return
    with open(os.path.join(FLAGS.run, f"eval_{int(state.step)}.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
