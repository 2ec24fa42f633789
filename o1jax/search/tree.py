"""A batch of search trees over reasoning steps, held as device arrays (one row per problem).

Node 0 of every tree is the root: the problem itself, whose text is the prompt. Every other node
is one generated thought. Nodes are appended in expansion order, K at a time. A node's children
are the slots whose `parent` is that node: one block of K per expansion, and a node that is
widened (expanded again, `MCTSConfig.max_children`) has several blocks, not contiguous.
`first_child` points at each block, so a descent reads a node's E * K children, not all N slots.

Shapes: B trees, N node slots, K children per expansion, E expansions a node can have, L tokens
per thought.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from o1jax.parallel.mesh import constrain_rows

NO_NODE = -1
ROOT = 0


@struct.dataclass
class Tree:
    parent: jax.Array  # [B, N] int32, NO_NODE for the root and unused slots
    num_children: jax.Array  # [B, N] int32, children so far (0: unexpanded; K per expansion)
    # [B, N, E] int32, slot of the first of the K children of each expansion (NO_NODE: not yet):
    # a node's children are the K slots from each of these, so selection reads E * K of them
    # instead of scanning `parent` over all N
    first_child: jax.Array
    depth: jax.Array  # [B, N] int32, root 0
    visits: jax.Array  # [B, N] int32
    value_sum: jax.Array  # [B, N] float32, sum of backed-up (discounted) values
    prior_logit: jax.Array  # [B, N] float32, length-normalised log-prob of the thought
    entropy: jax.Array  # [B, N] float32, mean next-token entropy over the thought (0 if unread)
    varentropy: jax.Array  # [B, N] float32, mean next-token varentropy (0 if unread)
    rating: jax.Array  # [B, N] float32, P(<positive_rating>) / (P(pos) + P(neg)) of the thought
    terminal: jax.Array  # [B, N] bool, never expanded: a conclusion, truncated, or at max depth
    is_answer: jax.Array  # [B, N] bool, a complete <conclusion> thought (carries a final answer)
    reward: jax.Array  # [B, N] float32, answer-check reward of terminal nodes (0 if unknown)
    tokens: jax.Array  # [B, N, L] int32, thought tokens up to and including <end_of_thought>
    lengths: jax.Array  # [B, N] int32, tokens of each thought
    logprobs: jax.Array  # [B, N, L] float32, behaviour policy's log-prob of each token
    forced: jax.Array  # [B, N] bool, first token set by the search (a meta-action tag), not sampled
    num_nodes: jax.Array  # [B] int32, slots in use
    done: jax.Array  # [B] bool, search over (early stop after `patience` successes)

    @property
    def batch_size(self) -> int:
        return self.parent.shape[0]

    @property
    def capacity(self) -> int:
        return self.parent.shape[1]

    @property
    def expansions(self) -> int:
        return self.first_child.shape[-1]  # (also under vmap, without the batch axis)

    @property
    def thought_length(self) -> int:
        return self.tokens.shape[2]

    def q_values(self) -> jax.Array:
        """Mean backed-up value of each node [B, N] (the rating for a node never visited)."""
        return jnp.where(self.visits > 0, self.value_sum / jnp.maximum(self.visits, 1), self.rating)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def init_tree(batch_size: int, capacity: int, thought_length: int, expansions: int = 1) -> Tree:
    """B empty trees holding only their roots; each node can be expanded `expansions` times.
    Jitted: one program per shape rather than a fill op compiled per field. Under a mesh
    (`jax.set_mesh`) each field's trees are split over the batch axes, as the search's later
    trees are (their nodes come from the sampler's row-sharded output): the first simulation's
    programs then take the same shardings as the rest, and compile once."""
    b, n, length = batch_size, capacity, thought_length
    tree = Tree(
        parent=jnp.full((b, n), NO_NODE, jnp.int32),
        num_children=jnp.zeros((b, n), jnp.int32),
        first_child=jnp.full((b, n, expansions), NO_NODE, jnp.int32),
        depth=jnp.zeros((b, n), jnp.int32),
        visits=jnp.zeros((b, n), jnp.int32),
        value_sum=jnp.zeros((b, n), jnp.float32),
        prior_logit=jnp.zeros((b, n), jnp.float32),
        entropy=jnp.zeros((b, n), jnp.float32),
        varentropy=jnp.zeros((b, n), jnp.float32),
        rating=jnp.zeros((b, n), jnp.float32),
        terminal=jnp.zeros((b, n), bool),
        is_answer=jnp.zeros((b, n), bool),
        reward=jnp.zeros((b, n), jnp.float32),
        tokens=jnp.zeros((b, n, length), jnp.int32),
        lengths=jnp.zeros((b, n), jnp.int32),
        logprobs=jnp.zeros((b, n, length), jnp.float32),
        forced=jnp.zeros((b, n), bool),
        num_nodes=jnp.ones((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
    )
    return jax.tree.map(constrain_rows, tree)


def first_children(parent: jax.Array, num_children: int, expansions: int) -> jax.Array:
    """`Tree.first_child` [B, N, E] of trees given by their `parent` [B, N] whose children come in
    blocks of `num_children` consecutive slots per expansion (as the search appends them): for
    trees built by hand, which set `parent` directly. O(N^2); not for a per-step path.

    Concrete `parent` is checked: a node's children must fill whole blocks of `num_children`
    consecutive slots, at most `expansions` of them (ValueError naming the node); selection
    would not see the others.
    """
    if not isinstance(parent, jax.core.Tracer):
        _check_child_blocks(np.asarray(parent), num_children, expansions)
    b, n = parent.shape
    kids = parent[:, :, None] == jnp.arange(n)[None, None, :]  # [B, N(child), N(parent)]
    rank = jnp.cumsum(kids, axis=1) - 1  # [B, N, N], the child's order among its siblings
    starts = kids & (rank % num_children == 0)
    slot = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :, None], (b, n, n))
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, n, n))
    owner = jnp.broadcast_to(jnp.arange(n)[None, None, :], (b, n, n))
    block = jnp.where(starts, rank // num_children, expansions)  # out of range: dropped
    out = jnp.full((b, n, expansions), NO_NODE, jnp.int32)
    return out.at[rows, owner, block].set(slot, mode="drop")


def _check_child_blocks(parent: np.ndarray, k: int, expansions: int) -> None:
    """`first_children`'s layout: each node's children are whole blocks of k consecutive slots."""
    for b, row in enumerate(parent):
        for node in np.unique(row[row >= 0]):
            slots = np.flatnonzero(row == node)
            blocks = [slots[i : i + k] for i in range(0, len(slots), k)]
            whole = all(len(c) == k and c[-1] - c[0] == k - 1 for c in blocks)
            if not whole or len(blocks) > expansions:
                raise ValueError(
                    f"first_children: tree {b}, node {node} has children at slots "
                    f"{slots.tolist()}; they must come in blocks of {k} consecutive slots, at "
                    f"most {expansions} block(s)"
                )


def ancestors(tree: Tree, node: jax.Array, max_depth: int) -> jax.Array:
    """Ancestors [B, max_depth + 1] of `node` [B]: column k is the k-th parent (or NO_NODE)."""
    chex.assert_shape(node, (tree.batch_size,))

    def step(current, _):
        up = jnp.take_along_axis(tree.parent, jnp.maximum(current, 0)[:, None], 1)[:, 0]
        parent = jnp.where(current >= 0, up, NO_NODE)
        return parent, current

    _, chain = jax.lax.scan(step, node, None, length=max_depth + 1)
    return chain.T  # [B, D + 1]


def path_from_root(tree: Tree, node: jax.Array, max_depth: int) -> jax.Array:
    """Non-root nodes [B, max_depth] on the path to `node`, root's child first; NO_NODE after."""
    chain = ancestors(tree, node, max_depth)  # [B, D + 1], chain[:, k] at depth d(node) - k
    depth = jnp.take_along_axis(tree.depth, node[:, None], 1)  # [B, 1]
    j = jnp.arange(max_depth)[None, :]  # slot j holds the node at depth j + 1
    k = depth - 1 - j
    valid = k >= 0
    return jnp.where(valid, jnp.take_along_axis(chain, jnp.clip(k, 0, max_depth), 1), NO_NODE)
