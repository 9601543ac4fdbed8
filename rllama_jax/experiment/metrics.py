"""Run metrics: JSON lines, TensorBoard event files, optional Weights & Biases, and plots.

Every record is a flat dict of numbers with an ``update`` counter and an ``env_steps``
counter; ``metrics.jsonl`` in the workdir is the source of truth (plots and the ablation
tables read it). On resume, records after the restored update are dropped first, so a
killed run's lost updates are not counted twice.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

JSONL = "metrics.jsonl"


def read_records(workdir: str) -> list[dict[str, Any]]:
    """All records of a run, in order (an empty list if it has none yet)."""
    path = os.path.join(workdir, JSONL)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: everything after it is lost too
    return records


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and TensorBoard (and W&B when a project is given).

    ``resume_from``: the update the run restarts at; later records are removed first.
    """

    def __init__(
        self,
        workdir: str,
        *,
        resume_from: int | None = None,
        wandb_project: str = "",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.path = os.path.join(workdir, JSONL)
        if resume_from is not None:
            kept = [r for r in read_records(workdir) if r.get("update", 0) <= resume_from]
        else:
            kept = []
        with open(self.path, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError(
                    "--wandb_project needs the wandb package: pip install wandb"
                ) from err
            self._wandb = wandb.init(
                project=wandb_project, dir=workdir, config=run_config, resume="allow",
                id=os.path.basename(os.path.abspath(workdir)),
            )  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _number(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(clean.get("env_steps", clean.get("update", 0)))
        for key, value in clean.items():
            if key not in ("update", "env_steps") and value is not None:
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _number(value: Any) -> float | int | None:
    value = float(value) if not isinstance(value, int) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def plot_learning_curve(workdir: str, out: str | None = None, title: str = "") -> str:
    """Training return (running mean) and greedy evaluation return against environment
    steps, from ``metrics.jsonl``, as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(workdir)
    out = out or os.path.join(workdir, "learning_curve.png")
    train = [(r["env_steps"], r["train_return"]) for r in records
             if r.get("train_return") is not None]  # fmt: skip
    evals = [(r["env_steps"], r["eval_return"], r.get("eval_return_se") or 0.0)
             for r in records if r.get("eval_return") is not None]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if train:
        xs, ys = zip(*train, strict=True)
        ax.plot(xs, ys, label="train return (last 100 episodes)", color="tab:blue")
    if evals:
        xs, ys, se = zip(*evals, strict=True)
        ax.errorbar(xs, ys, yerr=se, fmt="o-", label="greedy eval return", color="tab:orange",
                    capsize=3)  # fmt: skip
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
