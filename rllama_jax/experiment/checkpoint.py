"""Checkpoints of a whole run with orbax ``CheckpointManager``.

A checkpoint is taken between updates and holds two items:

* ``state``: the ``TrainState`` (trainable parameters, optimizer state, target networks,
  replay buffer, memory, RNG, counters), saved as arrays. Frozen parameters (the base model
  under LoRA or heads, a KL reference) are left out: they are what the run's model loads
  as, and ``restore`` takes them from the fresh state it is given;
* ``host``: what lives on the host: the environment loop (the environments themselves,
  pickled with their RNGs and mid-episode positions, the current observations, running
  returns, the acting key) and the loop counters, as JSON.

Restoring both puts a run exactly where it was: a run killed at any moment and resumed from
its last checkpoint computes the same parameters as one that was never interrupted (on the
same machine; ``tests/test_experiment.py`` kills one with SIGKILL to check). Orbax writes
each checkpoint to a temporary directory and renames it when complete, so a kill during a
save leaves the previous checkpoint as the latest.

Environments that cannot be pickled (e.g. TextWorld's game processes) are re-created and
reset on resume instead; the run continues, only that exactness is lost, and a warning
says so.
"""

from __future__ import annotations

import base64
import os
import pickle
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rllama_jax.rollout import Rollout
from rllama_jax.train import TrainState

# Host-side attributes of ``Rollout`` that carry the loop's position between collects.
_ROLLOUT_FIELDS = (
    "raw_obs", "candidates", "episode_returns", "finished_returns", "parse_failures",
    "_group_round", "insert_at",
)  # fmt: skip


def _encode(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode("ascii")


def _decode(text: str) -> Any:
    return pickle.loads(base64.b64decode(text.encode("ascii")))


def rollout_host_state(rollout: Rollout) -> dict[str, Any]:
    """JSON-able snapshot of the environment loop (environments included when picklable)."""
    fields = {name: getattr(rollout, name) for name in _ROLLOUT_FIELDS}
    fields["key"] = np.asarray(jax.random.key_data(rollout.key))
    snapshot: dict[str, Any] = {"fields": _encode(fields)}
    try:
        snapshot["envs"] = _encode(rollout.envs)
    except Exception as err:  # noqa: BLE001 - any pickling failure means "not saved"
        snapshot["envs"] = None
        snapshot["envs_error"] = f"{type(err).__name__}: {err}"
    return snapshot


def restore_rollout_host_state(rollout: Rollout, snapshot: dict[str, Any]) -> None:
    """Puts ``rollout`` back where ``snapshot`` was taken (see the module docstring)."""
    if snapshot.get("envs") is None:
        warnings.warn(
            "the environments of this run could not be checkpointed "
            f"({snapshot.get('envs_error')}); they restart from fresh episodes",
            stacklevel=2,
        )
        return
    rollout.envs = _decode(snapshot["envs"])
    fields = _decode(snapshot["fields"])
    rollout.key = jax.random.wrap_key_data(fields.pop("key"))
    for name, value in fields.items():
        setattr(rollout, name, value)


def _to_saveable(state: TrainState) -> TrainState:
    # The frozen parameters (the LLM under LoRA or heads, the KL reference copy) are what
    # load_model gives back: a checkpoint leaves them out (513 MiB for SmolLM2-135M).
    return state.replace(rng=jax.random.key_data(state.rng), frozen={})


class RunCheckpointer:
    """Saves and restores (``TrainState``, host snapshot) pairs under ``workdir/checkpoints``.

    Steps are update counts. Saves are asynchronous (the next update overlaps the write);
    ``close`` waits for the last one.
    """

    def __init__(self, workdir: str, keep: int = 2) -> None:
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, host: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saveable(state)),
                host=ocp.args.JsonSave(host),
            ),
        )

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The checkpoint at ``step`` (default: latest), shaped like the fresh state ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(like))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
            ),
        )
        state = restored["state"]
        return (
            state.replace(rng=jax.random.wrap_key_data(state.rng), frozen=like.frozen),
            restored["host"],
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
