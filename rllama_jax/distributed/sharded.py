"""Sharded placement and sharded compiled calls: train_step, generation, scoring, acting.

Each wrapper compiles the project's own function (``make_train_step(..., jit=False)``,
``sampling.generate``, ``sampling.score_candidates``, ``rollout.act``) with explicit
``in_shardings`` / ``out_shardings`` from the partition rules, once per input signature
(tree structure, shapes, dtypes), and first moves its arguments to those shardings (a no-op
for arrays already there). The train state is donated: XLA updates it in place.

Shardings are ``NamedSharding``s on a mesh from ``mesh.make_mesh``; the XLA SPMD partitioner
inserts the collectives. Nothing here is specific to one device kind or to one host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rllama_jax.distributed.precision import apply_precision, check_precision, compute_config
from rllama_jax.distributed.rules import batch_spec, param_spec, state_spec
from rllama_jax.models import LlamaConfig, Params, load_pretrained, param_shapes
from rllama_jax.models.loading import Pretrained
from rllama_jax.sampling import SamplingConfig, generate, score_candidates
from rllama_jax.train import TrainConfig, TrainState, make_train_step

SpecFn = Callable[[tuple[Any, ...], tuple[int, ...]], P]


def tree_shardings(tree: Any, mesh: Mesh, spec_fn: SpecFn, prefix: Sequence[str] = ()) -> Any:
    """``NamedSharding``s mirroring ``tree`` (arrays or ``jax.ShapeDtypeStruct``s), each from
    ``spec_fn(path, shape)``; ``prefix`` is prepended to every path."""

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, spec_fn(tuple(prefix) + tuple(path), tuple(np.shape(leaf))))

    return jax.tree_util.tree_map_with_path(one, tree)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works across processes: there a typed
    PRNG key goes through its raw ``key_data`` (``device_put`` accepts host values, plain
    arrays and uncommitted arrays for shardings spanning other hosts, but no key arrays)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x: Any, sharding: NamedSharding) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree, shardings)


def state_part_shardings(tree: Any, name: str, mesh: Mesh, head_dim: int = 1) -> Any:
    """Shardings of one part of a ``TrainState`` given alone (``name``: its field, e.g.
    ``"memory"``), as that part is placed inside the state (``rules.state_spec``)."""
    sizes = dict(mesh.shape)
    return tree_shardings(
        tree, mesh, lambda p, s: state_spec(p, s, sizes, head_dim), prefix=(name,)
    )


def param_shardings(params: Params, mesh: Mesh, head_dim: int = 1) -> Params:
    """Shardings of a parameter tree (Llama, LoRA adapters, heads, latent adapter)."""
    sizes = dict(mesh.shape)
    return tree_shardings(params, mesh, lambda p, s: param_spec(p, s, sizes, head_dim))


def state_shardings(state: TrainState, mesh: Mesh, head_dim: int = 1) -> TrainState:
    """Shardings of a whole ``TrainState`` (see ``rules.state_spec``)."""
    sizes = dict(mesh.shape)
    return tree_shardings(state, mesh, lambda p, s: state_spec(p, s, sizes, head_dim))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """Shardings of a ``Batch`` / ``Transitions`` / ``Observation`` (or any tree with a
    leading batch axis): leading axis on ``data`` x ``fsdp``; scalars replicated."""
    sizes = dict(mesh.shape)
    return tree_shardings(batch, mesh, lambda p, s: batch_spec(s, sizes))


def _head_dim(model_config: LlamaConfig | None) -> int:
    return 1 if model_config is None else model_config.head_dim


def shard_params(params: Params, mesh: Mesh, model_config: LlamaConfig | None = None) -> Params:
    """``params`` placed by the partition rules (a copy; prefer ``load_sharded`` for
    checkpoints, which never materialises a full copy on a device)."""
    return place(params, param_shardings(params, mesh, _head_dim(model_config)))


def shard_train_state(
    state: TrainState,
    mesh: Mesh,
    model_config: LlamaConfig | None = None,
    precision: str = "fp32",
) -> TrainState:
    """``state`` with the storage dtypes of ``precision`` (``precision.apply_precision``),
    placed by the partition rules. ``model_config`` keeps attention heads whole."""
    state = apply_precision(state, precision)
    return place(state, state_shardings(state, mesh, _head_dim(model_config)))


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """``batch`` placed with its leading axis over ``data`` x ``fsdp``.

    process_local: in a multi-host job, True means each process passes only its own rows
    (the environments it steps; leading axis = global / process count) and the global batch
    is assembled without copying between hosts
    (``jax.make_array_from_process_local_data``). False means every process passes the same
    global batch. With one process both are the same.
    """
    if process_local and jax.process_count() > 1:
        sizes = dict(mesh.shape)
        count = jax.process_count()

        def put(x: Any) -> jax.Array:
            x = np.asarray(x)
            global_shape = (x.shape[0] * count,) + x.shape[1:] if x.ndim else x.shape
            sharding = NamedSharding(mesh, batch_spec(global_shape, sizes))
            return jax.make_array_from_process_local_data(sharding, x, global_shape)

        return jax.tree.map(put, batch)
    return place(batch, batch_shardings(batch, mesh))


def load_sharded(name_or_path: str, mesh: Mesh, **kwargs: Any) -> Pretrained:
    """``load_pretrained`` with every parameter placed straight into its sharding (each
    device reads only its own slices). Keywords go to ``load_pretrained``."""

    def shardings(config: LlamaConfig) -> Params:
        shapes = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s, np.float32),
            param_shapes(config),
            is_leaf=lambda x: isinstance(x, tuple),
        )
        return param_shardings(shapes, mesh, config.head_dim)

    return load_pretrained(name_or_path, shardings=shardings, **kwargs)


def _signature(args: Any) -> Any:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)


class ShardedFunction:
    """``fn`` jitted with explicit shardings, compiled once per input signature.

    arg_shardings(args) -> shardings of the positional ``args`` (a tuple mirroring them);
    out_shardings(args) -> shardings of the outputs.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        arg_shardings: Callable[[tuple[Any, ...]], tuple[Any, ...]],
        out_shardings: Callable[[tuple[Any, ...]], Any],
        donate_argnums: tuple[int, ...] = (),
    ) -> None:
        self.fn = fn
        self.arg_shardings = arg_shardings
        self.out_shardings = out_shardings
        self.donate_argnums = donate_argnums
        self._compiled: dict[Any, tuple[Any, Any]] = {}

    def jitted(self, *args: Any) -> tuple[Any, Any]:
        """(the jitted function for ``args``' signature, the input shardings it expects)."""
        sig = _signature(args)
        if sig not in self._compiled:
            in_sh = self.arg_shardings(args)
            out_sh = self.out_shardings(args)
            fn = jax.jit(
                self.fn,
                in_shardings=in_sh,
                out_shardings=out_sh,
                donate_argnums=self.donate_argnums,
            )
            self._compiled[sig] = (fn, in_sh)
        return self._compiled[sig]

    def __call__(self, *args: Any) -> Any:
        fn, in_sh = self.jitted(*args)
        return fn(*place(args, in_sh))

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``s): what
        ``.compile()`` turns into the executable a call with that signature runs."""
        fn, _ = self.jitted(*args)
        return fn.lower(*args)


def make_sharded_train_step(
    config: TrainConfig,
    model_config: LlamaConfig,
    mesh: Mesh,
    *,
    precision: str = "fp32",
) -> ShardedFunction:
    """``train_step(state, trajectory) -> (state, metrics)`` over ``mesh``: the project's train
    step (``make_train_step(..., jit=False)``) jitted with the state's and the batch's
    shardings in and out (metrics replicated) and the state donated.

    precision: ``"bf16"`` runs the model in bfloat16 on float32 masters (place the state
    with ``shard_train_state(..., precision="bf16")`` to store frozen weights in bfloat16).
    """
    check_precision(precision)
    model_config = compute_config(model_config, precision)
    # Keeps each gathered minibatch split over the batch axes; without it XLA replicates
    # the gathered rows and every data-parallel device computes the whole minibatch.
    step = make_train_step(
        config, model_config, jit=False,
        shard_minibatch=lambda tree: jax.lax.with_sharding_constraint(
            tree, batch_shardings(tree, mesh)
        ),
    )  # fmt: skip
    head_dim = model_config.head_dim
    replicated = NamedSharding(mesh, P())

    def arg_shardings(args: tuple[Any, ...]) -> tuple[Any, ...]:
        state, batch = args
        return state_shardings(state, mesh, head_dim), batch_shardings(batch, mesh)

    def out_shardings(args: tuple[Any, ...]) -> tuple[Any, Any]:
        return state_shardings(args[0], mesh, head_dim), replicated

    return ShardedFunction(step, arg_shardings, out_shardings, donate_argnums=(0,))


def make_sharded_generate(
    mesh: Mesh, model_config: LlamaConfig, sampling: SamplingConfig, *, precision: str = "fp32"
) -> ShardedFunction:
    """``generate(params, prompt_tokens, prompt_mask, key, prefix=None) -> Generation`` over
    ``mesh`` (``sampling.generate``): parameters by the rules, rows [B] over the batch axes
    (outputs too), key and prefix cache replicated."""
    cfg = compute_config(model_config, precision)

    def fn(params, prompt_tokens, prompt_mask, key, prefix=None):
        return generate(params, cfg, prompt_tokens, prompt_mask, key, sampling, prefix)

    return ShardedFunction(fn, _acting_shardings(mesh, cfg, rows=(1, 2)), _rows_out(fn, mesh))


def make_sharded_score(
    mesh: Mesh, model_config: LlamaConfig, *, precision: str = "fp32"
) -> ShardedFunction:
    """``score(params, prompt_tokens, prompt_mask, candidate_tokens, candidate_mask,
    prefix=None) -> Scores`` over ``mesh`` (``sampling.score_candidates``)."""
    cfg = compute_config(model_config, precision)

    def fn(params, prompt_tokens, prompt_mask, candidate_tokens, candidate_mask, prefix=None):
        return score_candidates(
            params, cfg, prompt_tokens, prompt_mask, candidate_tokens, candidate_mask, prefix
        )

    return ShardedFunction(fn, _acting_shardings(mesh, cfg, rows=(1, 2, 3, 4)), _rows_out(fn, mesh))


def make_sharded_act(
    mesh: Mesh,
    model_config: LlamaConfig,
    config: TrainConfig,
    *,
    precision: str = "fp32",
    greedy: bool = False,
) -> ShardedFunction:
    """``act(trainable, frozen, memory, obs, insert_at, key, update=0) -> ActOutput`` over
    ``mesh`` (``rollout.act``): trainable / frozen parameters and working memory [E] as in
    the train state, observations and ``insert_at`` [B] over the batch axes, key and
    ``update`` (train steps so far, for exploration schedules) replicated."""
    from rllama_jax.rollout import act

    cfg = compute_config(model_config, precision)
    replicated = NamedSharding(mesh, P())

    def fn(trainable, frozen, memory, obs, insert_at, key, update=0):
        return act(
            trainable, frozen, memory, obs, insert_at, key, model_config=cfg, config=config,
            greedy=greedy, update=update,
        )  # fmt: skip

    def arg_shardings(args: tuple[Any, ...]) -> tuple[Any, ...]:
        trainable, frozen, memory, obs, insert_at = args[:5]

        return (
            state_part_shardings(trainable, "trainable", mesh, cfg.head_dim),
            state_part_shardings(frozen, "frozen", mesh, cfg.head_dim),
            state_part_shardings(memory, "memory", mesh, cfg.head_dim),
            batch_shardings(obs, mesh),
            batch_shardings(insert_at, mesh),
            *(replicated for _ in args[5:]),
        )

    return ShardedFunction(fn, arg_shardings, _rows_out(fn, mesh))


def _acting_shardings(
    mesh: Mesh, model_config: LlamaConfig, rows: tuple[int, ...]
) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """Argument shardings for (params, *rest): params by the rules, the arguments at
    positions ``rows`` over the batch axes, the others (keys, prefix caches) replicated."""

    def arg_shardings(args: tuple[Any, ...]) -> tuple[Any, ...]:
        out = [param_shardings(args[0], mesh, model_config.head_dim)]
        for i, arg in enumerate(args[1:], start=1):
            if i in rows:
                out.append(batch_shardings(arg, mesh))
            else:
                out.append(jax.tree.map(lambda _: NamedSharding(mesh, P()), arg))
        return tuple(out)

    return arg_shardings


def _rows_out(fn: Callable[..., Any], mesh: Mesh) -> Callable[[tuple[Any, ...]], Any]:
    """Output shardings of an acting call: every output's leading axis over the batch axes
    (its shapes from ``jax.eval_shape``)."""
    return lambda args: batch_shardings(jax.eval_shape(fn, *args), mesh)
