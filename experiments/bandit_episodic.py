"""Episodic-memory check on the keyed bandit: does recall improve a model that never trains?

Every episode is one pull: the observation names a situation ("a red door"), and one lever
pays in it, always the same, never shown. A model that does not learn can beat chance only by
recalling what paid before. Here the LLM is frozen and nothing is trained: after each round
(one episode per environment) the round's experiences ("a red door -> pull lever A -> +1")
are written to episodic memory, and the next round's prompts carry the entries retrieved for
their observation. Without memory the return stays where the model's prior puts it; with it,
it should rise over the rounds as memory fills.

    python experiments/bandit_episodic.py --memory=episodic --out=runs/bandit-episodic.json
    python experiments/bandit_episodic.py --memory=none --out=runs/bandit-none.json

The frozen LLM acts by sampling its own candidate log-likelihoods (``--greedy`` takes the
most likely lever: the model's prior then never tries the other lever, so memory holds no
paying entry for half the situations).
Prints the return per round and the first-rounds vs last-rounds comparison with standard
errors.
"""

from __future__ import annotations

import functools
import json
import os
import time

import gymnasium as gym
import jax
import numpy as np
from absl import app, flags

from rllama_jax.experiment import ExperimentConfig
from rllama_jax.experiment.build import load_model, rollout_config, train_config
from rllama_jax.loop import LoopRecord, TrainStep, train_loop
from rllama_jax.rollout import Rollout
from rllama_jax.train import TrainConfig, TrainState, init_train_state, remember_batch
from rllama_jax.trajectory import Trajectory

FLAGS = flags.FLAGS
flags.DEFINE_enum("memory", "episodic", ["none", "episodic"], "Episodic memory on or off.")
flags.DEFINE_string("model", "smollm2-135m-instruct", "'tiny' or a load_pretrained name.")
flags.DEFINE_integer("num_envs", 32, "Environments (episodes per round).")
flags.DEFINE_integer("rounds", 24, "Rounds of one episode per environment.")
flags.DEFINE_integer("situations", 8, "Situations of the bandit.")
flags.DEFINE_integer("arms", 2, "Levers per situation.")
flags.DEFINE_integer("k", 4, "Episodic entries retrieved per step (spliced into the prompt).")
flags.DEFINE_float(
    "control", 0.0, "Episodic control weight (0: the memory only reaches the prompt as text)."
)
flags.DEFINE_integer("capacity", 256, "Episodic memory entries.")
flags.DEFINE_bool("greedy", False, "Most likely lever instead of sampling the LLM's scores.")
flags.DEFINE_integer("window", 4, "Rounds averaged at the start and at the end.")
flags.DEFINE_integer("seed", 0, "Seed (environment draws and sampling).")
flags.DEFINE_string("out", "", "Optional JSON file for the per-round returns.")


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean of a flat array of returns."""
    x = np.asarray(x, float).ravel()
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def remember_only(config: TrainConfig) -> TrainStep:
    """A train step that trains nothing: it only writes the trajectory to episodic memory
    (what every train step does first), so ``train_loop`` runs a frozen model that recalls."""

    @functools.partial(jax.jit, donate_argnums=0)
    def remember(state: TrainState, traj: Trajectory) -> TrainState:
        return state.replace(memory=remember_batch(state, traj, config))

    def step(state: TrainState, traj: Trajectory) -> tuple[TrainState, dict[str, jax.Array]]:
        return remember(state, traj), {}

    return step


def main(argv: list[str]) -> None:
    del argv
    cfg = ExperimentConfig(
        env="bandit", model=FLAGS.model, algo="reinforce", trainable="full",
        memory=FLAGS.memory, episodic_k=FLAGS.k, episodic_control=FLAGS.control, episodic_capacity=FLAGS.capacity,
        num_envs=FLAGS.num_envs, steps_per_update=1, gamma=1.0, seed=FLAGS.seed, prompt_len=96,
    )  # fmt: skip
    cfg.validate()
    model_config, params, tokenizer = load_model(cfg.model, cfg.seed)
    tcfg = train_config(cfg, model_config, tokenizer)
    # Every environment has the same hidden mapping (mapping_seed 0): memories transfer.
    envs = [gym.make(cfg.preset.env_id, num_situations=FLAGS.situations, num_arms=FLAGS.arms)
            for _ in range(cfg.num_envs)]  # fmt: skip
    rollout = Rollout(envs, tokenizer, model_config, tcfg, rollout_config(cfg), seed=cfg.seed,
                      greedy=FLAGS.greedy)  # fmt: skip
    state = init_train_state(tcfg, model_config, params, jax.random.key(cfg.seed),
                             num_envs=cfg.num_envs)  # fmt: skip
    returns = np.zeros((FLAGS.rounds, cfg.num_envs))
    t0 = time.perf_counter()

    def report(rec: LoopRecord, _state: TrainState) -> None:
        r = rec.update - 1
        returns[r] = rec.trajectory.rewards[:, 0]
        print(f"round {r + 1:3d}: return {returns[r].mean():.3f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    train_loop(rollout, state, remember_only(tcfg), FLAGS.rounds, on_update=report)
    w = FLAGS.window
    first, last = mean_se(returns[:w]), mean_se(returns[-w:])
    print(f"memory={FLAGS.memory} control={FLAGS.control}: rounds 1-{w}: {first[0]:.3f} ± {first[1]:.3f}; "
          f"rounds {FLAGS.rounds - w + 1}-{FLAGS.rounds}: {last[0]:.3f} ± {last[1]:.3f} "
          f"(chance {1 / FLAGS.arms:.3f}, {cfg.num_envs} episodes per round)")  # fmt: skip
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in (
                "memory", "model", "num_envs", "rounds", "situations", "arms", "k", "control",
                "capacity", "greedy", "seed")},
                "returns_per_round": returns.mean(axis=1).tolist(),
                "first": first, "last": last}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
