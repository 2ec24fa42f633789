"""Prioritized experience replay whose whole state is a pytree of device arrays.

    state = init(capacity, example_item, alpha=0.6)
    state = add(state, items, priorities)                      # items: [M, ...] pytree
    items, indices, weights = sample(state, key, batch_size, beta)
    state = update(state, indices, new_priorities)

`add` and `update` donate `state`: its arrays are deleted, and only the returned state may be
used afterwards.

Priorities p^alpha live in a wide sum tree of branching factor F = `BRANCHING` and depth D, the
fewest levels below the root that hold the capacity (F^D >= capacity). A wide, shallow tree turns
the log2(N) dependent steps of a binary tree into D steps of F-wide vector work, which is what
both a CPU and an accelerator like. All levels share one flat array, root first (level d starts
at (F^d - 1) / (F - 1)), and the four scalars share two small arrays. The state thus has three
leaves besides the items: each leaf of a jitted call's arguments costs dispatch time.

Writes never update internal nodes by adding deltas: after the leaves change, every touched
ancestor is recomputed as the exact sum of its F children, level by level. Sums therefore never
drift (flashbax's incremental float32 tree drifts until it samples zero-priority items), at
O(M F D) per call. Sampling is stratified (one uniform draw in each of `batch_size` equal
slices of the total mass). It places all draws in the nodes of the deepest level with at most
`SCAN_LEVEL_SIZE` nodes at once (one prefix sum of that level and a binary search), then each
draw descends the levels below alone. It only ever enters nodes of positive mass, so items of
zero priority are never drawn. Duplicate indices in one write take their largest priority.

A priority is a finite number > 0; anything else (0, negative, NaN, inf) is stored as mass 0 and
never drawn, whatever alpha (even 0 ** 0). Writes at indices outside [0, capacity) are dropped.
"""

from __future__ import annotations

import functools
import operator

import chex
import jax
import jax.numpy as jnp
from flax import struct

BRANCHING = 16  # F, children per node
# Sampling searches the deepest level this small in one pass. XLA's CPU backend sums a cumsum
# of up to 256 in order; a longer one it sums in blocks (a level of 4 096 then needs a running
# maximum over it, which costs more than descending two levels instead of one).
SCAN_LEVEL_SIZE = 256


def _depth(capacity: int) -> int:
    """D, the fewest levels below the root whose F^D leaves hold `capacity` slots."""
    depth = 1
    while BRANCHING**depth < capacity:
        depth += 1
    return depth


def _offset(level: int) -> int:
    """Where `level` starts in the flat tree: 1 + F + ... + F^(level - 1)."""
    return (BRANCHING**level - 1) // (BRANCHING - 1)


@struct.dataclass
class PERState:
    items: object  # pytree, leaves [C, ...]
    tree: jax.Array  # [1 + F + ... + F^D] float32 sums of p^alpha, levels root first
    counters: jax.Array  # [2] int32: next slot to write (circular), items stored
    scalars: jax.Array  # [2] float32: largest raw priority seen (for priorities=None), alpha

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.items)[0].shape[0]

    @property
    def branching(self) -> int:
        return BRANCHING

    @property
    def depth(self) -> int:
        return _depth(self.capacity)

    @property
    def levels(self) -> tuple:
        """D + 1 views of the tree: [1], [F], [F^2], ..., [F^D]; the last are the leaves."""
        return tuple(_level(self.tree, d) for d in range(self.depth + 1))

    @property
    def position(self) -> jax.Array:
        """[] int32, the next slot to write."""
        return self.counters[0]

    @property
    def size(self) -> jax.Array:
        """[] int32, items stored."""
        return self.counters[1]

    @property
    def max_priority(self) -> jax.Array:
        """[] float32, the largest raw priority seen."""
        return self.scalars[0]

    @property
    def alpha(self) -> jax.Array:
        """[] float32, the priority exponent."""
        return self.scalars[1]

    @property
    def total(self) -> jax.Array:
        """Total mass sum(p^alpha) [] (the root)."""
        return self.tree[0]

    @property
    def leaf_mass(self) -> jax.Array:
        """p^alpha of every slot [C]."""
        return _level(self.tree, self.depth)[: self.capacity]


def _level(tree: jax.Array, level: int) -> jax.Array:
    """Level `level` [F^level] of the flat tree."""
    return tree[_offset(level) : _offset(level + 1)]


def init(capacity: int, example_item, alpha: float = 0.6) -> PERState:
    """An empty buffer of `capacity` items shaped like `example_item` (one item, no batch axis).
    alpha >= 0: the priority exponent."""
    capacity = _count("per.init", "capacity", capacity)
    if capacity < 1:
        raise ValueError(f"per.init: capacity must be >= 1, got {capacity}")
    if not isinstance(alpha, jax.core.Tracer) and not float(alpha) >= 0.0:  # NaN too
        raise ValueError(f"per.init: alpha must be >= 0, got {alpha}")
    items = jax.tree.map(
        lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example_item
    )
    return PERState(
        items=items,
        tree=jnp.zeros((_offset(_depth(capacity) + 1),), jnp.float32),
        counters=jnp.zeros((2,), jnp.int32),
        scalars=jnp.asarray([1.0, alpha], jnp.float32),
    )


def _count(where: str, name: str, value) -> int:
    """`value` as an int; a TypeError naming it otherwise (a float would fail in a shape)."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an int, got {value!r}") from None


def _shape(x):
    """The shape of an array, or the type's name of anything else (a list: under `jit`, a list
    of scalars)."""
    return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__


def _masses(priorities: jax.Array, alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(masses p^alpha [M], the priorities kept [M]): a priority that is not a finite number > 0
    becomes 0, and so does its mass (also at alpha = 0, where 0 ** 0 would be 1)."""
    p = priorities.astype(jnp.float32)
    p = jnp.where(jnp.isfinite(p) & (p > 0), p, 0.0)
    return jnp.where(p > 0, p**alpha, 0.0), p


def _children(tree: jax.Array, level: int, nodes: jax.Array) -> jax.Array:
    """The F children [M, F] in level + 1 of `nodes` [M] of `level`."""
    below = _level(tree, level + 1).reshape(-1, BRANCHING)
    return below.at[nodes].get(mode="promise_in_bounds")


def _run_nodes(position, m: int, capacity: int, span: int):
    """Nodes [K] of a level whose nodes cover `span` slots each, under the circular run of slots
    position, ..., position + m - 1 (mod capacity). K is static: the nodes from the run's first
    slot on, then from slot 0 for the part that wraps. Some may repeat or lie outside the run;
    recomputing those rewrites the sum they already hold. When K is at least the level's size,
    `_set_leaves` sums the level whole instead."""
    k = m // span + 2  # a run of m slots touches at most this many nodes before it wraps
    runs = jnp.concatenate([position // span + jnp.arange(k), jnp.arange(k)])
    return jnp.minimum(runs, (capacity - 1) // span)


def _set_leaves(
    tree: jax.Array, depth: int, slots, values, unique: bool, run=None, keep=None
) -> jax.Array:
    """Writes leaf masses [M] at `slots` [M] and recomputes their ancestors exactly. Duplicate
    slots (possible unless `unique`) take their largest value. run: (position [], m, capacity)
    when `slots` are the circular run position, ..., position + m - 1; then each level recomputes
    only the few nodes above the run (about m / span), not one node per slot. A level with no
    more nodes than would be recomputed is summed whole: a dense reduce and a contiguous write
    instead of a gather and a scatter. keep: optional [M] bool; writes where it is False are
    dropped (their slots must still be in range: their ancestors are recomputed, harmlessly)."""
    leaves = _offset(depth) + slots
    mode = "promise_in_bounds"
    if keep is not None:
        leaves, mode = jnp.where(keep, leaves, tree.shape[0]), "drop"
    if unique:
        tree = tree.at[leaves].set(values, mode=mode)
    else:
        tree = tree.at[leaves].set(0.0, mode=mode)
        tree = tree.at[leaves].max(values, mode=mode)
    nodes = slots
    for d in range(depth - 1, -1, -1):
        if run is None:
            nodes = nodes // BRANCHING
        else:
            span = BRANCHING ** (depth - d)  # slots under one node of level d
            nodes = _run_nodes(*run, span)
        if nodes.shape[0] >= BRANCHING**d:  # as many nodes as the level has: sum it whole
            sums = _level(tree, d + 1).reshape(-1, BRANCHING).sum(axis=1)
            tree = tree.at[_offset(d) : _offset(d + 1)].set(sums)
        else:
            sums = jnp.sum(_children(tree, d, nodes), axis=1)
            tree = tree.at[_offset(d) + nodes].set(sums, mode="promise_in_bounds")
    return tree


def _check_items(items, buffers) -> None:
    """Raises unless every leaf of `items` is [M, *item_shape] (M that of the first leaf) and
    casts same-kind to its buffer's dtype; names the leaf."""
    first = jax.tree.leaves(items)[0]
    m = first.shape[0] if first.ndim else "M"
    for (path, buf), x in zip(
        jax.tree_util.tree_leaves_with_path(buffers), jax.tree.leaves(items), strict=True
    ):
        name = jax.tree_util.keystr(path)
        want = (m, *buf.shape[1:])
        if x.shape != want:
            want = "(" + ", ".join(map(str, want)) + ("," if len(want) == 1 else "") + ")"
            raise ValueError(
                f"per.add: item {name} has shape {x.shape}, expected (M, *item_shape) = {want}"
            )
        if not jnp.can_cast(x.dtype, buf.dtype, casting="same_kind"):
            raise TypeError(
                f"per.add: item {name} has dtype {x.dtype}, which does not cast same-kind to "
                f"the buffer's {buf.dtype}"
            )


@functools.partial(jax.jit, donate_argnums=(0,))
def add(state: PERState, items, priorities=None, count=None) -> PERState:
    """Appends M items (overwriting the oldest when full). items: the buffer's pytree, each leaf
    [M, *item_shape] of a dtype that casts same-kind to the buffer's. priorities: [M] raw |td|
    values, or None for the largest priority seen so far. Stored as p^alpha.

    count: optional [] int in [0, M]: only the first `count` items are added (the rest of the
    batch is padding and takes no slot), so one compiled `add` serves any number of items.

    Donates `state`: use only the returned one.
    """
    chex.assert_trees_all_equal_structs(items, state.items)
    _check_items(items, state.items)
    m = jax.tree.leaves(items)[0].shape[0]
    if m > state.capacity:
        raise ValueError(f"per.add: {m} items exceed the capacity {state.capacity}")
    if m == 0:
        return state
    if priorities is None:
        priorities = jnp.full((m,), state.max_priority)
    if _shape(priorities) != (m,):
        raise ValueError(
            f"per.add: priorities must be an array [M] = ({m},), one per item, got "
            f"{_shape(priorities)}"
        )
    masses, priorities = _masses(priorities, state.alpha)
    slots = (state.position + jnp.arange(m)) % state.capacity  # [M]
    keep, item_slots, mode = None, slots, "promise_in_bounds"
    if count is not None:
        count = jnp.clip(jnp.asarray(count, jnp.int32), 0, m)
        keep = jnp.arange(m) < count  # [M]
        item_slots, mode = jnp.where(keep, slots, state.capacity), "drop"
        priorities = jnp.where(keep, priorities, 0.0)
    else:
        count = m
    new_items = jax.tree.map(
        lambda buf, x: buf.at[item_slots].set(x.astype(buf.dtype), mode=mode),
        state.items,
        items,
    )
    run = (state.position, m, state.capacity)
    tree = _set_leaves(state.tree, state.depth, slots, masses, unique=True, run=run, keep=keep)
    position = (state.position + count) % state.capacity
    size = jnp.minimum(state.size + count, state.capacity)
    max_priority = jnp.maximum(state.max_priority, jnp.max(priorities))
    return state.replace(
        items=new_items,
        tree=tree,
        counters=jnp.stack([position, size]),
        scalars=state.scalars.at[0].set(max_priority),
    )


def _scan_level(depth: int) -> int:
    """The deepest level (at least 1) with at most `SCAN_LEVEL_SIZE` nodes."""
    level = 1
    while level < depth and BRANCHING ** (level + 1) <= SCAN_LEVEL_SIZE:
        level += 1
    return level


def _descend(tree: jax.Array, depth: int, u):
    """(slots [B] whose cumulative-mass intervals hold the draws u [B], their masses [B]).

    The top of the tree is skipped: one prefix sum over a whole level of at most
    `SCAN_LEVEL_SIZE` nodes and a binary search of it place every draw in a node of that level
    at once. From there each draw descends alone, choosing at each level the first child whose
    cumulative mass exceeds it.

    A node of zero mass ends where its left neighbour ends, so it is never the first to exceed
    u; clamping u below the total of the nodes searched (their float32 sum may round below
    their parent's) keeps the choice in range. Items of zero priority are therefore never drawn.
    A backend may compute the cumsum in blocks (XLA's CPU backend does beyond 256 values), and
    then it can step up by an ulp at a zero-mass node that starts a block: a draw in that step
    would enter an empty node. A running maximum over the nonzero nodes' sums gives every
    zero-mass node its left neighbour's end again, exactly.
    """
    top = _scan_level(depth)
    mass_top = _level(tree, top)  # [F^top]
    level_cum = jnp.cumsum(mass_top)  # [F^top], inclusive
    level_cum = jax.lax.cummax(jnp.where(mass_top > 0, level_cum, -jnp.inf))  # leading zeros: -inf
    u = jnp.minimum(u, jnp.nextafter(level_cum[-1], 0.0))
    node = jnp.searchsorted(level_cum, u, side="right", method="scan").astype(jnp.int32)  # [B]
    node = jnp.minimum(node, mass_top.shape[0] - 1)  # in range when the tree has no mass
    if top == depth:  # the scanned level is the leaves
        return node, mass_top.at[node].get(mode="promise_in_bounds")
    before = jnp.where(node > 0, level_cum[jnp.maximum(node - 1, 0)], 0.0)  # [B]
    u = jnp.maximum(u - jnp.maximum(before, 0.0), 0.0)
    # Inclusive prefix sums within a node as one masked multiply-reduce, which XLA fuses into a
    # single loop (its cumsum is slow for short rows on a CPU, and a [B, F] x [F, F] dot costs a
    # library call per level).
    upper = jnp.triu(jnp.ones((BRANCHING, BRANCHING), jnp.float32))  # [F, F], i <= j
    for d in range(top, depth):
        mass = _children(tree, d, node)  # [B, F]
        cum = jnp.sum(mass[:, :, None] * upper[None], axis=1)  # [B, F]
        u = jnp.minimum(u, jnp.nextafter(cum[:, -1], 0.0))
        passed = cum <= u[:, None]  # children entirely before u
        child = jnp.sum(passed, axis=1, dtype=jnp.int32)
        u = jnp.maximum(u - jnp.sum(jnp.where(passed, mass, 0.0), axis=1), 0.0)
        node = node * BRANCHING + child
    return node, jnp.take_along_axis(mass, child[:, None], axis=1)[:, 0]


def sample(state: PERState, key: jax.Array, batch_size: int, beta: float):
    """(items [B, ...], indices [B], importance weights [B]) by stratified proportional sampling,
    B = batch_size >= 1, beta in [0, 1] (checked unless traced).

    weights = (N * P(i))^-beta / max over the batch, N the number of stored items. A buffer
    with no item of positive priority (empty, or only zeros) gives arbitrary in-range indices
    and weights 0, which leave a weighted loss unmoved; check `state.total > 0` to tell.
    """
    batch_size = _count("per.sample", "batch_size", batch_size)
    if batch_size < 1:
        raise ValueError(f"per.sample: batch_size must be >= 1, got {batch_size}")
    if not isinstance(beta, jax.core.Tracer) and not 0.0 <= float(beta) <= 1.0:  # NaN too
        raise ValueError(f"per.sample: beta must be in [0, 1], got {beta}")
    return _sample(state, key, batch_size, beta)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _sample(state: PERState, key: jax.Array, batch_size: int, beta):
    """`sample` without its checks."""
    total = state.total
    offsets = jax.random.uniform(key, (batch_size,))
    u = (jnp.arange(batch_size) + offsets) / batch_size * total  # one draw per stratum
    indices, mass = _descend(state.tree, state.depth, u)  # [B], [B]
    # (N P(i))^-beta / max_j (N P(j))^-beta = (min_j P(j) / P(i))^beta: N and the total mass
    # cancel, and the ratio stays in (0, 1]. The masses come from the descent's own reads, so
    # every read of the tree here feeds `indices`: an `update` of them in the same program is
    # ordered after all of them and writes the tree in place (reading the root for the weights
    # made XLA copy the whole tree before each such update).
    weights = jnp.where(mass > 0, (jnp.min(mass) / jnp.where(mass > 0, mass, 1.0)) ** beta, 0.0)
    indices = jnp.minimum(indices, state.capacity - 1)  # in range even with no mass at all
    items = jax.tree.map(lambda buf: buf.at[indices].get(mode="promise_in_bounds"), state.items)
    return items, indices, weights


@functools.partial(jax.jit, donate_argnums=(0,))
def update(state: PERState, indices: jax.Array, priorities: jax.Array) -> PERState:
    """New raw priorities [M] for the items at `indices` [M] (duplicates: the largest wins;
    indices outside [0, capacity) are ignored). Donates `state`: use only the returned one."""
    shapes = _shape(indices), _shape(priorities)
    if not isinstance(shapes[0], tuple) or len(shapes[0]) != 1 or shapes[1] != shapes[0]:
        raise ValueError(
            f"per.update: indices and priorities must both be arrays [M], got {shapes[0]} and "
            f"{shapes[1]}"
        )
    if indices.shape[0] == 0:
        return state
    masses, priorities = _masses(priorities, state.alpha)
    keep = (indices >= 0) & (indices < state.capacity)  # [M]
    slots = jnp.where(keep, indices, 0)
    tree = _set_leaves(state.tree, state.depth, slots, masses, unique=False, keep=keep)
    priorities = jnp.where(keep, priorities, 0.0)
    max_priority = jnp.maximum(state.max_priority, jnp.max(priorities))
    return state.replace(tree=tree, scalars=state.scalars.at[0].set(max_priority))


def beta_schedule(step, beta0: float = 0.4, beta1: float = 1.0, steps: int = 100_000) -> float:
    """LLaMA-O1's annealing of the importance-sampling exponent, linear over `steps` samples
    (0: beta1 from the first); beta0 and beta1 in [0, 1] (`sample` takes no other)."""
    for name, beta in (("beta0", beta0), ("beta1", beta1)):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"per.beta_schedule: {name} must be in [0, 1], got {beta}")
    if steps <= 0:
        return beta1
    frac = min(max(float(step) / steps, 0.0), 1.0)
    return beta0 + (beta1 - beta0) * frac
