"""What a new user meets first: one name for one model everywhere, a loaded model that
several agents share, a run that survives a corrupted checkpoint, a wrong --model that
costs one line and leaves nothing behind, and a warning when a policy never explores."""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys

import gymnasium as gym
import jax
import numpy as np
import pytest

from rllama_jax import RLlamaAgent
from rllama_jax.experiment import ExperimentConfig, run_experiment
from rllama_jax.experiment.build import load_model
from rllama_jax.experiment.checkpoint import saved_steps
from rllama_jax.experiment.metrics import read_records
from rllama_jax.experiment.run import check_resumable
from rllama_jax.models import init_params, load_pretrained
from rllama_jax.models.loading import tiny_model_config
from rllama_jax.rollout import ExplorationCheck
from tests.conftest import SMALL_RUN as SMALL
from tests.conftest import TRAIN, launcher_flags


def _launch(tmp_path, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, TRAIN, *launcher_flags(**kw), "--progress=false", "--compilation_cache="]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)


class Blackjack(RLlamaAgent):
    def get_system_prompt(self) -> str:
        return "You are an expert blackjack player. Answer with stay or hit."

    def format_observation(self, observation) -> str:
        return f"Current hand total: {observation[0]}\nDealer's card: {observation[1]}"

    def extract_action(self, response: str):
        return 0 if "stay" in response.lower() else 1


class ScoringBlackjack(Blackjack):
    def candidate_actions(self, observation) -> list[str]:
        return ["stay", "hit"]


def _play(agent: RLlamaAgent, episodes: int) -> list[dict]:
    env = gym.make("Blackjack-v1")
    out = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        done = False
        while not done:
            observation, reward, term, trunc, _ = env.step(agent.act(observation))
            agent.assign_reward(reward)
            done = term or trunc
        out.append(agent.terminate_episode())
    return [m for m in out if m]


# ---------------------------------------------------------------------- one name, one model
def test_tiny_means_the_same_model_everywhere():
    config, params, tok = load_pretrained("tiny", seed=3)
    assert config == tiny_model_config(len(tok))
    expected = init_params(config, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The launcher's --model=tiny is that model.
    l_config, l_params, _ = load_model("tiny", 3)
    assert l_config == config
    for a, b in zip(jax.tree.leaves(l_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And so is the agent's model="tiny".
    agent = ScoringBlackjack(model="tiny", seed=3, batch_size=2)
    assert agent.model_config == config
    assert agent.act((15, 10, False)) in (0, 1)


def test_an_unknown_model_name_is_one_clear_error():
    with pytest.raises(FileNotFoundError, match=r"model '/nonexistent/dir' is not"):
        load_pretrained("/nonexistent/dir")


# ---------------------------------------------------------------------- the caller's model
@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_two_agents_train_on_one_loaded_model(trainable):
    model = load_pretrained("tiny")
    before = jax.tree.map(np.asarray, model.params)
    kw = dict(batch_size=2, trainable=trainable, lora_rank=2)
    first = ScoringBlackjack(model, algorithm="ppo", epochs=1, **kw)
    assert _play(first, 4)
    second = ScoringBlackjack(model, algorithm="a2c", **kw)  # the same arrays, after a step
    updates = _play(second, 4)
    assert updates and all(np.isfinite(u["loss"]) for u in updates)
    # The caller's arrays are alive and unchanged.
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "w")
    run_experiment(ExperimentConfig(**SMALL, workdir=workdir), progress=False, log=lambda *_: 0)
    return workdir


def _corrupt(workdir: str, step: int) -> None:
    """Overwrites the largest data file of a checkpoint with random bytes of its size."""
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                      recursive=True)  # fmt: skip
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.write(np.random.default_rng(0).bytes(size))


def _copy(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_falls_back_to_the_newest_readable_checkpoint(finished_run, tmp_path):
    workdir = _copy(finished_run, str(tmp_path / "w"))
    assert saved_steps(workdir) == [3, 4]
    _corrupt(workdir, 4)
    proc = _launch(tmp_path, **{**SMALL, "total_steps": 96, "workdir": workdir})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and "update 4" in warnings[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert "resuming" in proc.stdout and "at update 3" in proc.stdout
    # Updates 4.. were trained again from update 3; the unreadable one is kept aside.
    assert [r["update"] for r in read_records(workdir)] == [1, 2, 3, 4, 5, 6]
    assert saved_steps(workdir) == [5, 6]
    assert os.listdir(os.path.join(workdir, "unreadable_checkpoints")) == ["4"]


def test_no_readable_checkpoint_is_one_line(finished_run, tmp_path):
    workdir = _copy(finished_run, str(tmp_path / "w"))
    for step in saved_steps(workdir):
        _corrupt(workdir, step)
    proc = _launch(tmp_path, **{**SMALL, "total_steps": 96, "workdir": workdir})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint" in errors[0] and "can be read" in errors[0]
    assert saved_steps(workdir) == [3, 4]  # nothing saved is lost


# ---------------------------------------------------------------------- first mistakes
def test_unknown_model_path_is_one_line_and_leaves_no_workdir(tmp_path):
    workdir = tmp_path / "w"
    proc = _launch(tmp_path, model="/nonexistent/dir", workdir=workdir, total_steps=64)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --model=/nonexistent/dir") and len(lines) == 1, lines
    assert not workdir.exists()


def test_a_workdir_with_nothing_trained_is_reused(tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    ExperimentConfig(**SMALL, workdir=workdir).save(workdir)  # e.g. left by a failed start
    # A2C takes one pass per batch: SMALL's --epochs (a PPO option) does not apply to it.
    a2c = {k: v for k, v in SMALL.items() if k != "epochs"}
    other = ExperimentConfig(**{**a2c, "algo": "a2c", "total_steps": 16}, workdir=workdir)
    assert not check_resumable(other)  # no checkpoint: nothing to resume, nothing to refuse
    run_experiment(other, progress=False, log=lambda *_: 0)
    assert ExperimentConfig.load(workdir).algo == "a2c"
    assert [r["update"] for r in read_records(workdir)] == [1]


# ---------------------------------------------------------------------- exploration
def test_exploration_check_counts_the_first_window_only():
    check = ExplorationCheck(window=8, threshold=0.99)
    assert check.observe([1] * 7, ["Hit."] * 7) is None  # not enough replies yet
    message = check.observe([0, 1], ["stay", "Hit."])  # the 8th reply stays: 7 of 8 is no warning
    assert message is None and check.done
    check = ExplorationCheck(window=8, threshold=0.99)
    message = check.observe([1] * 8, ["I will hit."] * 8)
    assert "8 of its first 8 replies became action 1" in message
    assert "'I will hit.'" in message and "candidate_actions" in message
    assert check.observe([1] * 8, ["hit"] * 8) is None  # warned once
    check = ExplorationCheck(window=4)
    assert "unparseable" in check.observe([None] * 4, ["..."] * 4)


def test_agent_warns_when_every_reply_is_the_same_action(caplog):
    # A random model's replies never contain "stay": every reply becomes "hit" (1).
    agent = Blackjack(model="tiny", batch_size=64, max_new_tokens=2)
    with caplog.at_level(logging.WARNING, logger="rllama_jax"):
        env = gym.make("Blackjack-v1")
        observation, _ = env.reset(seed=0)
        for _ in range(64):
            agent.act(observation)
    warned = [r.getMessage() for r in caplog.records if "does not explore" in r.getMessage()]
    assert len(warned) == 1 and "action 1" in warned[0]


def test_launcher_warns_when_every_reply_is_the_same_action(tmp_path, caplog):
    cfg = ExperimentConfig(
        model="tiny", env="blackjack", action_mode="generate", trainable="lora", num_envs=16,
        steps_per_update=4, total_steps=64, epochs=1, minibatches=1, max_new_tokens=2,
        eval_episodes=4, eval_envs=4, workdir=str(tmp_path / "w"),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="rllama_jax"):
        run_experiment(cfg, progress=False, log=lambda *_: 0)
    warned = [r.getMessage() for r in caplog.records if "does not explore" in r.getMessage()]
    assert len(warned) == 1 and "action 1" in warned[0]


def test_processes_started_together_convert_the_default_model_once(tmp_path, monkeypatch):
    import threading
    import time

    from rllama_jax.models import loading

    monkeypatch.setenv("RLLAMA_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: "model.gguf")
    done, calls = set(), []

    def convert(gguf_path, out_dir):  # slow enough for every thread to arrive meanwhile
        calls.append(out_dir)
        time.sleep(0.3)
        done.add(out_dir)

    monkeypatch.setattr(loading, "convert_gguf_to_hf_dir", convert)
    monkeypatch.setattr(loading, "_cached_conversion_is_current", lambda d, g: d in done)
    threads = [threading.Thread(target=loading.default_model_dir) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_launcher_refuses_a_train_step_that_cannot_fit(tmp_path, monkeypatch):
    from rllama_jax.experiment import memory_check
    from rllama_jax.experiment.run import RunError

    monkeypatch.setattr(memory_check, "available_memory", lambda: 64 * 1024)  # 64 KiB free
    cfg = ExperimentConfig(**{**SMALL, "workdir": str(tmp_path / "w")})
    with pytest.raises(RunError, match=r"MiB is available: set --microbatch_rows.*--minibatches"):
        run_experiment(cfg, progress=False, log=lambda *_: 0)
    assert not saved_steps(cfg.workdir)  # refused before the first update
