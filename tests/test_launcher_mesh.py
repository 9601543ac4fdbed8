"""The launcher on a device mesh: ``--mesh`` (4 emulated CPU devices, one process) ends with
the parameters of the same run on one device for PPO (LoRA, working memory) and DQN (full
fine-tuning, episodic memory, replay), and so does ``--mesh --distributed`` (2 processes x
2 devices on localhost, ``jax.distributed`` over gloo) for PPO; a checkpoint restores onto
another mesh and another number of processes; bad mesh settings stop in one line before
anything is written.

The device-count flag must be set before JAX starts, so the mesh runs are launcher
subprocesses (``experiments/train.py``, the command a user runs); the one-device reference
runs in this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from rllama_jax.experiment import ExperimentConfig, load_run, run_experiment
from rllama_jax.experiment.run import RunError
from tests.conftest import ROOT, TRAIN, launcher_flags

# Two updates of 8 environments x 4 turns; every evaluation at the end.
RUNS = {
    "ppo": dict(
        model="tiny", env="tmaze", algo="ppo", memory="working", trainable="lora",
        num_envs=8, steps_per_update=4, total_steps=64, epochs=2, minibatches=2,
        learning_rate=1e-3, eval_every=0, eval_episodes=8, eval_envs=8, checkpoint_every=1,
    ),
    "dqn": dict(
        model="tiny", env="blackjack", algo="dqn", memory="episodic", trainable="full",
        num_envs=8, steps_per_update=4, total_steps=64, replay_capacity=64, replay_batch=16,
        learning_rate=1e-3, eval_every=0, eval_episodes=8, eval_envs=8, checkpoint_every=1,
    ),
}  # fmt: skip
MESH = "data:2,fsdp:2"
# The two-process run (the costliest) for PPO only: DQN's sharded step differs from PPO's in
# the replay buffer, which the 4-device run already checks.
PROCESSES = {"ppo": 2, "dqn": 0}


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        # Low LLVM optimisation: these runs compare numbers, not speed (~2x faster compiles).
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        PYTHONPATH=ROOT,
        **extra,
    )
    return env


def _launch(flags: list[str], devices: int, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, TRAIN, "--progress=false", "--compilation_cache=", *flags],
        env=_env(devices, **extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """``run_of(algo)``: the same run three ways, made once per module: one device (here), a
    4-device mesh, and 2 processes x 2 devices where ``PROCESSES`` asks for it."""
    made: dict[str, dict] = {}

    def get(algo: str) -> dict:
        if algo not in made:
            made[algo] = _three_ways(algo, tmp_path_factory)
        return made[algo]

    return get


def _three_ways(algo: str, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp(algo)
    settings = RUNS[algo]
    flags = launcher_flags(**settings)
    mesh = _launch([*flags, f"--mesh={MESH}", f"--workdir={base / 'mesh'}"], devices=4)
    port = _free_port()
    procs = [
        _launch(
            [*flags, f"--mesh={MESH}", "--distributed", f"--workdir={base / 'procs'}"],
            devices=2,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )  # fmt: skip
        for i in range(PROCESSES[algo])
    ]
    one = run_experiment(
        ExperimentConfig(**settings, workdir=str(base / "one")), progress=False,
        log=lambda *_: None,
    )  # fmt: skip
    logs = {"mesh": _finish(mesh), "procs": [_finish(p) for p in procs]}
    return {"algo": algo, "base": base, "one": one, "logs": logs}


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y), initial=0.0)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("algo, how", [("ppo", "mesh"), ("ppo", "procs"), ("dqn", "mesh")])
def test_mesh_run_ends_with_the_one_device_parameters(run_of, algo, how):
    """Same trajectories (the sampling noise depends on the global row, not the device),
    so the same updates up to float32 summation order: 1e-5 on parameters and optimizer
    state that moved by more than 1e-3, and the same greedy evaluation."""
    runs = run_of(algo)
    _, _, _, _, ref = load_run(str(runs["base"] / "one"))
    _, _, _, _, got = load_run(str(runs["base"] / how))
    params_ref, params_got = _leaves(ref.trainable), _leaves(got.trainable)
    _, _, _, _, start = load_run(str(runs["base"] / "one"), step=1)
    moved = _max_diff(params_ref, _leaves(start.trainable))
    assert moved > 1e-3, moved  # the second update really changed the parameters
    assert _max_diff(params_ref, params_got) <= 1e-5
    assert _max_diff(_leaves(ref.opt_state), _leaves(got.opt_state)) <= 1e-5
    assert int(got.step) == int(ref.step)
    if ref.memory.episodic is not None:  # DQN wrote the same turns to episodic memory
        assert _max_diff(_leaves(ref.memory.episodic), _leaves(got.memory.episodic)) <= 1e-5
    import json

    with open(runs["base"] / how / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["env_steps"] == runs["one"].env_steps
    assert summary["episodes"] == runs["one"].episodes
    assert summary["eval_return"] == pytest.approx(runs["one"].eval_return, abs=1e-9)


def test_two_processes_each_step_half_and_one_writes(run_of):
    """Process 0 prints the summary table; process 1 prints nothing of it."""
    lead, other = run_of("ppo")["logs"]["procs"]
    assert "greedy eval return" in lead
    assert "greedy eval return" not in other


@pytest.mark.parametrize("algo, source", [("ppo", "procs"), ("dqn", "mesh")])
def test_resume_on_another_mesh(run_of, algo, source, tmp_path):
    """A mesh run's checkpoint resumed in one process on one device with a larger budget
    (PPO: the 2-process run's, whose environments were saved per process: they start fresh
    episodes, with one warning saying why; DQN: the 4-device run's, environments and all)."""
    import shutil

    work = tmp_path / "resumed"
    shutil.copytree(run_of(algo)["base"] / source, work)
    settings = dict(RUNS[algo], total_steps=96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_experiment(
            ExperimentConfig(**settings, workdir=str(work)), progress=False, log=lambda *_: None
        )
    assert result.updates == 3
    fresh = any("written by 2 process(es)" in str(w.message) for w in caught)
    assert fresh == (source == "procs")


def test_bad_mesh_stops_in_one_line_before_writing(tmp_path):
    work = tmp_path / "bad"
    cfg = ExperimentConfig(**RUNS["ppo"], mesh="data:3", workdir=str(work))
    with pytest.raises(RunError, match=r"--mesh=data:3: .*asks for .*3 devices, but there are 1"):
        run_experiment(cfg, progress=False, log=lambda *_: None)
    assert not work.exists()
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        ExperimentConfig(mesh="model:2").validate()
    with pytest.raises(ValueError, match="--distributed needs --mesh"):
        ExperimentConfig(distributed=True).validate()


def test_rows_that_do_not_split_are_refused(tmp_path):
    proc = _launch(
        [*launcher_flags(**RUNS["ppo"]), "--num_envs=6", "--mesh=data:4",
         f"--workdir={tmp_path / 'w'}"],
        devices=4,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: --mesh=data:4: --num_envs=6 does not split"), out[-2000:]
    assert not (tmp_path / "w").exists()
