"""The training loop: collect a trajectory, learn from it, report. Defined once, here.

The launcher (``experiment.run``), ``RLlamaAgent.train``, the experiments, the benchmarks
and the notebooks all run ``train_loop``; the agent's single-env API, which collects its
own trajectories, runs its body ``learn``. What differs between algorithms lives in the
algorithm object (``rllama_jax.algos``): the loop never asks which one it runs.

``train_loop`` hands the train step what ``Rollout.to_device`` makes of the trajectory: the
global batch split over the mesh when the rollout has a ``Placement``.

``learn`` standardises the heads' inputs on the first trajectory of a fresh state (when
``TrainConfig.head_input_norm`` asks for it: step 0, so a restored state keeps its
statistics) and then takes one train step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rllama_jax.rollout import Rollout
from rllama_jax.train import TrainConfig, TrainState, calibrate_heads
from rllama_jax.trajectory import Trajectory

TrainStep = Callable[[TrainState, Trajectory], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass
class LoopRecord:
    """One finished update of ``train_loop``.

    update: how many updates are done (1 after the first); metrics: the train step's, as
    floats; collect_seconds, train_seconds: wall time of acting and of the train step;
    trajectory: what was collected (host arrays) for hooks that inspect it.
    """

    update: int
    metrics: dict[str, float]
    collect_seconds: float
    train_seconds: float
    trajectory: Trajectory


def learn(
    state: TrainState, traj: Trajectory, train_step: TrainStep, config: TrainConfig
) -> tuple[TrainState, dict[str, float]]:
    """The loop's body after collecting: calibrates standardised heads on a fresh state's
    first trajectory, then one ``train_step``; returns the state and float metrics."""
    if config.head_input_norm and int(state.step) == 0:
        state = calibrate_heads(state, traj.obs, traj.valid)
    state, metrics = train_step(state, jax.tree.map(jnp.asarray, traj))
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_loop(
    rollout: Rollout,
    state: TrainState,
    train_step: TrainStep,
    num_updates: int,
    *,
    start: int = 0,
    on_update: Callable[[LoopRecord, TrainState], Any] | None = None,
    before_train: Callable[[int], Any] | None = None,
    stop: Callable[[int], bool] | None = None,
) -> TrainState:
    """Runs updates ``start + 1 .. num_updates``: collect with ``rollout``, ``learn``, then
    ``on_update(record, state)`` (logging, evaluation, checkpoints).

    before_train(update): called between collecting and learning (e.g. fault injection).
    stop(update): called after ``on_update``; True ends the loop there (a time budget).
    """
    config = rollout.train_config
    for update in range(start, num_updates):
        t0 = time.perf_counter()
        state, traj = rollout.collect(state)
        t1 = time.perf_counter()
        if before_train is not None:
            before_train(update + 1)
        state, metrics = learn(state, rollout.to_device(traj), train_step, config)
        t2 = time.perf_counter()
        if on_update is not None:
            on_update(LoopRecord(update + 1, metrics, t1 - t0, t2 - t1, traj), state)
        if stop is not None and stop(update + 1):
            break
    return state
