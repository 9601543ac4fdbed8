"""Partition rules: which mesh axes split which dimension of every array of a run.

Pure functions of a leaf's tree path, its shape and the mesh's axis sizes (no devices), so
they are unit-tested in-process and reused for any tree: the Llama parameters, LoRA
adapters, heads, the latent-memory adapter, and the optimizer state (optax states mirror the
parameter tree, so a rule matches a path by its suffix: ``.../mu/model/layers/wq`` is a
``layers/wq``).

Weights follow Megatron: the projections into attention heads and into the MLP width
(``wq``, ``wk``, ``wv``, ``w_gate``, ``w_up``) split their output on ``tensor``, the
projections back (``wo``, ``w_down``) their input, so an attention block or an MLP needs one
all-reduce; the other big dimension (the model width) goes on ``fsdp``. The vocabulary of the
embedding and LM head goes on ``tensor``. Norms, heads, the latent adapter and scalars are
small and replicated. A dimension is split only when the axis size divides it (and divides
the number of heads for head dimensions); otherwise it is replicated: a fallback, never an
error. Batches, replay buffers and per-environment memories split their leading axis over
``data`` and ``fsdp`` together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import PartitionSpec as P

from rllama_jax.distributed.mesh import BATCH_AXES

# A dimension's entry: None (replicated), one axis name, or a tuple of axis names.
Axes = str | tuple[str, ...] | None


class Rule(NamedTuple):
    """A leaf whose path ends with ``suffix`` ("*" matches any key) is split as ``dims``
    (one entry per dimension); dimension ``heads`` (if any) holds heads x head_dim."""

    suffix: tuple[str, ...]
    dims: tuple[Axes, ...]
    heads: int | None = None


_IN = (None, "fsdp", "tensor")  # [L, D, heads * hd | F]: out to heads / MLP width
_OUT = (None, "tensor", "fsdp")  # [L, heads * hd | F, D]: back to the model width
_BASE = {
    "wq": (_IN, 2),
    "wk": (_IN, 2),
    "wv": (_IN, 2),
    "wo": (_OUT, 1),
    "w_gate": (_IN, None),
    "w_up": (_IN, None),
    "w_down": (_OUT, None),
}
# Keys of ``memory.latent.init_adapter``; all small.
LATENT_KEYS = ("slot_query", "slot_embed", "w_key", "w_value", "w_working", "w1", "b1", "w2", "b2")


def _lora_rules() -> list[Rule]:
    """LoRA ``a [L, in, r]`` / ``b [L, r, out]`` follow the tensor split of their base weight
    (so the adapter path needs no extra resharding) and are not split on fsdp (rank r is
    small: gathering them would cost more than storing them)."""
    rules = []
    for name, (dims, heads) in _BASE.items():
        in_axis = dims[1] if dims[1] == "tensor" else None
        out_axis = dims[2] if dims[2] == "tensor" else None
        rules.append(
            Rule(("lora", name, "a"), (None, in_axis, None), heads if heads == 1 else None)
        )
        rules.append(
            Rule(("lora", name, "b"), (None, None, out_axis), heads if heads == 2 else None)
        )
    return rules


RULES: tuple[Rule, ...] = (
    Rule(("embed",), ("tensor", "fsdp")),
    Rule(("lm_head",), ("fsdp", "tensor")),
    Rule(("final_norm",), (None,)),
    Rule(("layers", "attn_norm"), (None, None)),
    Rule(("layers", "mlp_norm"), (None, None)),
    *(Rule(("layers", name), dims, heads) for name, (dims, heads) in _BASE.items()),
    *_lora_rules(),
    Rule(("heads", "*", "*"), ()),  # value / Q / policy heads: replicated
    *(Rule((key,), ()) for key in LATENT_KEYS),  # latent-memory adapter: replicated
)


def path_keys(path: str | Sequence[Any]) -> tuple[str, ...]:
    """A tree path as plain strings: ``"layers/wq"`` or ``"layers.wq"``, or a JAX key path
    (``DictKey``, ``GetAttrKey``, ``SequenceKey``, ``FlattenedIndexKey``)."""
    if isinstance(path, str):
        return tuple(k for k in path.replace(".", "/").split("/") if k)
    out = []
    for k in path:
        if isinstance(k, str):
            out.append(k)
        elif isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(str(k.key))
        else:
            out.append(str(k))
    return tuple(out)


def match_rule(path: str | Sequence[Any]) -> Rule | None:
    """The first rule whose suffix ends ``path``, or None."""
    keys = path_keys(path)
    for rule in RULES:
        n = len(rule.suffix)
        if len(keys) >= n and all(
            p in ("*", k) for p, k in zip(rule.suffix, keys[-n:], strict=True)
        ):
            return rule
    return None


def fit_axes(dim: int, axes: Axes, axis_sizes: Mapping[str, int], unit: int = 1) -> Axes:
    """The longest prefix of ``axes`` whose total size divides ``dim // unit`` (size-1 axes
    dropped); None when nothing fits. ``unit`` keeps blocks whole (a head of ``unit`` rows)."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if axis_sizes.get(a, 1) > 1)
    while names and (dim % unit or (dim // unit) % math.prod(axis_sizes[a] for a in names)):
        names = names[:-1]
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _spec(dims: Sequence[Axes]) -> P:
    dims = list(dims)
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def param_spec(
    path: str | Sequence[Any],
    shape: Sequence[int],
    axis_sizes: Mapping[str, int],
    head_dim: int = 1,
) -> P:
    """The ``PartitionSpec`` of a parameter (or of optimizer state mirroring it).

    path: tree path (see ``path_keys``); shape: the leaf's shape; axis_sizes: mesh axis ->
    size (``dict(mesh.shape)``); head_dim: width of an attention head, so head dimensions are
    split between heads only (1 = any divisor). Leaves no rule names, and leaves whose rank
    differs from their rule's (e.g. factored optimizer moments), are replicated.
    """
    rule = match_rule(path)
    if rule is None or len(rule.dims) != len(shape):
        return P()
    return _spec(
        fit_axes(d, axes, axis_sizes, head_dim if i == rule.heads else 1)
        for i, (d, axes) in enumerate(zip(shape, rule.dims, strict=True))
    )


def batch_spec(shape: Sequence[int], axis_sizes: Mapping[str, int]) -> P:
    """Leading (batch / environment / replay-slot) axis over ``data`` and ``fsdp``; falls
    back to ``data`` alone, then to replication, when the size does not divide."""
    if not len(shape):
        return P()
    return _spec([fit_axes(shape[0], BATCH_AXES, axis_sizes)])


def state_spec(
    path: str | Sequence[Any],
    shape: Sequence[int],
    axis_sizes: Mapping[str, int],
    head_dim: int = 1,
) -> P:
    """The ``PartitionSpec`` of a ``TrainState`` leaf.

    ``replay``: slots on the batch axes (counters replicated); ``memory.working`` [E, ...]:
    environments on the batch axes; ``memory.episodic``: replicated (every environment's
    retrieval reads all slots); ``rng``, ``step``, ``skipped``: replicated; everything else
    (trainable, frozen, target, opt_state) by ``param_spec``.
    """
    keys = path_keys(path)
    top = keys[0] if keys else ""
    if top == "replay" or (top == "memory" and "working" in keys):
        return batch_spec(shape, axis_sizes)
    if top in ("memory", "rng", "step", "skipped"):
        return P()
    return param_spec(keys, shape, axis_sizes, head_dim)
