"""Experiments: the configuration, training loop with checkpoint/resume, evaluation,
metrics and plots behind ``experiments/train.py``, ``evaluate.py`` and ``ablations.py``."""

from rllama_jax.experiment.config import ENV_PRESETS, EnvPreset, ExperimentConfig
from rllama_jax.experiment.evaluation import EvalResult, evaluate
from rllama_jax.experiment.run import RunResult, load_run, run_experiment

__all__ = [
    "ENV_PRESETS",
    "EnvPreset",
    "EvalResult",
    "ExperimentConfig",
    "RunResult",
    "evaluate",
    "load_run",
    "run_experiment",
]
