"""Ablation grids: named presets of (environment x setting x seed) runs, run one after the
other, resumable, summarised as a CSV, a Markdown table (mean ± std over seeds) and plots.

Each cell is an ordinary run of ``run_experiment`` in ``<out>/runs/<cell>``: a finished cell
(its ``summary.json`` exists) is skipped, an interrupted one resumes from its checkpoint, so
re-running the same command after a crash continues the grid.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from rllama_jax.experiment.config import ExperimentConfig
from rllama_jax.experiment.metrics import read_records
from rllama_jax.experiment.run import run_experiment


@dataclasses.dataclass(frozen=True)
class Preset:
    """base: settings shared by every cell; envs: env name -> its own overrides; settings:
    label -> overrides (the ablated axis); seeds: seeds per (env, setting)."""

    description: str
    base: dict[str, Any]
    envs: dict[str, dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]


_TINY = dict(model="tiny", trainable="full", learning_rate=1e-3, head_learning_rate=3e-3,
             checkpoint_every=8, eval_every=8, eval_episodes=200, eval_envs=40)  # fmt: skip

PRESETS: dict[str, Preset] = {
    "memory": Preset(
        "Memory setting x memory probe (PPO, score mode, random tiny Llama trained in full).",
        base=dict(_TINY, algo="ppo", gamma=0.95, num_envs=16, steps_per_update=8),
        envs={
            "tmaze": dict(env="tmaze", total_steps=4096),
            "tmaze-long": dict(env="tmaze-long", total_steps=8192, working_window=10),
            "bandit": dict(env="bandit", total_steps=4096, steps_per_update=4),
            # Retrieval for a world that changes: keys compared mean-centred (so the same
            # situation's entries come first) and recency weighted like similarity (so this
            # mapping's outcomes outrank the previous mapping's successes still in memory).
            "bandit-shifting": dict(
                env="bandit-shifting",
                total_steps=8192,
                steps_per_update=4,
                episodic_center=True,
                episodic_recency=1.0,
            ),  # fmt: skip
            "blackjack": dict(env="blackjack", total_steps=8192, gamma=1.0),
        },
        settings={
            "none": dict(memory="none"),
            "working": dict(memory="working"),
            "episodic": dict(memory="episodic"),
            "both": dict(memory="both"),
            # Episodic memory read as soft-prompt vectors (keys, actions and returns).
            "episodic-latent": dict(memory="episodic", memory_mode="latent"),
            # The baseline LlamaGym/BALROG agents use: the episode's last 10 turns as chat.
            "history": dict(memory="none", history=10, prompt_len=768),
        },
        seeds=(0, 1),
    ),
    "algorithms": Preset(
        "All six algorithms, score mode, random tiny Llama trained in full.",
        base=dict(_TINY, num_envs=32, steps_per_update=4, gamma=1.0),
        envs={
            "blackjack": dict(env="blackjack", total_steps=16384),
            "babyai-goto": dict(env="babyai-goto", total_steps=8192, gamma=0.95),
        },
        settings={
            "ppo": dict(algo="ppo"),
            "a2c": dict(algo="a2c"),
            "reinforce": dict(algo="reinforce"),
            "grpo": dict(algo="grpo", group_size=8),
            "dqn": dict(algo="dqn", trainable="heads", replay_batch=64),
            "sac": dict(algo="sac", trainable="heads", replay_batch=64),
        },
        seeds=(0, 1),
    ),
    "smoke": Preset(
        "Minutes on the tiny model: the whole pipeline (used in CI).",
        base=dict(
            model="tiny",
            env="blackjack",
            trainable="lora",
            num_envs=4,
            steps_per_update=2,
            total_steps=16,
            minibatches=2,
            eval_every=0,
            eval_episodes=8,
            eval_envs=4,
            checkpoint_every=2,
        ),  # fmt: skip
        envs={"blackjack": {}},
        settings={
            "ppo": dict(algo="ppo", epochs=1),
            "ppo+working": dict(algo="ppo", memory="working", epochs=1),
            "dqn": dict(algo="dqn", trainable="heads", replay_batch=8, replay_capacity=64),
        },
        seeds=(0,),
    ),
}

FIELDS = ("env", "setting", "seed", "eval_return", "eval_return_se", "train_return",
          "env_steps", "episodes", "seconds", "workdir")  # fmt: skip


def cells(preset: Preset, seeds: tuple[int, ...] | None = None):
    """``(env, setting, seed, ExperimentConfig)`` of every cell, validated."""
    out = []
    for env, env_over in preset.envs.items():
        for setting, over in preset.settings.items():
            for seed in seeds or preset.seeds:
                cfg = ExperimentConfig(**{**preset.base, **env_over, **over, "seed": seed})
                cfg.validate()
                out.append((env, setting, seed, cfg))
    return out


def run_preset(
    name: str,
    out: str,
    *,
    seeds: tuple[int, ...] | None = None,
    overrides: dict[str, Any] | None = None,
    envs: tuple[str, ...] | None = None,
    settings: tuple[str, ...] | None = None,
    progress: bool = False,
    log: Any = print,
    report_only: bool = False,
) -> list[dict[str, Any]]:
    """Runs (or resumes) every cell of preset ``name`` under ``out``; returns the rows.

    envs: only these of the preset's environments (default: all).
    settings: only these of the preset's settings (default: all).
    report_only: run nothing; summarise the cells already finished under ``out``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    unknown = sorted(set(envs or ()) - set(PRESETS[name].envs))
    if unknown:
        raise ValueError(f"preset {name!r} has no environments {unknown}")
    unknown = sorted(set(settings or ()) - set(PRESETS[name].settings))
    if unknown:
        raise ValueError(f"preset {name!r} has no settings {unknown}")
    grid = [
        c
        for c in cells(PRESETS[name], seeds)
        if (not envs or c[0] in envs) and (not settings or c[1] in settings)
    ]
    if overrides:
        grid = [(e, s, seed, c.replace(**overrides)) for e, s, seed, c in grid]
        for *_, c in grid:
            c.validate()
    rows = []
    for i, (env, setting, seed, cfg) in enumerate(grid):
        workdir = os.path.join(out, "runs", f"{env}-{setting}-s{seed}")
        cfg = cfg.replace(workdir=workdir)
        summary_path = os.path.join(workdir, "summary.json")
        if not os.path.exists(summary_path):
            if report_only:
                log(f"[{i + 1}/{len(grid)}] {env} / {setting} / seed {seed}: not run, left out")
                continue
            log(f"[{i + 1}/{len(grid)}] {env} / {setting} / seed {seed}")
            run_experiment(cfg, progress=progress, log=lambda *_: None)
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        rows.append({"env": env, "setting": setting, "seed": seed,
                     **{k: summary[k] for k in FIELDS if k in summary}})  # fmt: skip
    if not rows:
        raise ValueError(f"no finished cell of preset {name!r} under {out}")
    if jax.process_index() == 0:  # a multi-host grid: one writer
        write_reports(name, rows, out)
    return rows


def write_reports(name: str, rows: list[dict[str, Any]], out: str) -> None:
    """``results.csv``, ``results.md`` (mean ± std over seeds) and one PNG per environment."""
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in FIELDS})
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["env"], row["setting"])].append(row)
    lines = [
        f"## Preset `{name}`: {PRESETS[name].description}",
        "",
        "| env | setting | greedy eval return | final train return | seeds | env steps |",
        "|---|---|---|---|---|---|",
    ]
    for (env, setting), rs in groups.items():
        ev = np.asarray([r["eval_return"] for r in rs], float)
        tr = np.asarray([r["train_return"] for r in rs], float)
        std = lambda x: np.std(x, ddof=1) if len(x) > 1 else 0.0  # noqa: E731
        lines.append(
            f"| {env} | {setting} | {ev.mean():+.3f} ± {std(ev):.3f} | "
            f"{tr.mean():+.3f} ± {std(tr):.3f} | {len(rs)} | {rs[0]['env_steps']} |"
        )
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, out)


def _plot(rows: list[dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for env in dict.fromkeys(r["env"] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        by_setting: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        for r in rows:
            if r["env"] != env:
                continue
            recs = [x for x in read_records(r["workdir"]) if x.get("train_return") is not None]
            by_setting[r["setting"]].append(
                (np.asarray([x["env_steps"] for x in recs]),
                 np.asarray([x["train_return"] for x in recs]))
            )  # fmt: skip
        for setting, curves in by_setting.items():
            n = min(len(c[0]) for c in curves)
            if n == 0:
                continue
            ys = np.stack([c[1][:n] for c in curves])
            ax.plot(curves[0][0][:n], ys.mean(0), label=f"{setting} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(curves[0][0][:n], ys.min(0), ys.max(0), alpha=0.2)
        ax.set_title(env)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("train return (last 100 episodes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"curves_{env}.png"))
        plt.close(fig)
