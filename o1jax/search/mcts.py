"""Batched MCTS over reasoning steps (LLaMA-O1's search, compiled and batched over problems).

One simulation, for all B trees at once:

1. `select`: descend from the root by PUCT (or UCT) to a leaf, a vmapped `while_loop`. PUCT is
   LLaMA-O1's: `Q + c softmax(priors)[child] sqrt(sum of the children's visits) / (1 + visits)`,
   a child's prior being exp(its length-normalised log-prob). The descent stops early at a
   node that widens: one whose children disappoint and that has fewer than `max_children`.
2. `expand_fn`: K candidate thoughts for all B selected nodes in ONE sampler call (B * K rows,
   each node's prefix prefilled once), each valued by the model's own rating tokens.
3. host: terminal thoughts that state a final answer are checked against the ground truth (only
   when rewards are wanted: self-play). This is the only host step of a simulation.
4. `insert_and_backup`: children written into the arena; a value is backed up to the root
   with a discount per level above the node it was measured at: the best (or mean) of the new
   children's values, one level above them, or a terminal leaf's own value, from the leaf.

Terminal nodes (conclusions, truncated thoughts, nodes at max depth) never expand; they end a
path with the answer check's reward in self-play (0 for a truncated thought or a thought at max
depth that states no answer) and with their rating otherwise.

LLaMA-O1's selection extras (the siblings' entropies in the prior, a varentropy bonus), its
widening and its meta-actions are options (`MCTSConfig`), off by default: on the default task
they searched worse (bench/RESULTS.md). A small uniform noise (`MCTSConfig.noise`) breaks ties.
Widening compares the value a node's best child passes up (discounted once) with the node's own,
where LLaMA-O1 compares the child's undiscounted log-value (see `_select_one`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from o1jax.search.tree import NO_NODE, ROOT, Tree, ancestors, init_tree, path_from_root


def check_fields(config, **ranges) -> None:
    """Raises a ValueError naming the first field of `config` out of its range.

    ranges: field -> (kind, lo, hi): an int field must be an integer (bool excluded), a float
    field a finite real number; both within [lo, hi] (None: unbounded).
    """
    name = type(config).__name__
    for field, (kind, lo, hi) in ranges.items():
        value = getattr(config, field)
        if kind is int:
            ok, what = isinstance(value, (int, np.integer)), "an int"
        else:
            real = isinstance(value, (int, float, np.integer, np.floating))
            ok, what = real and bool(np.isfinite(value)), "a finite number"
        if not ok or isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name}.{field} must be {what}, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bound = f">= {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
            raise ValueError(f"{name}.{field} must be {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    """Search hyper-parameters (LLaMA-O1's defaults where it had them)."""

    num_simulations: int = 16
    num_children: int = 2  # K candidates sampled per expansion
    # A node with children is expanded again (K more) while it has fewer than this many and its
    # best child passes up less than the node's own value (LLaMA-O1's `should_expand`: 5).
    # 0 (or num_children): every node is expanded once. On the default task at 16 simulations,
    # 5 left 136 of 200 trees without a conclusion (bench/RESULTS.md).
    max_children: int = 0
    # V nodes selected per tree and simulation, all expanded in the same sampler call (B * V * K
    # rows). Each pending selection puts a virtual loss on its path, one visit of value 0, so the
    # next one tends elsewhere. A node picked twice in one simulation is expanded once.
    leaves_per_tree: int = 1
    # LLaMA-O1's meta-actions: with this probability an expansion's K thoughts start with tags
    # the search draws, one per thought, from `meta_action_weights` over (<expansion>,
    # <critic>, <refine>, <conclusion>); otherwise the policy writes its own tag. LLaMA-O1:
    # 0.5, and weights 0.2, 0.4, 0.4, 0.3 over (<problem>, <critic>, <refine>, <conclusion>).
    meta_action_prob: float = 0.0
    meta_action_weights: tuple[float, ...] = (0.2, 0.4, 0.4, 0.3)
    max_depth: int = 8  # thoughts on a path below the root
    thought_length: int = 64  # token budget of one thought (L)
    selection: str = "puct"  # "puct" or "uct"
    c_puct: float = 1.4
    discount: float = 0.9  # per level of backup
    backup: str = "max"  # leaf value from its new children: "max" or "mean"
    patience: int = 0  # stop a tree after this many correct answers (0: never)
    temperature: float = 1.5  # of the thoughts' sampling
    top_k: int = 0
    top_p: float = 1.0
    noise: float = 1e-3  # scale of the random tie-breaking term in selection
    # LLaMA-O1's PUCT extras: the prior times the softmax of the siblings' mean entropies (on in
    # some versions of its select_action, commented out in others), and varentropy_bonus * the
    # softmax of their mean varentropies (LLaMA-O1: 0.1).
    entropy_prior: bool = False
    varentropy_bonus: float = 0.0

    def __post_init__(self):
        if self.selection not in ("puct", "uct"):
            raise ValueError(
                f"MCTSConfig.selection must be 'puct' or 'uct', got {self.selection!r}"
            )
        if self.backup not in ("max", "mean"):
            raise ValueError(f"MCTSConfig.backup must be 'max' or 'mean', got {self.backup!r}")
        check_fields(
            self,
            num_simulations=(int, 1, None),
            num_children=(int, 1, None),
            max_children=(int, 0, None),
            leaves_per_tree=(int, 1, None),
            max_depth=(int, 1, None),
            thought_length=(int, 1, None),
            patience=(int, 0, None),
            top_k=(int, 0, None),
            c_puct=(float, 0.0, None),
            temperature=(float, 0.0, None),
            noise=(float, 0.0, None),
            varentropy_bonus=(float, 0.0, None),
        )
        if not isinstance(self.entropy_prior, bool):
            raise ValueError(f"MCTSConfig.entropy_prior must be a bool, got {self.entropy_prior!r}")
        if self.selection == "uct" and (self.entropy_prior or self.varentropy_bonus):
            raise ValueError("MCTSConfig.entropy_prior and varentropy_bonus are terms of PUCT")
        if 0 < self.max_children < self.num_children:
            raise ValueError(
                f"MCTSConfig.max_children must be 0 or >= num_children ({self.num_children}), "
                f"got {self.max_children}"
            )
        if not 0.0 < self.discount <= 1.0:  # NaN fails too
            raise ValueError(f"MCTSConfig.discount must be in (0, 1], got {self.discount}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"MCTSConfig.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.meta_action_prob <= 1.0:  # NaN fails too
            raise ValueError(
                f"MCTSConfig.meta_action_prob must be in [0, 1], got {self.meta_action_prob}"
            )
        weights = self.meta_action_weights
        if len(weights) != 4 or not all(w >= 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(
                "MCTSConfig.meta_action_weights must be 4 weights >= 0 with a positive sum "
                f"(<expansion>, <critic>, <refine>, <conclusion>), got {weights}"
            )

    @property
    def capacity(self) -> int:
        return 1 + self.num_simulations * self.leaves_per_tree * self.num_children

    @property
    def expansions_per_node(self) -> int:
        """E: how many times a node can be expanded (K children each), 1 without widening."""
        return max(1, -(-self.max_children // self.num_children))


@struct.dataclass
class Expansion:
    """K candidate thoughts for each of B leaves."""

    tokens: jax.Array  # [B, K, L] int32
    lengths: jax.Array  # [B, K] int32
    logprobs: jax.Array  # [B, K, L] float32 behaviour log-probs
    stopped: jax.Array  # [B, K] bool, ended with <end_of_thought> (not truncated)
    is_answer: jax.Array  # [B, K] bool, a complete <conclusion> thought
    rating: jax.Array  # [B, K] float32 in [0, 1]
    reward: jax.Array  # [B, K] float32, filled on the host for answers (else 0)
    # [B, K] float32 mean next-token entropy / varentropy over each thought (None: not read;
    # PUCT's `entropy_prior` and `varentropy_bonus` need them)
    entropy: jax.Array | None = None
    varentropy: jax.Array | None = None
    # [B, K] bool: the thought's first token was forced (a meta-action tag the search drew), so
    # it is no choice of the policy: neither its prior nor PPO counts it (None: none forced)
    forced: jax.Array | None = None


# ----------------------------------------------------------------------------- selection
# A node widens only when its children fall short of it by more than this: ties (a parent whose
# Q is exactly what its one visited child passed up) stay ties whatever float32 rounding does.
WIDEN_MARGIN = 1e-6


def check_expansions(tree: Tree, config: MCTSConfig) -> None:
    """Trees must have room for every expansion the config allows a node (`init_tree`'s E)."""
    if tree.expansions < config.expansions_per_node:
        raise ValueError(
            f"Tree.first_child has room for {tree.expansions} expansion(s) per node, but "
            f"max_children {config.max_children} with {config.num_children} children per "
            f"expansion needs {config.expansions_per_node}: build the tree with "
            "init_tree(..., expansions=config.expansions_per_node)"
        )


def _select_one(tree: Tree, key, config: MCTSConfig):
    """The node one tree expands next (arrays without the batch axis): the descent from the root
    follows the best-scoring child until it reaches a node with no children, a terminal node, or
    a node that widens.

    A node widens (LLaMA-O1's `should_expand`) while it has fewer than `max_children` children
    and the best of them passes up less than the node's value: discount * max child Q < Q(node)
    by more than float32 rounding (`WIDEN_MARGIN`). LLaMA-O1 compares the undiscounted child
    values in log-probability units, where the discount raises a parent above its children, so
    its nodes widen on every visit until they have 5 or more; here, in [0, 1] units, a node
    widens when its children disappoint. The root has no value of its own (its Q is only what
    its children pass up, so the test would compare a number with itself): it widens whenever
    it has room, as every node does in LLaMA-O1.
    """
    q_all = tree.q_values()  # [N]
    visits = tree.visits.astype(jnp.float32)  # [N]
    k, e = config.num_children, tree.expansions

    def children(node):
        """The node's child slots [E * K] in sibling order, and which of them exist [E * K]."""
        first = tree.first_child[node]  # [E]
        slots = first[:, None] + jnp.arange(k)[None, :]  # [E, K]
        exists = jnp.broadcast_to((first != NO_NODE)[:, None], (e, k))
        return jnp.where(exists, slots, ROOT).reshape(-1), exists.reshape(-1)

    def widens(node):
        slots, exists = children(node)  # [C]
        best = jnp.max(jnp.where(exists, q_all[slots], -jnp.inf))
        room = tree.num_children[node] < config.max_children
        disappoint = config.discount * best < q_all[node] - WIDEN_MARGIN
        return room & ((node == ROOT) | disappoint)

    def cond(node):
        # Children are read through first_child: a hand-built tree without it ends here.
        expanded = (tree.num_children[node] > 0) & (tree.first_child[node, 0] != NO_NODE)
        return expanded & ~tree.terminal[node] & ~widens(node)

    def body(node):
        slots, exists = children(node)  # [C]
        q = q_all[slots]  # [C]
        n = jnp.where(exists, visits[slots], 0.0)  # [C]
        if config.selection == "puct":
            # LLaMA-O1: a child's prior is exp(its length-normalised log-prob), the score takes
            # the softmax of the children's priors and the square root of their summed visits.
            prior = jax.nn.softmax(jnp.where(exists, jnp.exp(tree.prior_logit[slots]), -jnp.inf))
            if config.entropy_prior:
                prior = prior * jax.nn.softmax(jnp.where(exists, tree.entropy[slots], -jnp.inf))
            score = q + config.c_puct * prior * jnp.sqrt(jnp.sum(n)) / (1.0 + n)  # [C]
            if config.varentropy_bonus:
                bonus = jax.nn.softmax(jnp.where(exists, tree.varentropy[slots], -jnp.inf))
                score = score + config.varentropy_bonus * bonus
        else:
            parent_n = visits[node]
            score = q + config.c_puct * jnp.sqrt(jnp.log(parent_n + 1.0) / (n + 1e-6))
        # Tie-breaking noise by order among the siblings, K draws per expansion (the first
        # expansion's draws do not depend on max_children).
        node_key = jax.random.fold_in(key, node)
        noise = jnp.concatenate(
            [jax.random.uniform(node_key, (k,))]
            + [jax.random.uniform(jax.random.fold_in(node_key, j), (k,)) for j in range(1, e)]
        )  # [C]
        score = score + config.noise * noise
        return slots[jnp.argmax(jnp.where(exists, score, -jnp.inf))]

    return jax.lax.while_loop(cond, body, jnp.asarray(ROOT, jnp.int32))


@functools.partial(jax.jit, static_argnames=("config",))
def select(tree: Tree, key: jax.Array, config: MCTSConfig) -> jax.Array:
    """The node [B] each tree expands next: a leaf, a terminal node, or a node that widens."""
    check_expansions(tree, config)
    keys = jax.random.split(key, tree.batch_size)
    return jax.vmap(functools.partial(_select_one, config=config))(tree, keys)


@functools.partial(jax.jit, static_argnames=("config",))
def select_with_virtual_loss(tree: Tree, key: jax.Array, config: MCTSConfig):
    """`config.leaves_per_tree` (V) nodes per tree, chosen one after another, each after a
    virtual loss (one visit of value 0) on the paths of those before it.

    Returns (nodes [B, V], fresh [B, V]): `fresh` is False for a node already chosen earlier in
    the same call (it is expanded once). The first column is `select(tree, key, config)`.
    """
    b, v = tree.batch_size, config.leaves_per_tree
    rows = jnp.arange(b)[:, None]
    nodes = []
    pending = tree
    for j in range(v):  # V is a small static count
        node = select(pending, key if j == 0 else jax.random.fold_in(key, j), config)  # [B]
        nodes.append(node)
        path = ancestors(pending, node, config.max_depth)  # [B, D + 1]
        idx = jnp.where(path != NO_NODE, path, tree.capacity)
        pending = pending.replace(visits=pending.visits.at[rows, idx].add(1, mode="drop"))
    nodes = jnp.stack(nodes, axis=1)  # [B, V]
    earlier = jnp.tril(jnp.ones((v, v), bool), k=-1)  # [V, V], u < j
    repeats = (nodes[:, :, None] == nodes[:, None, :]) & earlier[None]  # [B, V, V]
    return nodes, ~jnp.any(repeats, axis=2)


# ----------------------------------------------------------------------------- insert + backup
def child_values(expansion: Expansion, depth: jax.Array, config: MCTSConfig, use_rewards: bool):
    """Terminal flags [B, K] and values [B, K] of new children at `depth` [B]."""
    at_max = (depth + 1 >= config.max_depth)[:, None]
    terminal = expansion.is_answer | ~expansion.stopped | at_max
    if use_rewards:
        value = jnp.where(terminal, expansion.reward, expansion.rating)
    else:
        value = expansion.rating
    return terminal, value


@functools.partial(jax.jit, static_argnames=("config", "use_rewards"), donate_argnums=(0,))
def insert_and_backup(
    tree: Tree,
    leaf: jax.Array,
    expansion: Expansion,
    config: MCTSConfig,
    use_rewards: bool,
    fresh: jax.Array | None = None,
) -> Tree:
    """Adds the K children of every expandable leaf and backs the values up to the roots.

    A tree whose leaf is terminal, or not `fresh` [B] (default: all are), or whose arena has no
    room for K more nodes, gets no children; the leaf's own value is backed up again. Trees that
    are `done` are left untouched. Either way an ancestor k levels above the node whose value is
    backed up gets discount^k of it.

    Donates `tree`: its arrays are deleted, use only the returned one.
    """
    return _insert_and_backup(tree, leaf, expansion, config, use_rewards, fresh)


@functools.partial(jax.jit, static_argnames=("config", "use_rewards"), donate_argnums=(0,))
def insert_and_backup_many(
    tree: Tree,
    nodes: jax.Array,
    fresh: jax.Array,
    expansion: Expansion,
    config: MCTSConfig,
    use_rewards: bool,
) -> Tree:
    """`insert_and_backup` of V selected nodes per tree, one after another.

    nodes, fresh: [B, V] from `select_with_virtual_loss`; expansion: [B, V, K, ...].
    Donates `tree`: its arrays are deleted, use only the returned one.
    """
    chex.assert_shape(nodes, (tree.batch_size, config.leaves_per_tree))
    for j in range(nodes.shape[1]):
        column = jax.tree.map(lambda x, j=j: x[:, j], expansion)
        tree = _insert_and_backup(tree, nodes[:, j], column, config, use_rewards, fresh[:, j])
    return tree


def _insert_and_backup(tree, leaf, expansion, config, use_rewards, fresh):
    b, k = tree.batch_size, config.num_children
    check_expansions(tree, config)
    chex.assert_shape(leaf, (b,))
    chex.assert_shape(expansion.rating, (b, k))
    for name in ("tokens", "logprobs"):
        shape = getattr(expansion, name).shape
        if shape != (b, k, tree.thought_length):
            raise ValueError(
                f"insert_and_backup: Expansion.{name} has shape {shape}, expected [B, K, L] = "
                f"{(b, k, tree.thought_length)} (L: the tree's thought length)"
            )
    rows = jnp.arange(b)
    leaf_depth = tree.depth[rows, leaf]
    leaf_terminal = tree.terminal[rows, leaf]
    expand = ~tree.done & ~leaf_terminal & (tree.num_nodes + k <= tree.capacity)
    if fresh is not None:
        chex.assert_shape(fresh, (b,))
        expand = expand & fresh
    terminal, value = child_values(expansion, leaf_depth, config, use_rewards)

    # Children go to slots [num_nodes, num_nodes + K); non-expanding trees write out of bounds.
    slots = tree.num_nodes[:, None] + jnp.arange(k)[None, :]  # [B, K]
    slots = jnp.where(expand[:, None], slots, tree.capacity)
    r = rows[:, None]
    # Prior: the mean log-prob of the tokens the policy chose (a forced tag is not one of them).
    logprobs, lengths = expansion.logprobs, expansion.lengths
    if expansion.forced is not None:
        chosen = jnp.arange(logprobs.shape[-1]) >= expansion.forced[..., None].astype(jnp.int32)
        logprobs = jnp.where(chosen, logprobs, 0.0)
        lengths = lengths - expansion.forced.astype(lengths.dtype)
    mean_logp = jnp.sum(logprobs, axis=-1) / jnp.maximum(lengths, 1).astype(jnp.float32)
    set_ = lambda field, v: field.at[r, slots].set(v, mode="drop")
    tree = tree.replace(
        parent=set_(tree.parent, jnp.broadcast_to(leaf[:, None], (b, k))),
        depth=set_(tree.depth, jnp.broadcast_to(leaf_depth[:, None] + 1, (b, k))),
        visits=set_(tree.visits, jnp.ones((b, k), jnp.int32)),
        value_sum=set_(tree.value_sum, value),
        prior_logit=set_(tree.prior_logit, mean_logp),
        entropy=tree.entropy
        if expansion.entropy is None
        else set_(tree.entropy, expansion.entropy),
        varentropy=tree.varentropy
        if expansion.varentropy is None
        else set_(tree.varentropy, expansion.varentropy),
        rating=set_(tree.rating, expansion.rating),
        terminal=set_(tree.terminal, terminal),
        is_answer=set_(tree.is_answer, expansion.is_answer),
        reward=set_(tree.reward, expansion.reward),
        tokens=tree.tokens.at[r, slots].set(expansion.tokens, mode="drop"),
        lengths=set_(tree.lengths, expansion.lengths),
        logprobs=tree.logprobs.at[r, slots].set(expansion.logprobs, mode="drop"),
        forced=tree.forced if expansion.forced is None else set_(tree.forced, expansion.forced),
        num_children=tree.num_children.at[rows, jnp.where(expand, leaf, tree.capacity)].add(
            k, mode="drop"
        ),
        first_child=tree.first_child.at[
            rows, jnp.where(expand, leaf, tree.capacity), tree.num_children[rows, leaf] // k
        ].set(tree.num_nodes, mode="drop"),
        num_nodes=tree.num_nodes + jnp.where(expand, k, 0),
    )

    # The value the leaf passes up: its new children's, one level below it (so discounted once,
    # as when a terminal child is selected again later), or its own for a terminal leaf.
    new_children_value = jnp.max(value, 1) if config.backup == "max" else jnp.mean(value, 1)
    own_value = tree.q_values()[rows, leaf]
    leaf_value = jnp.where(expand, config.discount * new_children_value, own_value)
    chain = ancestors(tree, leaf, config.max_depth)  # [B, D + 1], chain[:, 0] = leaf
    discounts = config.discount ** jnp.arange(config.max_depth + 1, dtype=jnp.float32)
    live = (chain != NO_NODE) & ~tree.done[:, None]
    idx = jnp.where(live, chain, tree.capacity)
    tree = tree.replace(
        visits=tree.visits.at[rows[:, None], idx].add(1, mode="drop"),
        value_sum=tree.value_sum.at[rows[:, None], idx].add(
            discounts[None, :] * leaf_value[:, None], mode="drop"
        ),
    )
    if config.patience > 0:
        successes = jnp.sum(tree.is_answer & (tree.reward > 0.5), axis=1)
        tree = tree.replace(done=tree.done | (successes >= config.patience))
    return tree


# ----------------------------------------------------------------------------- prefixes
@struct.dataclass
class StepFormat:
    """Token pieces that frame a thought (see `o1jax.data.longcot.render_chain`).

    A path renders as: prompt, then per node at depth s: header[s], thought tokens,
    suffix[rating >= 0.5]; then header[leaf depth + 1] opens the thought to be generated.
    """

    headers: jax.Array  # [D + 2, H] int32, header of the thought at depth s (row s)
    header_lengths: jax.Array  # [D + 2] int32
    suffixes: jax.Array  # [2, S] int32, row 0 negative rating, row 1 positive
    suffix_lengths: jax.Array  # [2] int32
    end_of_thought: int = struct.field(pytree_node=False, default=0)
    start_of_rating: int = struct.field(pytree_node=False, default=0)
    positive_rating: int = struct.field(pytree_node=False, default=0)
    negative_rating: int = struct.field(pytree_node=False, default=0)
    conclusion: int = struct.field(pytree_node=False, default=0)
    pad: int = struct.field(pytree_node=False, default=0)
    # Ids of the meta-action tags the search may start a thought with: <expansion>, <critic>,
    # <refine>, <conclusion> (`MCTSConfig.meta_action_prob`).
    meta_actions: tuple[int, ...] = struct.field(pytree_node=False, default=())

    def max_prefix_length(self, prompt_width: int, max_depth: int, thought_length: int) -> int:
        h, s = self.headers.shape[1], self.suffixes.shape[1]
        return prompt_width + max_depth * (h + thought_length + s) + h


def check_step_format(fmt: StepFormat, max_depth: int, where: str) -> None:
    """Raises a ValueError when `fmt`'s header table (static shape [D + 2, H]) has no row for
    some depth up to `max_depth + 1`: JAX would clamp the gather and render wrong step ids."""
    rows = fmt.headers.shape[0]
    if fmt.header_lengths.shape != (rows,):
        raise ValueError(
            f"{where}: StepFormat.header_lengths has shape {fmt.header_lengths.shape}, "
            f"expected ({rows},) like the headers {fmt.headers.shape}"
        )
    if rows < max_depth + 2:
        raise ValueError(
            f"{where}: the StepFormat has headers for max_depth {rows - 2}, but max_depth is "
            f"{max_depth}; build it with make_step_format(tokenizer, {max_depth})"
        )


def check_prompts(tree: Tree, prompts, prompt_lengths, where: str) -> None:
    """Raises a ValueError unless prompts are [B, P] and prompt_lengths [B], B the trees'."""
    b = tree.batch_size
    if jnp.ndim(prompts) != 2 or jnp.shape(prompts)[0] != b or jnp.shape(prompt_lengths) != (b,):
        raise ValueError(
            f"{where}: prompts must be [B, P] and prompt_lengths [B] with B = {b} trees, got "
            f"{jnp.shape(prompts)} and {jnp.shape(prompt_lengths)}"
        )


def _prefix_one(tree: Tree, path, leaf_depth, prompt, prompt_length, fmt: StepFormat, width: int):
    """Right-padded prefix [width] and its length for one tree (no batch axis)."""
    h, s = fmt.headers.shape[1], fmt.suffixes.shape[1]
    max_len = tree.tokens.shape[-1]
    seg_w = h + max_len + s
    t = jnp.arange(seg_w)

    def segment(node, depth):
        valid = node != NO_NODE
        safe = jnp.maximum(node, 0)
        ha = fmt.header_lengths[depth]
        length = tree.lengths[safe]
        positive = (tree.rating[safe] >= 0.5).astype(jnp.int32)
        hc = fmt.suffix_lengths[positive]
        header_tok = fmt.headers[depth, jnp.clip(t, 0, h - 1)]
        thought_tok = tree.tokens[safe, jnp.clip(t - ha, 0, max_len - 1)]
        suffix_tok = fmt.suffixes[positive, jnp.clip(t - ha - length, 0, s - 1)]
        tok = jnp.where(t < ha, header_tok, jnp.where(t < ha + length, thought_tok, suffix_tok))
        total = jnp.where(valid, ha + length + hc, 0)
        return tok, total

    depths = jnp.arange(1, path.shape[0] + 1)
    seg_tokens, seg_lengths = jax.vmap(segment)(path, depths)  # [D, W], [D]
    starts = prompt_length + jnp.cumsum(seg_lengths) - seg_lengths  # [D]
    dest = jnp.where(t[None, :] < seg_lengths[:, None], starts[:, None] + t[None, :], width)
    out = jnp.full((width,), fmt.pad, jnp.int32)
    p = jnp.arange(prompt.shape[0])
    out = out.at[jnp.where(p < prompt_length, p, width)].set(prompt, mode="drop")
    out = out.at[dest.reshape(-1)].set(seg_tokens.reshape(-1), mode="drop")
    tail_start = prompt_length + jnp.sum(seg_lengths)
    tail_len = fmt.header_lengths[leaf_depth + 1]
    th = jnp.arange(h)
    tail_dest = jnp.where(th < tail_len, tail_start + th, width)
    out = out.at[tail_dest].set(fmt.headers[leaf_depth + 1], mode="drop")
    return out, tail_start + tail_len


@functools.partial(jax.jit, static_argnames=("max_depth", "width"))
def build_prefixes(
    tree: Tree, leaf, prompts, prompt_lengths, fmt: StepFormat, max_depth: int, width: int
):
    """Token prefixes [B, width] (right-padded) and lengths [B] that continue each leaf's path.

    fmt must have headers for `max_depth` (a ValueError otherwise), prompts [B, P] and
    prompt_lengths [B] match the B trees.
    """
    check_step_format(fmt, max_depth, "build_prefixes")
    check_prompts(tree, prompts, prompt_lengths, "build_prefixes")
    path = path_from_root(tree, leaf, max_depth)  # [B, D]
    leaf_depth = tree.depth[jnp.arange(tree.batch_size), leaf]
    fn = functools.partial(_prefix_one, fmt=fmt, width=width)
    return jax.vmap(fn)(tree, path, leaf_depth, prompts, prompt_lengths)


@functools.partial(jax.jit, static_argnames=("max_depth", "width"))
def build_prefixes_many(
    tree: Tree, nodes, prompts, prompt_lengths, fmt: StepFormat, max_depth: int, width: int
):
    """`build_prefixes` of V nodes per tree, nodes [B, V]: prefixes [B * V, width] and lengths
    [B * V], tree-major (row b * V + j continues node j of tree b)."""
    fn = lambda column: build_prefixes(tree, column, prompts, prompt_lengths, fmt, max_depth, width)
    prefix, lengths = jax.vmap(fn, in_axes=1, out_axes=1)(nodes)  # [B, V, width], [B, V]
    return prefix.reshape(-1, width), lengths.reshape(-1)


# ----------------------------------------------------------------------------- the search
ExpandFn = Callable[[Tree, jax.Array, jax.Array], Expansion]
PREFIX_BUCKET = 64  # prefix widths are multiples of this (one compiled sampler per bucket)
RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def trim_to_bucket(prompts: jax.Array, lengths: jax.Array) -> jax.Array:
    """Right-padded prompts [R, W] cut to their longest row rounded up to `PREFIX_BUCKET`, so
    the sampler prefills no padding beyond it (a padded slot costs as much as a real token);
    one compiled sampler per bucket. A host sync on `lengths`."""
    longest = int(np.max(np.asarray(lengths)))
    width = min(prompts.shape[1], -(-longest // PREFIX_BUCKET) * PREFIX_BUCKET)
    return jax.lax.slice_in_dim(prompts, 0, width, axis=1)  # one op (indexing: three)


@dataclasses.dataclass
class SearchStats:
    simulations: int = 0
    prefilled_tokens: int = 0
    prefilled_without_sharing: int = 0
    expand_seconds: float = 0.0
    total_seconds: float = 0.0


def run(
    expand_fn: ExpandFn,
    batch_size: int,
    config: MCTSConfig,
    key: jax.Array,
    reward_fn: RewardFn | None = None,
    stats: SearchStats | None = None,
) -> Tree:
    """Grows `batch_size` trees for `config.num_simulations` simulations.

    expand_fn(tree, leaf, key) -> Expansion: K candidates for each tree's leaf; leaf [B] gives
      an Expansion [B, K, ...], and with `config.leaves_per_tree` V > 1, leaf [B, V] gives
      [B, V, K, ...] (`make_lm_expand_fn`'s does both).
    reward_fn(tree_index [M], tokens [M, L], lengths [M]) -> rewards [M]: answer checks of the
      new answer thoughts (host). None: no ground truth (evaluation); terminal values are then
      the model's own ratings.
    """
    import time

    tree = init_tree(batch_size, config.capacity, config.thought_length, config.expansions_per_node)
    use_rewards = reward_fn is not None
    start = time.perf_counter()
    select_keys, expand_keys = simulation_keys(key, config.num_simulations)  # [S] each
    expand_keys = list(expand_keys)
    # The first selection; each later one runs in the same program as the backup before it.
    chosen = _select(tree, select_keys, 0, config)  # leaf [B], or (nodes, fresh) [B, V]
    for sim in range(config.num_simulations):
        leaf = chosen if config.leaves_per_tree == 1 else chosen[0]
        t0 = time.perf_counter()
        expansion = expand_fn(tree, leaf, expand_keys[sim])
        if use_rewards:
            expansion = _check_answers(expansion, reward_fn)
        if stats is not None:
            jax.block_until_ready(expansion.rating)
            stats.expand_seconds += time.perf_counter() - t0
        last = sim + 1 == config.num_simulations
        tree, chosen = backup_then_select(
            tree, chosen, expansion, select_keys, sim + 1, config, use_rewards, last
        )
        if stats is not None:
            stats.simulations += 1
        if config.patience > 0 and sim % 4 == 3 and bool(jnp.all(tree.done)):
            break
    if stats is not None:
        jax.block_until_ready(tree.visits)
        stats.total_seconds += time.perf_counter() - start
    return tree


@functools.partial(jax.jit, static_argnames=("num_simulations",))
def simulation_keys(key: jax.Array, num_simulations: int) -> tuple[jax.Array, jax.Array]:
    """The select and expand keys [S] of each simulation: `key, select, expand =
    jax.random.split(key, 3)` once per simulation, in one call."""

    def step(key, _):
        key, k_select, k_expand = jax.random.split(key, 3)
        return key, (k_select, k_expand)

    _, (select_keys, expand_keys) = jax.lax.scan(step, key, None, length=num_simulations)
    return select_keys, expand_keys


def _select(tree: Tree, select_keys: jax.Array, sim, config: MCTSConfig):
    """Simulation `sim`'s selection: leaf [B], or (nodes, fresh) [B, V] with virtual loss."""
    if config.leaves_per_tree == 1:
        return select(tree, select_keys[sim], config)
    return select_with_virtual_loss(tree, select_keys[sim], config)


@functools.partial(jax.jit, static_argnames=("config", "use_rewards", "last"), donate_argnums=(0,))
def backup_then_select(tree, chosen, expansion, select_keys, sim, config, use_rewards, last):
    """`insert_and_backup` (or `_many`) of the nodes `chosen` by the previous selection, then
    simulation `sim`'s selection in the same program (`last`: none), so that a simulation of
    `run` costs two dispatches around its expansion, not four.

    Returns (tree, the next `chosen` or None). Donates `tree`.
    """
    tree = _backup(tree, chosen, expansion, config, use_rewards)
    return tree, None if last else _select(tree, select_keys, sim, config)


def _backup(tree: Tree, chosen, expansion: Expansion, config: MCTSConfig, use_rewards: bool):
    """Inserts and backs up the expansion of what `_select` chose (a leaf, or nodes + fresh)."""
    if config.leaves_per_tree == 1:
        return _insert_and_backup(tree, chosen, expansion, config, use_rewards, None)
    nodes, fresh = chosen
    return insert_and_backup_many(tree, nodes, fresh, expansion, config, use_rewards)


@functools.partial(jax.jit, static_argnames=("expand_fn", "batch_size", "config", "use_rewards"))
def run_compiled(
    expand_fn: ExpandFn,
    batch_size: int,
    config: MCTSConfig,
    key: jax.Array,
    use_rewards: bool = False,
) -> Tree:
    """`run` as one compiled program (a `lax.while_loop` over the simulations), as mctx runs a
    search: no dispatch or host round trip per simulation.

    For an `expand_fn` that jax can trace (a value network, a synthetic function): not the LM
    expansion of `make_lm_expand_fn`, whose prefixes are cut to a width chosen on the host, nor
    self-play, whose answer check runs on the host. use_rewards: terminal thoughts take the
    `reward` the expansion carries (a check done on the device) instead of their rating.
    The same keys give the same tree as `run(expand_fn, batch_size, config, key)` (which stops
    for patience only every fourth simulation; the simulations in between leave done trees
    untouched).
    """
    tree = init_tree(batch_size, config.capacity, config.thought_length, config.expansions_per_node)
    select_keys, expand_keys = simulation_keys(key, config.num_simulations)  # [S] each

    def cond(carry):
        sim, tree = carry
        go_on = sim < config.num_simulations
        if config.patience > 0:
            go_on &= ~jnp.all(tree.done)
        return go_on

    def body(carry):
        sim, tree = carry
        chosen = _select(tree, select_keys, sim, config)  # leaf [B], or (nodes, fresh) [B, V]
        leaf = chosen if config.leaves_per_tree == 1 else chosen[0]
        expansion = expand_fn(tree, leaf, expand_keys[sim])
        return sim + 1, _backup(tree, chosen, expansion, config, use_rewards)

    _, tree = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), tree))
    return tree


def _check_answers(expansion: Expansion, reward_fn: RewardFn) -> Expansion:
    """Host step: rewards of the new answer thoughts, checked against the ground truth.
    expansion: [B, K, ...] or [B, V, K, ...]; the reward function gets each answer's tree."""
    is_answer = np.asarray(expansion.is_answer)
    rewards = np.zeros(is_answer.shape, np.float32)
    if is_answer.any():
        where = np.nonzero(is_answer)  # (tree, [leaf,] child) indices
        tokens = np.asarray(expansion.tokens)[where]
        lengths = np.asarray(expansion.lengths)[where]
        rewards[where] = reward_fn(where[0], tokens, lengths)
    return expansion.replace(reward=jnp.asarray(rewards))


def make_lm_expand_fn(
    params,
    cfg,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    fmt: StepFormat,
    config: MCTSConfig,
    lora=None,
    stats: SearchStats | None = None,
) -> ExpandFn:
    """An `expand_fn` that samples K thoughts per leaf with the policy and rates them.

    prompts: [B, P] right-padded problem prompts (the rendered root); prompt_lengths: [B].
    fmt: from `make_step_format(tokenizer, config.max_depth)` (or deeper; a ValueError otherwise).
    """
    from o1jax.model.sampler import generate

    check_step_format(fmt, config.max_depth, "make_lm_expand_fn")

    width = fmt.max_prefix_length(prompts.shape[1], config.max_depth, config.thought_length)
    b, k = prompts.shape[0], config.num_children

    def expand(tree: Tree, leaf: jax.Array, key: jax.Array) -> Expansion:
        if leaf.shape[0] != b:
            raise ValueError(
                f"make_lm_expand_fn: {leaf.shape[0]} trees, but the prompts are for {b} "
                "(run's batch_size must be the number of prompts)"
            )
        many = leaf.ndim == 2  # [B, V] nodes per tree: one sampler call for all B * V
        v = leaf.shape[1] if many else 1
        prefix, lengths = build_prefixes_many(
            tree, leaf.reshape(b, v), prompts, prompt_lengths, fmt, config.max_depth, width
        )  # [B * V, width], [B * V]
        prefix = trim_to_bucket(prefix, lengths)  # early simulations have short paths
        first_tokens = None
        if config.meta_action_prob > 0:
            key, k_meta = jax.random.split(key)
            first_tokens = draw_meta_actions(k_meta, b * v, fmt, config)  # [B * V * K]
        out = generate(
            params,
            cfg,
            prefix,
            lengths,
            first_tokens=first_tokens,
            key=key,
            max_new_tokens=config.thought_length,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            stop_tokens=(fmt.end_of_thought,),
            num_samples=k,
            score_suffix=(fmt.start_of_rating,),
            score_tokens=(fmt.positive_rating, fmt.negative_rating),
            return_entropy=config.entropy_prior or config.varentropy_bonus > 0,
            lora=lora,
        )
        if stats is not None:
            n = int(np.sum(np.asarray(lengths)))  # on the host: no jitted sum to compile
            stats.prefilled_tokens += n
            stats.prefilled_without_sharing += n * k
        expansion = expansion_from_samples(out, b * v, k, fmt, first_tokens)  # [B * V, K, ...]
        if many:
            expansion = jax.tree.map(lambda x: x.reshape((b, v, *x.shape[1:])), expansion)
        return expansion

    return expand


@functools.partial(jax.jit, static_argnames=("nodes", "config"))
def draw_meta_actions(key: jax.Array, nodes: int, fmt: StepFormat, config: MCTSConfig):
    """First tokens [nodes * K] of the sampler rows (node-major): with probability
    `config.meta_action_prob` per node, its K thoughts start with meta-action tags drawn from
    `config.meta_action_weights`; -1 (the policy's own choice) otherwise."""
    if len(fmt.meta_actions) != 4:
        raise ValueError(
            "meta-actions need a StepFormat with the ids of <expansion>, <critic>, <refine> and "
            f"<conclusion> (make_step_format), got meta_actions={fmt.meta_actions}"
        )
    k_node, k_tag = jax.random.split(key)
    forced = jax.random.uniform(k_node, (nodes, 1)) < config.meta_action_prob  # [nodes, 1]
    logits = jnp.log(jnp.asarray(config.meta_action_weights, jnp.float32))
    tag = jax.random.categorical(k_tag, logits, shape=(nodes, config.num_children))
    tags = jnp.asarray(fmt.meta_actions, jnp.int32)[tag]  # [nodes, K]
    return jnp.where(forced, tags, -1).reshape(-1)


@functools.partial(jax.jit, static_argnames=("b", "k"))
def expansion_from_samples(out, b: int, k: int, fmt: StepFormat, first_tokens=None) -> Expansion:
    """Sampler rows (b-major, K per leaf) -> an Expansion [B, K, ...]. first_tokens: the
    [B * K] first tokens `generate` forced (-1: sampled), or None. Jitted: eagerly, its dozen
    small ops were each compiled once per shape and dispatched one by one every simulation."""
    shape = lambda x: x.reshape((b, k, *x.shape[1:]))
    tokens = shape(out.tokens)
    stopped = shape(out.stopped)
    # Rating = P(positive) / (P(positive) + P(negative)), read after <start_of_rating>.
    rating = jax.nn.sigmoid(out.scores[:, 0] - out.scores[:, 1])
    spread = {"entropy": None, "varentropy": None}
    if out.entropy.shape[1]:  # per-token values are 0 past a thought's end: mean over its tokens
        count = jnp.maximum(out.lengths, 1).astype(jnp.float32)
        spread = {k: shape(jnp.sum(getattr(out, k), 1) / count) for k in spread}
    return Expansion(
        tokens=tokens,
        lengths=shape(out.lengths),
        logprobs=shape(out.logprobs),
        stopped=stopped,
        is_answer=(tokens[:, :, 0] == fmt.conclusion) & stopped,
        rating=shape(rating),
        reward=jnp.zeros((b, k), jnp.float32),
        forced=None if first_tokens is None else shape(first_tokens >= 0),
        **spread,
    )
