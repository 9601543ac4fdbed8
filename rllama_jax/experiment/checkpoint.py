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
import contextlib
import gc
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rllama_jax.rollout import Rollout
from rllama_jax.train import TrainState

# Host-side attributes of ``Rollout`` that carry the loop's position between collects.
_ROLLOUT_FIELDS = (
    "raw_obs", "candidates", "episode_returns", "episodes", "parse_failures",
    "_group_round", "insert_at", "histories",
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


class UnreadableCheckpointError(RuntimeError):
    """No checkpoint of a run can be restored."""


def _one_line(err: BaseException) -> str:
    while err.__cause__ is not None:  # the root cause names the file and what is wrong
        err = err.__cause__
    text = " ".join(str(err).split())
    text = text.split(" See full TensorStore details")[0]  # the rest is a repr, not a reason
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _from_orbax(tb: Any) -> bool:
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _AbandonedReads(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports: after a failed restore,
    they are the reads nobody is left to await."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


def _drop_orbax_leftovers() -> None:
    """The reads a failed restore abandoned are finalized later, some only at exit, each then
    printed with its traceback ("Exception ignored in: <coroutine ...>", "... exception was
    never retrieved"): those of orbax are dropped from then on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax", False):
        return

    def hook(unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        if _from_orbax(unraisable.exc_traceback):
            return
        previous(unraisable)

    hook.drops_orbax = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedReads())


@contextlib.contextmanager
def _failures_kept_quiet() -> Iterator[None]:
    """Runs a restore with the process's stderr set aside, and drops what it printed if the
    restore fails. A failed orbax restore leaves its parallel reads running: as they finish,
    on TensorStore's threads and in asyncio's garbage collection, each prints a traceback
    ("Event loop is closed", "Task exception was never retrieved") that says nothing the
    one-line warning does not. The reads are given a moment to finish inside the window; what
    a successful restore printed is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            if failed:
                _drop_orbax_leftovers()
                gc.collect()  # unretrieved task exceptions are reported when collected
                time.sleep(0.5)
                gc.collect()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", "replace"))


def saved_steps(workdir: str) -> list[int]:
    """Updates at which ``workdir`` holds a finished checkpoint (without opening orbax)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


class RunCheckpointer:
    """Saves and restores (``TrainState``, host snapshot) pairs under ``workdir/checkpoints``.

    Steps are update counts. Saves are asynchronous (the next update overlaps the write);
    ``close`` waits for the last one.
    """

    def __init__(self, workdir: str, keep: int = 2) -> None:
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.keep = keep
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True),
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

    def restore_readable(self, like: TrainState, warn: Any = None) -> tuple[TrainState, dict, int]:
        """The newest checkpoint that can be read, as ``(state, host, step)``.

        A checkpoint that fails to restore (a file cut short or overwritten) is reported in
        one line through ``warn`` and the previous one is tried; ``UnreadableCheckpointError``
        when none can be read.
        """
        warn = warn or logging.getLogger("rllama_jax").warning
        failures, unreadable = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _failures_kept_quiet():
                    state, host = self.restore(like, step)
            except Exception as err:  # noqa: BLE001 - any failure to read means "try older"
                reason = _one_line(err)
                failures.append(f"step {step}: {reason}")
                unreadable.append(step)
                warn(f"checkpoint at update {step} cannot be read ({reason}); "
                    "trying the previous one")  # fmt: skip
                continue
            if unreadable:
                self._set_aside(unreadable)
            return state, host, step
        raise UnreadableCheckpointError(
            f"no checkpoint in {self.directory} can be read ({'; '.join(failures) or 'none'}); "
            "start again with a new --workdir"
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints out of the manager's way (kept for inspection, in
        ``workdir/unreadable_checkpoints``), so the resumed run can save those steps anew."""
        self.manager.close()
        aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(self.directory, str(step)), target)
        self.manager = self._open()

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
