"""Train an LLM agent online: the project's main command.

By default SmolLM2-135M-Instruct (embedded, no download) learns Blackjack with PPO in score
mode (it ranks "stay"/"hit"), 32 environments batched; the LLM stays frozen and a policy
head and a value head train on its hidden states (``--trainable=lora`` or ``full`` to
fine-tune the LLM itself); the shared system prompt runs once per call;
progress bar, periodic greedy evaluation, metrics (JSONL + TensorBoard), checkpoints, and a
summary table and learning-curve PNG at the end. Every setting is a flag (``--helpfull``);
invalid combinations fail before anything is compiled. Re-running with the ``--workdir`` of
an interrupted run resumes it.

    python experiments/train.py
    python experiments/train.py --env=tmaze --memory=working --model=tiny --total_steps=4096
    python experiments/train.py --algo=dqn --workdir=runs/bj-dqn
    python experiments/train.py --trainable=lora --learning_rate=1e-4
    python experiments/train.py --mesh=data:-1            # every local device, rows split
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging

from rllama_jax.distributed import maybe_initialize_distributed
from rllama_jax.experiment import run_experiment
from rllama_jax.experiment.build import check_env
from rllama_jax.experiment.flags import config_from_flags, define_experiment_flags
from rllama_jax.experiment.run import RunError, check_resumable
from rllama_jax.models.loading import cache_dir

define_experiment_flags()
flags.DEFINE_integer("sigkill_at_update", 0, "Testing only: SIGKILL this process in that update.")
flags.DEFINE_bool("progress", True, "Show the progress bar.")
flags.DEFINE_string(
    "compilation_cache",
    os.path.join(cache_dir(), "xla"),
    "Persistent XLA compilation cache directory ('' to disable): reruns skip compiling.",
)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:  # a bad setting costs one line, before anything is loaded or compiled
        cfg = config_from_flags()
        cfg.validate()
        if cfg.workdir:
            check_resumable(cfg)
        check_env(cfg)  # a non-text env stops here, before the model loads
    except ValueError as err:
        sys.exit(f"error: {err}")
    try:  # before anything touches a device
        maybe_initialize_distributed(cfg.distributed)
    except Exception as err:  # noqa: BLE001 - JAX raises several kinds; one line for each
        sys.exit(f"error: --distributed: jax.distributed.initialize() failed ({err}); run "
                 "under SLURM / Open MPI / Kubernetes / Cloud TPU or set "
                 "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")  # fmt: skip
    try:
        run_experiment(cfg, progress=FLAGS.progress, sigkill_at_update=FLAGS.sigkill_at_update)
    except RunError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
