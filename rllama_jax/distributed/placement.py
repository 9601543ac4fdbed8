"""``Placement``: where one run's arrays live, for the training loop to use end to end.

The loop (``rllama_jax.loop``), the environment loop (``rollout.Rollout``) and the launcher
take an optional ``Placement``. Without one everything runs on the default device, as
always. With one:

- the train state is placed by the partition rules (``shard_train_state``) and the train
  step is the sharded one (``make_sharded_train_step``: state donated, batch split by rows);
- each acting call gets this process's observations, assembles the global batch
  (``shard_batch(process_local=True)``: rows over ``data`` x ``fsdp``), runs ``rollout.act``
  sharded, and hands back this process's rows as host arrays;
- trajectories go to the train step the same way: each process passes the rows of the
  environments it steps, and the global batch is never copied between hosts;
- scalars a run reports (episode returns, parse failures) are gathered once per update.

Rows: a process steps ``num_envs / process_count`` environments, the global rows
``[row_offset, row_offset + local)``, so environment ``i`` of the run is seeded and grouped
the same whatever the number of processes or devices.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rllama_jax.distributed.mesh import BATCH_AXES, make_mesh
from rllama_jax.distributed.precision import check_precision
from rllama_jax.distributed.sharded import (
    ShardedFunction,
    make_sharded_act,
    make_sharded_train_step,
    place,
    shard_batch,
    shard_train_state,
    state_part_shardings,
)
from rllama_jax.models import LlamaConfig
from rllama_jax.train import TrainConfig, TrainState


class Placement:
    """A run's mesh and precision, and this process's share of the environment rows.

    mesh: a ``Mesh`` from ``make_mesh`` or a spec string for it (``"data:2,fsdp:2"``).
    model_config: the run's model (attention heads stay whole when split).
    """

    def __init__(
        self, mesh: Mesh | str, model_config: LlamaConfig, precision: str = "fp32"
    ) -> None:
        check_precision(precision)
        self.mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        self.model_config = model_config
        self.precision = precision
        self._acts: dict[tuple[TrainConfig, bool], ShardedFunction] = {}

    # ------------------------------------------------------------------ rows
    @property
    def processes(self) -> int:
        return jax.process_count()

    @property
    def batch_devices(self) -> int:
        """Devices a batch's rows are split over (``data`` x ``fsdp``)."""
        return math.prod(dict(self.mesh.shape)[a] for a in BATCH_AXES)

    def check_rows(self, rows: int, what: str) -> None:
        """Raises ``ValueError`` (one line) unless ``rows`` global rows split evenly over the
        processes and over the batch axes of the mesh."""
        shape = ",".join(f"{a}:{s}" for a, s in self.mesh.shape.items())
        unit = math.lcm(self.processes, self.batch_devices)
        if rows % unit:
            raise ValueError(
                f"{what}={rows} does not split over {self.processes} process(es) and the "
                f"{self.batch_devices} data x fsdp devices of the mesh ({shape}); use a "
                f"multiple of {unit}"
            )

    def local_rows(self, rows: int) -> int:
        """How many of ``rows`` global rows this process steps."""
        return rows // self.processes

    def row_offset(self, rows: int) -> int:
        """The first of this process's rows among ``rows`` global rows."""
        return jax.process_index() * self.local_rows(rows)

    def rows(self, tree: Any) -> Any:
        """This process's rows (host arrays, leading axis = its rows) as the global batch,
        split over ``data`` x ``fsdp``."""
        return shard_batch(tree, self.mesh, process_local=True)

    @staticmethod
    def host(tree: Any) -> Any:
        """Global arrays split by rows -> numpy arrays of this process's rows (every array of
        a single-process run whole). ``None`` leaves stay ``None``."""
        return jax.tree.map(_local_rows, tree)

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Every process's ``values`` [n] (same n everywhere) concatenated in process order
        ([processes * n]); the values themselves with one process."""
        values = np.asarray(values)
        if self.processes == 1:
            return values
        return np.asarray(multihost_utils.process_allgather(values, tiled=True))

    def gather_text(self, text: str) -> list[str]:
        """Every process's ``text``, in process order (``[text]`` with one process)."""
        if self.processes == 1:
            return [text]
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        sizes = self.gather(np.asarray([data.size], np.int64))
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[: data.size] = data
        rows = np.asarray(multihost_utils.process_allgather(padded[None], tiled=True))
        return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, sizes, strict=True)]

    def barrier(self, name: str) -> None:
        """Waits until every process gets here (nothing with one process)."""
        if self.processes > 1:
            multihost_utils.sync_global_devices(name)

    def total(self, value: float) -> float:
        """The sum over processes of a per-process number."""
        return float(self.gather(np.asarray([value], np.float64)).sum())

    # ------------------------------------------------------------------ state and calls
    def state(self, state: TrainState) -> TrainState:
        """``state`` in the precision's storage dtypes, placed by the partition rules."""
        return shard_train_state(state, self.mesh, self.model_config, self.precision)

    def memory(self, memory: Any) -> Any:
        """A ``MemoryState`` placed as it is inside a train state (working memory's
        environments split by rows, the episodic store replicated)."""
        return place(
            memory,
            state_part_shardings(memory, "memory", self.mesh, self.model_config.head_dim),
        )

    def train_step(self, config: TrainConfig) -> ShardedFunction:
        """The sharded ``train_step(state, trajectory)`` (state donated)."""
        return make_sharded_train_step(
            config, self.model_config, self.mesh, precision=self.precision
        )

    def act(self, config: TrainConfig, greedy: bool) -> ShardedFunction:
        """The sharded ``rollout.act`` for ``config`` (one per config and mode, compiled once
        per input signature)."""
        key = (config, greedy)
        if key not in self._acts:
            self._acts[key] = make_sharded_act(
                self.mesh, self.model_config, config, precision=self.precision, greedy=greedy
            )
        return self._acts[key]


def _local_rows(x: Any) -> Any:
    if x is None:
        return None
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    # Rows split over the processes: this process's shards, in row order, one per row range
    # (a row range held by several devices, replicated over ``tensor``, is taken once).
    shards: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start = (shard.index[0].start or 0) if x.ndim else 0
        shards.setdefault(start, np.asarray(shard.data))
    if x.ndim == 0 or (len(shards) == 1 and next(iter(shards.values())).shape == x.shape):
        return next(iter(shards.values()))
    return np.concatenate([shards[k] for k in sorted(shards)], axis=0)
