"""Every environment through the launcher: two short updates on the tiny model for each env
preset and a bare gymnasium id, with updates shorter than an episode (so the first records
have no finished episode to report); the one-line refusal of a non-text environment; and
the learning-curve plot (smoothing, references, y-range)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import gymnasium
import numpy as np
import pytest

import rllama_jax.envs  # noqa: F401  (registers the rllama/ ids)
from rllama_jax.experiment import ExperimentConfig, run_experiment
from rllama_jax.experiment import run as run_module
from rllama_jax.experiment.build import check_env
from rllama_jax.experiment.config import ENV_PRESETS
from rllama_jax.experiment.metrics import (
    MetricsWriter,
    learning_curve_figure,
    moving_average,
    plot_learning_curve,
    read_records,
    smoothing_half_width,
)
from rllama_jax.models.loading import default_model_dir, load_tokenizer
from rllama_jax.tokenization import chat_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")

ENVS = [*ENV_PRESETS, "rllama/TMaze-v0"]  # every preset, and a registered id with no kwargs
EXTRAS = {"babyai-goto": "minigrid", "babyai-mixed": "minigrid", "textworld-easy": "textworld"}
# Episodes longer than one update of 2 turns: the first record has no finished episode.
LONG_EPISODES = {"tmaze", "rllama/TMaze-v0", "babyai-goto", "babyai-mixed", "textworld-easy"}

# Two updates of 2 envs x 2 turns, a 2-episode evaluation at the end; everything else is
# the launcher's default (PPO, score mode, frozen LLM with heads, feature cache).
TWO_UPDATES = dict(
    model="tiny", num_envs=2, steps_per_update=2, total_steps=8, epochs=1, minibatches=1,
    eval_every=0, eval_episodes=2, eval_envs=2, checkpoint_every=0,
)  # fmt: skip


def _strict_json(text: str):
    """json.loads that refuses NaN and infinities (which are not JSON)."""

    def refuse(name: str):
        raise ValueError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("env", ENVS)
def test_two_updates_through_the_launcher(env, tmp_path, monkeypatch):
    if env in EXTRAS:
        pytest.importorskip(EXTRAS[env])
    plotted = {}
    plot = run_module.plot_learning_curve

    def spy(workdir, **kwargs):
        plotted.update(kwargs)
        return plot(workdir, **kwargs)

    monkeypatch.setattr(run_module, "plot_learning_curve", spy)
    cfg = ExperimentConfig(env=env, workdir=str(tmp_path), **TWO_UPDATES)
    check_env(cfg)  # a text env: no complaint
    lines: list[str] = []
    result = run_experiment(cfg, progress=False, log=lines.append)

    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        records = [_strict_json(line) for line in f]
    assert [r["update"] for r in records] == [1, 2]
    assert [r["env_steps"] for r in records] == [4, 8]
    for r in records:
        # null exactly while no episode has finished; every value present is finite.
        assert (r["train_return"] is None) == (r["episodes"] == 0), r
        assert all(math.isfinite(v) for v in r.values() if v is not None), r
    if env in LONG_EPISODES:
        assert records[0]["episodes"] == 0 and records[0]["train_return"] is None
    assert math.isfinite(records[1]["eval_return"])  # the final evaluation finished

    summary = _strict_json((tmp_path / "summary.json").read_text())
    assert summary["updates"] == 2 and summary["env_steps"] == 8
    if result.episodes == 0:
        assert summary["train_return"] is None
        assert "no training episode finished" in lines[-1]
    assert (tmp_path / "learning_curve.png").stat().st_size > 0
    assert plotted["references"] == cfg.preset.references


@pytest.mark.parametrize(
    "env, episodes", [(e, 100 if e.startswith("babyai") else 30) for e in ENV_PRESETS]
)
def test_preset_widths_hold_random_play(env, episodes):
    """Prompts and candidate lists of random play fit the preset's fixed widths (a longer
    one stops a run mid-way); the widths are what the launcher compiles for."""
    if env in EXTRAS:
        pytest.importorskip(EXTRAS[env])
    cfg = ExperimentConfig(env=env)
    tokenizer = load_tokenizer(default_model_dir())
    game = gymnasium.make(cfg.preset.env_id, **dict(cfg.preset.kwargs))
    system = game.unwrapped.system_prompt
    rng = np.random.default_rng(0)
    prompt = actions = candidate = 0
    for episode in range(episodes):
        observation, info = game.reset(seed=episode)
        done = False
        while True:
            conversation = [{"role": "system", "content": system},
                            {"role": "user", "content": observation}]  # fmt: skip
            row = chat_token_ids(tokenizer, [conversation], add_generation_prompt=True)[0]
            prompt = max(prompt, len(row))
            actions = max(actions, len(info["candidates"]))
            ids = tokenizer(info["candidates"], add_special_tokens=False)["input_ids"]
            candidate = max([candidate, *map(len, ids)])
            if done:
                break
            action = int(rng.integers(len(info["candidates"])))
            observation, _, terminated, truncated, info = game.step(action)
            done = terminated or truncated
    game.close()
    assert prompt <= cfg.effective_prompt_len
    assert actions <= cfg.effective_max_actions
    assert candidate <= cfg.effective_candidate_len


# ---------------------------------------------------------------------- non-text envs
@pytest.mark.parametrize("env, kind", [("CartPole-v1", "numpy.ndarray"), ("Blackjack-v1", "tuple")])
def test_a_non_text_env_is_refused_in_one_line(env, kind):
    with pytest.raises(ValueError) as err:
        check_env(ExperimentConfig(env=env, model="tiny"))
    message = str(err.value)
    assert "\n" not in message
    assert f"--env={env}" in message and f"observations are {kind}, not str" in message
    assert "rllama_jax.envs.base.TextEnv" in message and "format_observation" in message


def test_an_unknown_env_id_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"--env=NoSuchEnv-v0: .*doesn't exist"):
        check_env(ExperimentConfig(env="NoSuchEnv-v0"))


def test_the_script_stops_a_non_text_env_before_loading_anything(tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, TRAIN, "--env=CartPole-v1", "--model=tiny", f"--workdir={workdir}",
         "--compilation_cache="],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # one line, nothing else
    last = lines[-1]
    assert last.startswith("error: --env=CartPole-v1: the launcher trains on text environments")
    assert "numpy.ndarray" in last and "rllama_jax.envs.base.TextEnv" in last
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()  # nothing was created


# ---------------------------------------------------------------------- metrics and plot
def test_a_metric_with_nothing_to_report_is_written_as_null(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write({"update": 1, "env_steps": 4, "train_return": None, "loss": np.float32(0.5),
                  "episodes": np.int64(0), "kl": float("nan")})  # fmt: skip
    writer.close()
    (record,) = read_records(str(tmp_path))
    assert record == {"update": 1, "env_steps": 4, "train_return": None, "loss": 0.5,
                      "episodes": 0, "kl": None}  # fmt: skip


def test_moving_average_is_centred_and_cut_short_at_the_ends():
    values = [1.0, 2.0, 4.0, 8.0, 16.0]
    np.testing.assert_allclose(moving_average(values, 0), values)
    np.testing.assert_allclose(moving_average(values, 1), [1.5, 7 / 3, 14 / 3, 28 / 3, 12.0])
    np.testing.assert_allclose(moving_average(values, 2), [7 / 3, 15 / 4, 31 / 5, 30 / 4, 28 / 3])
    assert moving_average([], 3).shape == (0,)


def _fake_records(n: int, evals: int) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        r = {"update": i + 1, "env_steps": 512 * (i + 1),
             "train_return": -0.07 - 0.33 * math.exp(-5 * i / n) + rng.normal(0, 0.1)}  # fmt: skip
        if (i + 1) % (n // evals) == 0:
            r["eval_return"], r["eval_return_se"] = r["train_return"], 0.06
        records.append(r)
    return records


def test_learning_curve_draws_smoothed_train_return_evals_and_references():
    records = _fake_records(1000, 16)
    references = ENV_PRESETS["blackjack"].references
    fig = learning_curve_figure(records, title="blackjack", references=references)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any("raw" in s for s in labels) and any("moving average over" in s for s in labels)
    smoothed = next(line for line in ax.get_lines() if "moving average" in line.get_label())
    raw = np.asarray([r["train_return"] for r in records])
    np.testing.assert_allclose(
        smoothed.get_ydata(), moving_average(raw, smoothing_half_width(1000))
    )
    assert np.std(np.diff(smoothed.get_ydata())) < 0.2 * np.std(np.diff(raw))
    texts = {t.get_text() for t in ax.texts}
    for name, value in references:
        assert f"{name} {value:+g}" in texts
    ref_ys = sorted(
        line.get_ydata()[0] for line in ax.get_lines() if line.get_label() == "_reference"
    )
    assert ref_ys == sorted(v for _, v in references)
    lo, hi = ax.get_ylim()
    assert lo <= min(raw.min(), -0.40) and hi >= raw.max()
    assert ax.get_xlabel() == "environment steps" and ax.get_title() == "blackjack"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("greedy evaluation" in s and "standard error" in s for s in legend)


def test_references_far_from_the_data_widen_the_y_range(tmp_path):
    records = [{"update": i + 1, "env_steps": 8 * (i + 1), "train_return": 0.1 * i}
               for i in range(5)]  # fmt: skip
    fig = learning_curve_figure(records, references=(("optimal", 1.0), ("chance", -0.5)))
    lo, hi = fig.axes[0].get_ylim()
    assert lo < -0.5 and hi > 1.0


def test_plot_learning_curve_keeps_its_old_signature(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
        for r in _fake_records(40, 4):
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"update": 41, "env_steps": 41 * 512, "train_return": None}) + "\n")
    out = plot_learning_curve(str(tmp_path), None, "no references")
    assert out == str(tmp_path / "learning_curve.png") and os.path.getsize(out) > 0
    assert plot_learning_curve(str(tmp_path), out=str(tmp_path / "other.png")).endswith("other.png")


def test_textworld_preset_parses_the_command_its_prompt_asks_for():
    from rllama_jax.experiment.config import ENV_PRESETS

    parse = ENV_PRESETS["textworld-easy"].extract_action
    assert parse("I should look around.\nCommand: open the box.\n") == "open the box"
    assert parse("take key") == "take key"  # no "command:": the first line, matched as is
    assert parse("go north!\nthen east") == "go north"
