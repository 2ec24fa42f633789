"""Device meshes and partition rules for Gemma2 params, LoRA adapters and batches.

Axes: `data` (pure data parallel: params replicated), `fsdp` (data parallel with params sharded
along their input dimension, all-gathered per layer by XLA), `tensor` (Megatron-style: heads and
FFN columns split). A batch is split over ("data", "fsdp").

A rule names an axis for each dimension; a dimension that the axis size does not divide is left
replicated instead (tiny models have single kv heads), so the same rules serve every model size.
Given the model's config (`heads=cfg`), `tensor` splits the attention projections only in whole
heads: q/o when it divides the query heads, k/v when it divides the kv heads, else they stay
replicated over it (Megatron's and MaxText's layout: Gemma2-2B's 4 kv heads at tensor 8 are
computed whole on every device, not all-gathered in every layer from half heads).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:
    from o1jax.model.config import Gemma2Config

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex over the '/'-joined param path, one mesh axis or None per dimension)
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embedder/embedding$", ("tensor", "fsdp")),  # [V, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),  # [D, out]
    (r"(o_proj|down_proj)/kernel$", ("tensor", "fsdp")),  # [in, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/a$", ("fsdp", None)),  # LoRA A [D, r]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/b$", (None, "tensor")),  # LoRA B [r, out]
    (r"(o_proj|down_proj)/a$", ("tensor", None)),  # LoRA A [in, r]
    (r"(o_proj|down_proj)/b$", (None, "fsdp")),  # LoRA B [r, D]
    (r"scale$", (None,)),  # norms [D]
)
# Params whose "tensor" dimension holds attention heads, head-major with `head_dim` each (q_proj's
# outputs and o_proj's inputs H*Hd; k_proj's and v_proj's outputs K*Hd), and the config field
# that counts those heads.
HEAD_PARAMS: tuple[tuple[str, str], ...] = (
    (r"(q_proj|o_proj)/(kernel|a|b)$", "num_heads"),
    (r"(k_proj|v_proj)/(kernel|a|b)$", "num_kv_heads"),
)


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when a multi-host environment is detected.

    JAX auto-detects the coordinator on TPU pods, SLURM and Open MPI; we start it when one of the
    usual variables is present. Returns whether it ran.
    """
    markers = (
        "JAX_COORDINATOR_ADDRESS",
        "COORDINATOR_ADDRESS",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    )
    if not any(os.environ.get(m) for m in markers):
        return False
    if os.environ.get("SLURM_NTASKS") == "1" or os.environ.get("OMPI_COMM_WORLD_SIZE") == "1":
        return False
    jax.distributed.initialize()
    return True


def mesh_shape(shape: dict[str, int], num_devices: int | None = None) -> dict[str, int]:
    """The size of every axis of `shape` (missing axes: 1), its -1 axis (at most one) given the
    rest of `num_devices`. Raises ValueError for an unknown axis, a size that is not an int >= 1
    or -1, or a shape that does not use exactly `num_devices` devices (when given; it must be when
    an axis is -1).
    """
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; axes are {AXES}")
    sizes = {a: shape.get(a, 1) for a in AXES}
    bad = {
        a: s
        for a, s in sizes.items()
        if not isinstance(s, int) or isinstance(s, bool) or (s != -1 and s < 1)
    }
    if bad:
        raise ValueError(f"mesh: axis sizes must be ints >= 1, or -1 for the rest; got {bad}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    if num_devices is None:
        if free:
            raise ValueError(f"mesh: the -1 axis {free[0]!r} needs the number of devices")
        return sizes
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices do not divide by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh: shape {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}"
        )
    return sizes


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor). `shape` may give -1 for one axis (all the rest).

    `make_mesh()` puts every device on `data`; `make_mesh({"fsdp": -1})` shards params instead.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(dict(shape or {"data": -1}), len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in AXES])
    return Mesh(grid, AXES)


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def _splits(path: str, axis: str | None, dim: int, mesh: Mesh, heads) -> bool:
    """Whether `axis` splits dimension `dim` of the param at `path` (see `spec_for`)."""
    if axis is None:
        return False
    whole = dim  # the units a split must not cut: heads of a head dimension, else elements
    if axis == "tensor" and heads is not None:
        for pattern, field in HEAD_PARAMS:
            if re.search(pattern, path):
                whole = getattr(heads, field)
                if dim != whole * heads.head_dim:
                    raise ValueError(
                        f"{path}: dimension {dim} is not {field}={whole} x "
                        f"head_dim={heads.head_dim} of the model config"
                    )
                break
    return mesh.shape[axis] > 1 and whole % mesh.shape[axis] == 0


def spec_for(
    path: str, shape: tuple[int, ...], mesh: Mesh, heads: Gemma2Config | None = None
) -> PartitionSpec:
    """The PartitionSpec of one array, by the first matching rule (replicated if none).

    heads: the model's config (its num_heads, num_kv_heads, head_dim): the q/k/v/o dimensions of
    HEAD_PARAMS are then split over "tensor" only in whole heads. Without it, any dimension the
    axis divides is split, mid-head if need be.
    """
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path) and len(axes) == len(shape):
            dims = [
                ax if _splits(path, ax, dim, mesh, heads) else None
                for ax, dim in zip(axes, shape, strict=True)
            ]
            return PartitionSpec(*dims)
    return PartitionSpec()


def param_shardings(tree, mesh: Mesh, heads: Gemma2Config | None = None):
    """A pytree of NamedShardings matching `tree` (params, LoRA weights, or optimizer state);
    `heads`: the model's config, for whole-head tensor splits (`spec_for`)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(_path_str(p), tuple(np.shape(x)), mesh, heads)),
        tree,
    )


def shard_params(tree, mesh: Mesh, heads: Gemma2Config | None = None):
    """Places every array of `tree` on `mesh` by the partition rules."""
    return jax.device_put(tree, param_shardings(tree, mesh, heads))


def copy_to_mesh(tree, mesh: Mesh, heads: Gemma2Config | None = None):
    """A copy of `tree` laid out on `mesh` by the partition rules that shares no buffer with it,
    for state that a step donates. (`jax.device_put(..., may_alias=False)` still hands a
    single-device array's own buffer to a replicated layout's first device, and the donating
    step then deletes the caller's array.)"""
    shardings = param_shardings(tree, mesh, heads)
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def init_sharded(init_fn, tree, mesh: Mesh, heads: Gemma2Config | None = None):
    """`init_fn(tree)` (an optimizer's init) laid out by the partition rules from the start: a
    plain jit would make Adam's moments whole on every device until the first step."""
    shardings = param_shardings(jax.eval_shape(init_fn, tree), mesh, heads)
    return jax.jit(init_fn, out_shardings=shardings)(tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dimension split over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(tree, mesh: Mesh):
    return jax.device_put(tree, jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), tree))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x, *spec):
    """`x` laid out as `spec` (one mesh axis, a tuple of them, or None per dimension) on the
    mesh of the enclosing `jax.set_mesh`; a dimension its axes do not divide, or whose axes the
    mesh lacks, is not split (replicated, whatever layout `x` had). No mesh: `x` unchanged.

    fsdp splits the params' D over the same devices that split the batch. Left to itself, with
    one or a few rows per device, XLA contracted over the split D instead of gathering the
    params: every device computed the whole batch's activations and logits from its slice of D,
    and all-reduced them (Gemma2-2B's PPO step: [64, 1245, 9216] MLP activations on each of 8
    devices). Pinning the rows of the residual stream, hidden states and logits to their devices
    keeps FSDP's layout: each device its own rows, the params all-gathered.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    dims = []
    for dim, axes in zip(x.shape, spec, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if not names or not set(names) <= set(mesh.axis_names):
            dims.append(None)
            continue
        size = math.prod(mesh.shape[name] for name in names)
        dims.append(axes if size > 1 and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*dims))


def constrain_rows(x):
    """`x` [B, ...] with its rows split over the batch axes ("data", "fsdp"), the rest whole."""
    return constrain(x, BATCH_AXES, *([None] * (x.ndim - 1)))


def micro_batches(x, n: int):
    """[B, ...] -> [n, B/n, ...] for gradient accumulation: micro-batch i holds rows i, n+i,
    2n+i, ... so that each device keeps its own rows (a device's contiguous rows split evenly
    over the micro-batches). `unmicro_batches` is its inverse."""
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, None, BATCH_AXES, *([None] * (x.ndim - 2)))


def unmicro_batches(x):
    """[n, B/n, ...] from `micro_batches` -> [B, ...] in the original row order."""
    n, rows = x.shape[:2]
    return x.swapaxes(0, 1).reshape(n * rows, *x.shape[2:])
