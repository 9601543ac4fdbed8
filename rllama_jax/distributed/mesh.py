"""The device mesh: three named axes, built from a string such as ``"data:2,fsdp:2,tensor:1"``.

``data`` replicates the weights and splits the batch (plain data parallelism); ``fsdp`` splits
the batch too and also one big dimension of every weight and its optimizer state (ZeRO-3 /
fully sharded data parallelism); ``tensor`` splits attention heads and MLP width (Megatron
tensor parallelism). The mesh always has all three axes, in that order, so partition rules
can name any of them; ``tensor`` varies fastest, so its devices are neighbours (the fastest
links on a GPU node or a TPU slice).

Multi-host: every process runs the same program; ``maybe_initialize_distributed`` connects
them (``jax.distributed.initialize``) before JAX touches a device, after which
``jax.devices()`` lists the devices of all hosts and the mesh spans them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")
# The batch is split over both data-parallel axes (fsdp is data parallelism too).
BATCH_AXES = ("data", "fsdp")


def parse_mesh_spec(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """Axis sizes from ``"data:2,fsdp:2,tensor:1"``, in ``AXES`` order.

    Axes left out have size 1. One axis may be ``-1``: the devices the others leave (which
    needs ``num_devices``). When ``num_devices`` is given, the sizes must multiply to it.
    Raises ``ValueError`` naming what is wrong.
    """
    return _resolve(_axis_sizes(spec), num_devices, spec)


def check_mesh_spec(spec: str) -> None:
    """Raises ``ValueError`` naming what is wrong with ``spec``'s syntax (axes, sizes, at
    most one ``-1``) without looking at devices: for validating settings before JAX starts."""
    sizes = _axis_sizes(spec)
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")


def _axis_sizes(spec: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    entries = [e.strip() for e in spec.split(",")] if spec.strip() else []
    if not entries:
        raise ValueError(f"empty mesh spec; expected e.g. 'data:2,fsdp:2,tensor:1' (axes {AXES})")
    for entry in entries:
        name, sep, value = (part.strip() for part in entry.partition(":"))
        if not sep or not name or not value:
            raise ValueError(f"mesh spec entry {entry!r} in {spec!r} is not 'axis:size'")
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; axes are {AXES}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} appears twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} has size {value!r}, not an integer") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh axis {name!r} has size {size}; sizes are >= 1, or -1")
        sizes[name] = size
    return {a: sizes.get(a, 1) for a in AXES}


def _resolve(sizes: dict[str, int], num_devices: int | None, spec: Any) -> dict[str, int]:
    """Fills a ``-1`` axis and checks the product against the device count."""
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if num_devices is None:
            raise ValueError(f"mesh spec {spec!r}: -1 needs the device count")
        if num_devices % known:
            raise ValueError(
                f"mesh spec {spec!r}: {num_devices} devices do not divide into the other axes' "
                f"product {known}"
            )
        sizes[rest[0]] = num_devices // known
    if num_devices is not None and math.prod(sizes.values()) != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ValueError(
            f"mesh spec {spec!r} asks for {shape} = {math.prod(sizes.values())} devices, but "
            f"there are {num_devices}; make the sizes multiply to {num_devices} (or use -1 "
            "for one axis)"
        )
    return sizes


def make_mesh(
    spec: str | Mapping[str, int] = "data:-1", devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all
    devices of all processes).

    spec: a string for ``parse_mesh_spec`` or a mapping axis -> size (missing axes 1).
    Axes are ``Auto`` (the compiler propagates shardings from the arguments). On multi-slice
    TPU (devices with several ``slice_index`` values) the data axis spans the slices over
    the data-centre network and the rest stays within a slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, str):
        sizes = parse_mesh_spec(spec, len(devices))
    else:
        unknown = sorted(set(spec) - set(AXES))
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; axes are {AXES}")
        sizes = _resolve({a: int(spec.get(a, 1)) for a in AXES}, len(devices), dict(spec))
    shape = tuple(sizes[a] for a in AXES)
    axis_types = (AxisType.Auto,) * len(AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        n = len(slices)
        if shape[0] % n:
            raise ValueError(f"data={shape[0]} must be a multiple of the {n} slices")
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // n,) + shape[1:], (n, 1, 1), devices
        )
        return Mesh(grid, AXES, axis_types=axis_types)
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def maybe_initialize_distributed(enabled: bool, **kwargs: Any) -> bool:
    """Connects the processes of a multi-host job (``jax.distributed.initialize``); returns
    whether JAX runs distributed. Call it first thing, before any JAX computation.

    enabled: False does nothing (single-process runs). True initializes once: on Cloud TPU,
    SLURM, Open MPI and Kubernetes JAX finds the coordinator and process ids itself;
    elsewhere pass ``coordinator_address``, ``num_processes``, ``process_id`` as keywords or
    set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
    """
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if kwargs.get(key) is None and os.environ.get(env):
            kwargs[key] = int(os.environ[env])
    jax.distributed.initialize(**kwargs)
    return True
