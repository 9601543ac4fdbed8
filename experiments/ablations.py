"""Run an ablation grid from a named preset; resumable; CSV + Markdown table + plots.

    python experiments/ablations.py --preset=smoke --out=runs/ablation-smoke
    python experiments/ablations.py --preset=memory --out=runs/ablation-memory
    python experiments/ablations.py --preset=algorithms --out=runs/ablation-algos --seeds=0

Presets (``rllama_jax/experiment/ablation.py``): ``memory`` (none / working / episodic /
both on the T-maze, the keyed bandit and Blackjack), ``algorithms`` (all six on Blackjack and
BabyAI-Text GoToLocal) and ``smoke`` (tiny model, minutes). Re-running the same command
skips finished cells and resumes an interrupted one. ``--report_only`` writes the reports
from the cells finished so far (e.g. grids run piecewise with different ``--envs`` /
``--seeds`` / ``--total_steps``; the table shows each environment's steps).
"""

from __future__ import annotations

from absl import app, flags, logging

from rllama_jax.experiment.ablation import PRESETS, run_preset

flags.DEFINE_enum("preset", "smoke", list(PRESETS), "Which grid to run.")
flags.DEFINE_string("out", None, "Output directory (runs, results.csv/.md, plots).")
flags.DEFINE_list("seeds", [], "Override the preset's seeds, e.g. 0,1,2.")
flags.DEFINE_list("envs", [], "Only these of the preset's environments, e.g. tmaze,bandit.")
flags.DEFINE_list("settings", [], "Only these of the preset's settings, e.g. none,episodic.")
flags.DEFINE_integer("total_steps", 0, "Override every cell's environment steps (0: preset).")
flags.DEFINE_string("model", "", "Override every cell's model (e.g. smollm2-135m-instruct).")
flags.DEFINE_string("mesh", "", "Run every cell on this device mesh (train.py's --mesh).")
flags.DEFINE_enum("precision", "", ["", "fp32", "bf16"], "Every cell's --precision ('': preset).")
flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: jax.distributed.initialize() first (as train.py's --distributed; needs --mesh).",
)
flags.DEFINE_bool("progress", False, "Progress bar per cell.")
flags.DEFINE_bool("report_only", False, "Run nothing: summarise the cells already finished.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    out = FLAGS.out or f"runs/ablation-{FLAGS.preset}"
    overrides = {}
    if FLAGS.total_steps:
        overrides["total_steps"] = FLAGS.total_steps
    if FLAGS.model:
        overrides["model"] = FLAGS.model
    if FLAGS.mesh:
        overrides["mesh"] = FLAGS.mesh
    if FLAGS.precision:
        overrides["precision"] = FLAGS.precision
    if FLAGS.distributed:
        overrides["distributed"] = True
    try:
        seeds = tuple(int(s) for s in FLAGS.seeds) or None
    except ValueError as err:
        raise app.UsageError(f"--seeds must be integers: {FLAGS.seeds}") from err
    try:
        run_preset(FLAGS.preset, out, seeds=seeds, overrides=overrides,
                   envs=tuple(FLAGS.envs) or None, settings=tuple(FLAGS.settings) or None,
                   progress=FLAGS.progress,
                   report_only=FLAGS.report_only)  # fmt: skip
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    with open(f"{out}/results.md", encoding="utf-8") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
