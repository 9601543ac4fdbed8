"""absl flags generated from ``ExperimentConfig``: one flag per field, same name, type,
default and help, so the launcher, the evaluator and the ablation runner agree."""

from __future__ import annotations

import dataclasses

from absl import flags

from rllama_jax.experiment.config import ExperimentConfig


def define_experiment_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines ``--<field>`` for every ``ExperimentConfig`` field."""
    for field in dataclasses.fields(ExperimentConfig):
        default, help_text = field.default, field.metadata["help"]
        choices = field.metadata.get("choices")
        if choices:
            flags.DEFINE_enum(field.name, default, list(choices), help_text,
                              flag_values=flag_values)  # fmt: skip
        elif isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text, flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(field.name, default, help_text, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
    """The ``ExperimentConfig`` the command line describes."""
    return ExperimentConfig(
        **{f.name: flag_values[f.name].value for f in dataclasses.fields(ExperimentConfig)}
    )
