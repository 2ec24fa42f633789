"""Pallas attention under a device mesh: each device runs the kernel on its own rows and heads.

XLA cannot partition a Pallas custom call. Given q/k/v whose batch is split over devices, it
all-gathers them and every device computes the whole batch's attention (N times the work on N
devices). `shard_attention` runs the kernel inside `jax.shard_map` over the mesh of the
enclosing `jax.set_mesh` (how every o1jax train step and search sets its mesh) instead:

    batch   split over the `batch_axes` present in the mesh whose sizes divide B (in order);
            q, k, v, the key mask, the segment ids and the output alike
    heads   split over `head_axis` when it divides H and K; when it divides H but not K (fewer
            kv heads than tensor shards, e.g. a single kv head), k/v stay whole on every device
            and each device picks the one kv head its query heads read (that needs the G query
            heads of a group to span whole shards: G % (H / n) == 0); otherwise heads stay whole

Attention is independent per row and per head, so no collective runs inside the map (the
backward's dk/dv of a replicated kv head are summed over the head axis by shard_map's
transpose). Without a mesh, on a 1-device mesh, inside a caller's own shard_map, or when
nothing divides, the kernel is called as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax import lax
from jax.sharding import PartitionSpec as P


def context_mesh():
    """The mesh of the enclosing `jax.set_mesh` (abstract under jit), else None. (The deprecated
    `with mesh:` block sets no abstract mesh; under it the kernel is called unsharded.)"""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _axes_dividing(mesh, names: Sequence[str], dim: int) -> tuple[str, ...]:
    """The axes of `names` in `mesh` (size > 1) whose sizes, taken in order, divide `dim`."""
    chosen, size = [], 1
    for name in names:
        n = mesh.shape.get(name, 1)
        if n > 1 and dim % (size * n) == 0:
            chosen.append(name)
            size *= n
    return tuple(chosen)


def shard_attention(
    kernel: Callable,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    segment_ids: jax.Array | None = None,
    *,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
) -> jax.Array:
    """`kernel(q, k, v, mask, segment_ids)` run per device under the context mesh (see the
    module doc).

    q: [B, T, H, D]; k, v: [B, S, K, D]; mask: [B, S] or None; segment_ids: [B, T] or None.
    `kernel` sees the per-device shapes [B/n, T, H/m, D], [B/n, S, K/m or 1, D], [B/n, S],
    [B/n, T] and returns [B/n, T, H/m, D].
    """
    mesh = context_mesh()
    if mesh is None or mesh.size == 1 or mesh.manual_axes:  # inside a shard_map: already local
        return kernel(q, k, v, mask, segment_ids)
    b, _, h, _ = q.shape
    kv_heads = k.shape[2]
    rows = _axes_dividing(mesh, batch_axes, b) or None
    n = mesh.shape.get(head_axis, 1) if head_axis is not None else 1
    q_heads = kv_heads_ = None
    pick_kv = False  # k/v whole over the head axis; each device slices its one kv head
    if n > 1 and h % n == 0:
        if kv_heads % n == 0:
            q_heads = kv_heads_ = head_axis
        elif (h // kv_heads) % (h // n) == 0:
            q_heads, pick_kv = head_axis, True
    if rows is None and q_heads is None:
        return kernel(q, k, v, mask, segment_ids)

    extras = {"mask": mask, "segment_ids": segment_ids}
    given = [name for name, x in extras.items() if x is not None]

    def local(q, k, v, *rest):
        if pick_kv:  # this device's query heads [i * H/n, (i+1) * H/n) all read one kv head
            kv = lax.axis_index(head_axis) * (h // n) // (h // kv_heads)
            k, v = (lax.dynamic_slice_in_dim(x, kv, 1, axis=2) for x in (k, v))
        local_extras = dict.fromkeys(extras) | dict(zip(given, rest, strict=True))
        return kernel(q, k, v, local_extras["mask"], local_extras["segment_ids"])

    q_spec = P(rows, None, q_heads, None)
    kv_spec = P(rows, None, kv_heads_, None)
    in_specs = (q_spec, kv_spec, kv_spec) + (P(rows, None),) * len(given)  # [B, S] / [B, T]
    args = (q, k, v, *(extras[name] for name in given))
    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=q_spec,
        check_vma=False,  # pallas_call out_shapes carry no varying-axes annotation
    )
    return mapped(*args)
