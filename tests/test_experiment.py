"""The launcher: validation before compilation, checkpoint/resume exactness (a run killed
with SIGKILL and resumed ends with the same parameters as an uninterrupted one), metrics
bookkeeping across the kill, and the unbiased evaluator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from rllama_jax.experiment import ExperimentConfig, load_run, run_experiment
from rllama_jax.experiment.checkpoint import RunCheckpointer
from rllama_jax.experiment.metrics import read_records
from rllama_jax.experiment.run import check_resumable
from tests.conftest import SMALL_RUN as SMALL
from tests.conftest import TRAIN, launcher_flags


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(algo="dqn", action_mode="generate"), "needs --action_mode=score"),
        (dict(algo="sac", action_mode="generate"), "needs --action_mode=score"),
        (dict(trainable="heads", action_mode="generate"), "policy frozen"),
        (dict(num_envs=6, steps_per_update=1, minibatches=4), "not divisible"),
        (dict(algo="grpo", num_envs=12, group_size=8), "group_size"),
        (dict(memory="none", memory_mode="latent"), "needs a memory"),
        (dict(algo="dqn", replay_batch=128, replay_capacity=64), "exceeds"),
        (dict(env="nonsense"), "neither a preset"),
        (dict(gamma=0.0), "gamma"),
        (dict(total_steps=0), "total_steps"),
        (dict(episodic_control=2.0), "--episodic_control needs --memory=episodic"),
        (dict(memory="episodic", algo="dqn", episodic_control=2.0), "Q head"),
        (dict(memory="episodic", episodic_control=-1.0), "episodic_control must be >= 0"),
        # A flag the chosen algorithm does not take would silently do nothing.
        (dict(algo="a2c", epochs=1), r"--epochs=1 does not apply to --algo=a2c"),
        (dict(algo="ppo", group_size=4), r"--group_size=4 does not apply to --algo=ppo"),
        (dict(algo="sac", epsilon_start=0.5), "does not apply to --algo=sac"),
        (dict(algo="dqn", epsilon_end=1.5), "epsilon_end must be in"),
        (dict(memory="episodic", episodic_decay=0.0), "episodic_decay must be in"),
        (dict(memory="episodic", episodic_decay=1.5), "episodic_decay must be in"),
    ],
)
def test_invalid_combinations_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**changes).validate()


def test_episodic_decay_makes_the_newest_of_equally_similar_entries_win():
    """--episodic_decay reaches the memory: two entries with the same key and return,
    written at successive train steps, tie without decay and rank newest first with it
    (the non-stationary bandit's stale "lever A -> +1" lines lose to fresh ones)."""
    from rllama_jax.experiment.build import load_model, memory_config
    from rllama_jax.memory import episodic

    model_config, _, tokenizer = load_model("tiny")
    d = model_config.hidden_size
    key = np.ones((1, d), np.float32)

    def row(token: int):  # one +1 entry whose rendering is `token` repeated
        ones = np.ones((1,), np.float32)
        return key, np.full((1, 16), token, np.int32), np.ones((1, 16), bool), ones, ones > 0

    for decay, expected in ((1.0, 0.0), (0.5, 0.15)):
        cfg = ExperimentConfig(model="tiny", memory="episodic", episodic_decay=decay)
        mcfg = memory_config(cfg, model_config, tokenizer).episodic
        assert mcfg.decay == decay
        mem = episodic.write(episodic.init(mcfg), mcfg, *row(1))  # the stale entry
        mem = episodic.write(mem, mcfg, *row(2))  # the fresh one, one train step later
        got = episodic.retrieve(mem, mcfg, key)
        scores = np.asarray(got.scores[0])
        # 0.7 * cos + 0.3 * importance / max: 1.0 for the fresh entry, 1 - 0.3 * (1 - decay)
        # for the stale one.
        np.testing.assert_allclose(scores[0] - scores[1], expected, atol=1e-6)
        if decay < 1:
            assert int(got.tokens[0, 0, 0]) == 2


def test_every_algorithm_takes_the_default_flags():
    """Defaults are never refused: only a flag set away from its default for an algorithm
    without that option is (the launcher's flags serve every --algo)."""
    from rllama_jax.algos import ALGORITHMS

    for algo in ALGORITHMS:
        ExperimentConfig(algo=algo).validate()


def test_launcher_rejects_bad_flags_before_loading_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, TRAIN, "--algo=dqn", "--action_mode=generate",
         f"--workdir={tmp_path / 'w'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--algo=dqn needs --action_mode=score" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was created


def test_resume_refuses_a_different_experiment(tmp_path):
    cfg = ExperimentConfig(**SMALL, workdir=str(tmp_path))
    cfg.save(str(tmp_path))
    assert not check_resumable(cfg)  # nothing trained yet: any settings start afresh
    os.makedirs(tmp_path / "checkpoints" / "4")  # a finished checkpoint, as orbax names it
    assert check_resumable(cfg.replace(total_steps=128))  # longer: same experiment
    with pytest.raises(ValueError, match=r"algo: 'ppo' -> 'a2c'"):
        check_resumable(cfg.replace(algo="a2c"))
    assert ExperimentConfig.load(str(tmp_path)) == cfg  # the saved config is untouched


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path):
    straight = ExperimentConfig(**SMALL, workdir=str(tmp_path / "straight"))
    run_experiment(straight, progress=False, log=lambda *_: None)

    killed = straight.replace(workdir=str(tmp_path / "killed"))
    cmd = [sys.executable, TRAIN, *launcher_flags(**SMALL, workdir=killed.workdir),
           "--sigkill_at_update=3", "--progress=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert RunCheckpointer(killed.workdir).latest_step() == 2
    # Update 3 was lost with the process: its metrics are not in the log.
    assert [r["update"] for r in read_records(killed.workdir)] == [1, 2]

    run_experiment(killed, progress=False, log=lambda *_: None)

    a = load_run(straight.workdir)[-1]
    b = load_run(killed.workdir)[-1]
    leaves_a, tree_a = jax.tree.flatten(a.trainable)
    leaves_b, tree_b = jax.tree.flatten(b.trainable)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a.memory), jax.tree.leaves(b.memory), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The metric logs agree update by update (timings aside).
    ra, rb = read_records(straight.workdir), read_records(killed.workdir)
    assert [r["update"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb, strict=True):
        assert x["loss"] == y["loss"] and x["train_return"] == y["train_return"]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["updates"] == 4 and summary["env_steps"] == 64
    assert (tmp_path / "killed" / "learning_curve.png").stat().st_size > 1000
    assert os.listdir(tmp_path / "killed" / "tensorboard")


def test_smoke_ablation_writes_reports_and_resumes(tmp_path):
    from rllama_jax.experiment.ablation import PRESETS, run_preset

    out = str(tmp_path)
    rows = run_preset("smoke", out, log=lambda *_: None)
    preset = PRESETS["smoke"]
    assert len(rows) == len(preset.settings) * len(preset.seeds) * len(preset.envs)
    assert all(np.isfinite(r["eval_return"]) for r in rows)
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert lines[0].startswith("env,setting,seed,eval_return") and len(lines) == len(rows) + 1
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {s} |" in table for s in preset.settings)
    assert (tmp_path / "curves_blackjack.png").stat().st_size > 1000
    # A second invocation finds every cell finished and only rewrites the reports.
    logged = []
    assert run_preset("smoke", out, log=logged.append) == rows
    assert logged == []
    # report_only leaves unfinished cells out instead of running them; with none, it says so.
    os.remove(os.path.join(rows[0]["workdir"], "summary.json"))
    logged = []
    assert run_preset("smoke", out, log=logged.append, report_only=True) == rows[1:]
    assert len(logged) == 1 and "not run" in logged[0]
    assert f"| {rows[0]['setting']} |" not in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="no finished cell"):
        run_preset("smoke", str(tmp_path / "empty"), log=lambda *_: None, report_only=True)
    # --settings keeps only the named settings' cells; an unknown one is refused by name.
    only = run_preset("smoke", out, log=lambda *_: None, report_only=True, settings=("dqn",))
    assert [r["setting"] for r in only] == ["dqn"] * len(preset.seeds)
    with pytest.raises(ValueError, match=r"no settings \['nope'\]"):
        run_preset("smoke", out, log=lambda *_: None, settings=("nope",))


def test_max_minutes_stops_after_the_update_that_spends_it_and_resume_goes_on(tmp_path):
    """A budget too small for one update stops after update 1 of 4 with what a finished
    run leaves (evaluation, checkpoint, summary); resuming without it trains to the end."""
    cfg = ExperimentConfig(**SMALL, workdir=str(tmp_path), max_minutes=1e-6)
    logged: list[str] = []
    result = run_experiment(cfg, progress=False, log=logged.append)
    assert result.updates == 1 and result.env_steps == 16
    assert any("stopped by --max_minutes" in line for line in logged)
    assert [r["update"] for r in read_records(cfg.workdir)] == [1]
    assert "eval_return" in read_records(cfg.workdir)[0]
    assert RunCheckpointer(cfg.workdir).latest_step() == 1
    assert json.loads((tmp_path / "summary.json").read_text())["updates"] == 1
    result = run_experiment(cfg.replace(max_minutes=0.0), progress=False, log=lambda *_: None)
    assert result.updates == 4 and result.env_steps == 64
    with pytest.raises(ValueError, match="max_minutes must be >= 0"):
        cfg.replace(max_minutes=-1.0).validate()


def test_bf16_precision_keeps_float32_masters_and_resumes_with_its_dtypes(tmp_path):
    """--precision=bf16: the frozen LLM is stored in bfloat16, the trained adapters, heads
    and optimizer state in float32, the run trains (parameters move, metrics finite), and
    its checkpoint restores into the same dtypes."""
    cfg = ExperimentConfig(**{**SMALL, "total_steps": 32}, workdir=str(tmp_path),
                           precision="bf16")  # fmt: skip
    run_experiment(cfg, progress=False, log=lambda *_: None)
    _, model_config, _, _, state = load_run(cfg.workdir)
    assert model_config.dtype == "bfloat16"
    frozen = {x.dtype for x in jax.tree.leaves(state.frozen) if hasattr(x, "dtype")}
    trained = {x.dtype for x in jax.tree.leaves((state.trainable, state.opt_state))
               if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating)}  # fmt: skip
    assert frozen == {np.dtype(jax.numpy.bfloat16)} and trained == {np.dtype(np.float32)}
    assert all(np.isfinite(r["loss"]) for r in read_records(cfg.workdir))
    assert int(state.skipped) == 0 and int(state.step) > 0
    first = load_run(cfg.workdir, step=1)[-1]  # the checkpoint after update 1 of 2
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(first.trainable),
                               jax.tree.leaves(state.trainable), strict=True))  # fmt: skip
    with pytest.raises(ValueError, match="precision"):
        cfg.replace(precision="fp16").validate()


def test_history_baseline_through_the_launcher_and_its_checkpoint(tmp_path):
    """--history=2 trains through the launcher (prompts sized by --prompt_len), and the
    rollout's per-env histories are part of the checkpoint (a resume continues them)."""
    from rllama_jax.experiment.checkpoint import RunCheckpointer

    # 2 updates of 3 turns: 6 turns into 4-turn T-maze episodes, mid-episode at the end.
    cfg = ExperimentConfig(**{**SMALL, "memory": "none", "total_steps": 24,
                              "steps_per_update": 3},
                           workdir=str(tmp_path), history=2, prompt_len=256)  # fmt: skip
    result = run_experiment(cfg, progress=False, log=lambda *_: None)
    assert result.updates == 2 and np.isfinite(read_records(cfg.workdir)[-1]["loss"])
    _, host = RunCheckpointer(cfg.workdir).restore(load_run(cfg.workdir)[-1])
    from rllama_jax.experiment.checkpoint import _decode

    histories = _decode(host["rollout"]["fields"])["histories"]
    assert len(histories) == SMALL["num_envs"] and all(len(h) <= 2 for h in histories)
    assert all(len(h) == 2 for h in histories)
    with pytest.raises(ValueError, match="history must be >= 0"):
        cfg.replace(history=-1).validate()
