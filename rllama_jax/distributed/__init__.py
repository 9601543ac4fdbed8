"""Scaling out on JAX's own SPMD: a (data, fsdp, tensor) device mesh, partition rules for
every array of a run, sharded train_step / generation / scoring / acting, sharded loading,
multi-host start-up and bf16 mixed precision.

Modules:
  mesh: ``make_mesh("data:2,fsdp:2,tensor:1")``, ``maybe_initialize_distributed``.
  rules: path/shape -> ``PartitionSpec`` (pure functions, no devices).
  precision: ``precision="bf16"``: bfloat16 compute, float32 masters and optimizer state.
  sharded: placement helpers and the sharded compiled calls.
  placement: ``Placement``, what the training loop, the rollout and the launcher use to run
    a whole experiment on a mesh (``--mesh``), one process or many (``--distributed``).
"""

from rllama_jax.distributed.mesh import (
    AXES,
    BATCH_AXES,
    check_mesh_spec,
    make_mesh,
    maybe_initialize_distributed,
    parse_mesh_spec,
)
from rllama_jax.distributed.placement import Placement
from rllama_jax.distributed.precision import PRECISIONS, apply_precision, compute_config
from rllama_jax.distributed.rules import RULES, batch_spec, param_spec, state_spec
from rllama_jax.distributed.sharded import (
    ShardedFunction,
    batch_shardings,
    load_sharded,
    make_sharded_act,
    make_sharded_generate,
    make_sharded_score,
    make_sharded_train_step,
    param_shardings,
    place,
    shard_batch,
    shard_params,
    shard_train_state,
    state_shardings,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "PRECISIONS",
    "RULES",
    "Placement",
    "ShardedFunction",
    "apply_precision",
    "batch_shardings",
    "batch_spec",
    "check_mesh_spec",
    "compute_config",
    "load_sharded",
    "make_mesh",
    "make_sharded_act",
    "make_sharded_generate",
    "make_sharded_score",
    "make_sharded_train_step",
    "maybe_initialize_distributed",
    "param_shardings",
    "param_spec",
    "parse_mesh_spec",
    "place",
    "shard_batch",
    "shard_params",
    "shard_train_state",
    "state_shardings",
    "state_spec",
]
