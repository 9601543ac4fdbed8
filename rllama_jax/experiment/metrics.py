"""Run metrics: JSON lines, TensorBoard event files, optional Weights & Biases, and plots.

Every record is a flat dict of numbers with an ``update`` counter and an ``env_steps``
counter; ``metrics.jsonl`` in the workdir is the source of truth (plots and the ablation
tables read it). On resume, records after the restored update are dropped first, so a
killed run's lost updates are not counted twice.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

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
        """Appends ``record``. A metric with nothing to report yet (None, NaN or infinite:
        e.g. ``train_return`` before any episode has finished) is written as null to the
        JSONL file and left out of TensorBoard and W&B."""
        clean = {k: _number(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(clean.get("env_steps") or clean.get("update") or 0)
        present = {k: v for k, v in clean.items() if v is not None}
        for key, value in present.items():
            if key not in ("update", "env_steps"):
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(present, step=step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _number(value: Any) -> float | int | None:
    """A JSON-ready number: ints stay ints; None, NaN and infinities become None."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral):  # Python, numpy
        return int(value)
    value = float(value)  # numpy and JAX scalars too
    return value if math.isfinite(value) else None


def moving_average(values: Sequence[float], half_width: int) -> np.ndarray:
    """Centred moving average: point i is the mean of ``values[i - h : i + h + 1]``, the
    window cut short at both ends (so the curve neither lags nor leaves out the last
    records). ``half_width`` 0 returns the values unchanged."""
    x = np.asarray(values, dtype=float)
    if half_width <= 0 or len(x) == 0:
        return x
    sums = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(len(x))
    lo, hi = np.maximum(i - half_width, 0), np.minimum(i + half_width + 1, len(x))
    return (sums[hi] - sums[lo]) / (hi - lo)


def smoothing_half_width(n: int) -> int:
    """Half-width of the train-return smoothing for ``n`` records: windows of about a 15th
    of the run (none below 10 records)."""
    return max(1, n // 30) if n >= 10 else 0


def _steps_label(x: float, _pos: Any = None) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def learning_curve_figure(
    records: Sequence[dict[str, Any]],
    *,
    title: str = "",
    references: Sequence[tuple[str, float]] = (),
):
    """The learning-curve figure of a run's records (see ``plot_learning_curve``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    train = [(r["env_steps"], r["train_return"]) for r in records
             if r.get("train_return") is not None]  # fmt: skip
    evals = [(r["env_steps"], r["eval_return"], r.get("eval_return_se") or 0.0)
             for r in records if r.get("eval_return") is not None]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    lows: list[float] = [v for _, v in references]
    highs: list[float] = list(lows)
    if train:
        xs, ys = (np.asarray(v, float) for v in zip(*train, strict=True))
        h = smoothing_half_width(len(ys))
        if h:
            ax.plot(xs, ys, color="tab:blue", alpha=0.2, linewidth=0.8,
                    label="train return, mean of last 100 episodes (raw)")  # fmt: skip
            ax.plot(xs, moving_average(ys, h), color="tab:blue", linewidth=2.0,
                    label=f"its centred moving average over {2 * h + 1} updates")  # fmt: skip
        else:
            ax.plot(xs, ys, color="tab:blue", linewidth=1.5, marker=".",
                    label="train return, mean of last 100 episodes")  # fmt: skip
        lows.append(float(ys.min()))
        highs.append(float(ys.max()))
    if evals:
        xs, ys, se = (np.asarray(v, float) for v in zip(*evals, strict=True))
        label = f"greedy evaluation ± standard error (last: {ys[-1]:+.3f} ± {se[-1]:.3f})"
        ax.errorbar(xs, ys, yerr=se, fmt="o", color="tab:orange", markersize=4, capsize=3,
                    elinewidth=1.2, label=label, zorder=3)  # fmt: skip
        lows.append(float((ys - se).min()))
        highs.append(float((ys + se).max()))
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.08 * (hi - lo) if hi > lo else 0.5
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlim(left=0)
    _draw_references(ax, references)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.xaxis.set_major_formatter(FuncFormatter(_steps_label))
    ax.set_title(title or "learning curve")
    ax.grid(alpha=0.3)
    if train or evals:
        # Below the axes: a legend inside would hide part of some curve.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7.5,
                  frameon=False)  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no finished episode yet", transform=ax.transAxes, ha="center",
                va="center", color="grey")  # fmt: skip
    fig.tight_layout()
    return fig


def _draw_references(ax: Any, references: Sequence[tuple[str, float]]) -> None:
    """Dashed grey lines, each named with its value just right of the axes; labels of close
    values are pushed apart so they stay readable."""
    if not references:
        return
    lo, hi = ax.get_ylim()
    gap = 0.055 * (hi - lo)  # one label's height, in data units
    placed: list[float] = []
    for name, value in sorted(references, key=lambda r: r[1]):
        ax.axhline(value, color="0.35", linestyle=(0, (4, 3)), linewidth=0.9, zorder=1,
                   label="_reference")  # fmt: skip
        y = max(value, placed[-1] + gap) if placed else value
        placed.append(y)
        text = f"{name} {value:+g}" if value else f"{name} 0"
        ax.annotate(text, xy=(1.0, value), xycoords=("axes fraction", "data"),
                    xytext=(1.01, y), textcoords=("axes fraction", "data"), va="center",
                    fontsize=7.5, color="0.25", annotation_clip=False)  # fmt: skip


def plot_learning_curve(
    workdir: str,
    out: str | None = None,
    title: str = "",
    references: Sequence[tuple[str, float]] = (),
) -> str:
    """The run's learning curve from ``metrics.jsonl``, as a PNG; returns its path.

    Against environment steps: the training return (mean of the last 100 episodes at each
    update) as a faint raw trace under its centred moving average, the greedy evaluations
    with their standard errors, and ``references`` -- ``(name, return)`` pairs such as
    optimal or chance play, from the env preset -- as labelled horizontal lines.
    """
    import matplotlib.pyplot as plt

    out = out or os.path.join(workdir, "learning_curve.png")
    fig = learning_curve_figure(read_records(workdir), title=title, references=references)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
