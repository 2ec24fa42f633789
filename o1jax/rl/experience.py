"""Search trees -> PPO experiences, one per non-root node.

An experience is one sequence that serves both heads of the model:

    tokens = prefix (the path to the node's parent, then the node's header)
             + the node's thought + <start_of_rating>

The policy term reads the log-probs of the thought tokens; the value term reads the rating
logits at the final <start_of_rating> position, the same position search reads its values
from (`o1jax.search.mcts`). That position holds the value *after* the thought, so its target is
the reward of a terminal thought, else the GAE return of the next step on the path (the target
of the value before that step), else, at a frontier leaf, the value itself.

Advantages come from GAE along every root-to-leaf path (the MDP of a path: action t is thought
t, the value before it is the rating of thought t - 1, the reward is the answer check of a
terminal thought), averaged over the leaves below a node when several paths share it.

With `terminal_only` (the default in training) only paths that end in a terminal thought (an
answer, a truncated thought, the depth limit) count, and nodes with no terminal below them are
not experiences. A path that stops at the search frontier ends on the model's own rating, not
on an outcome; counting it rewards "never conclude" whenever the ratings are more optimistic
than the answer checks, which is how a tiny policy learned to stop answering in self-play.

The values GAE runs on come from one of two sources (`values`):

- "rating": the model's own rating of each thought, P(<positive_rating>), as search reads it.
- "outcome": the tree's own Monte-Carlo estimate, the mean reward of the terminal leaves below
  a node (the root: of the whole tree). With lam = 0 and gamma = 1 a node's advantage is then
  V(node) - V(parent): how much choosing this thought changed the chance of a right answer,
  measured by the search itself. Subtrees whose outcomes all agree give zero advantage, so a
  problem the policy always (or never) solves pushes no thought up or down (before PPO's batch
  normalisation, which centres every advantage on the batch mean). This needs `terminal_only`.

With ratings, the value before the first thought, V(root), is the mean over the root's
children of reward + gamma * rating after them, weighted by the paths below each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from o1jax.rl.gae import gae
from o1jax.search.mcts import (
    MCTSConfig,
    StepFormat,
    _prefix_one,
    check_prompts,
    check_step_format,
)
from o1jax.search.tree import NO_NODE, ROOT, Tree, path_from_root


@struct.dataclass
class Experience:
    """M experiences (M = B * (N - 1) before filtering by `valid`)."""

    tokens: jax.Array  # [M, W] int32, right-padded: prefix + thought + <start_of_rating>
    length: jax.Array  # [M] int32, tokens in use
    action_start: jax.Array  # [M] int32, index of the first action token (the thought's first,
    #   or its second after a meta-action tag the search forced: the policy did not choose it)
    action_length: jax.Array  # [M] int32, action tokens
    behaviour_logprobs: jax.Array  # [M, L] float32, sampler's log-probs of the action tokens
    #   (for checks: PPO reads only the width L, and the replay buffer does not store them)
    advantage: jax.Array  # [M] float32
    value_target: jax.Array  # [M] float32 in [0, 1], target of the value after the thought
    reward: jax.Array  # [M] float32
    valid: jax.Array  # [M] bool


def path_values(tree: Tree, path: jax.Array, root_value: jax.Array, node_values=None):
    """Rewards, values and mask along root-to-leaf paths, GAE's layout.

    path: [B, D] from `path_from_root`; root_value: [B]; node_values: [B, N] value after each
    thought (default: the model's ratings). Returns (rewards [B, D], values [B, D + 1], mask).
    """
    rows = jnp.arange(tree.batch_size)[:, None]
    mask = path != NO_NODE
    safe = jnp.maximum(path, 0)
    terminal = tree.terminal[rows, safe] & mask
    rewards = jnp.where(terminal, tree.reward[rows, safe], 0.0)
    node_values = tree.rating if node_values is None else node_values
    rating = jnp.where(mask & ~terminal, node_values[rows, safe], 0.0)  # value after thought t
    values = jnp.concatenate([root_value[:, None], rating], axis=1)  # [B, D + 1]
    return rewards, values, mask.astype(jnp.float32)


def rating_targets(path: jax.Array, tree: Tree, rewards, values, returns, mask) -> jax.Array:
    """Targets [B, D] of the value after each thought of a path (what its <start_of_rating>
    reads): the reward of a terminal thought, else the return of the next step (GAE's target for
    the value before that step, which is this one's), else (a frontier leaf) the value itself.

    path, rewards, returns, mask: [B, D] (`path_values` and `gae`); values: [B, D + 1].
    """
    rows = jnp.arange(tree.batch_size)[:, None]
    terminal = tree.terminal[rows, jnp.maximum(path, 0)] & (path != NO_NODE)
    next_return = jnp.pad(returns[:, 1:], ((0, 0), (0, 1)))
    next_real = jnp.pad(mask[:, 1:], ((0, 0), (0, 1))) > 0
    return jnp.where(terminal, rewards, jnp.where(next_real, next_return, values[:, 1:]))


VALUE_SOURCES = ("rating", "outcome")  # what GAE's values come from (see the module doc)


@functools.partial(
    jax.jit, static_argnames=("config", "gamma", "lam", "width", "terminal_only", "values")
)
def tree_to_experiences(
    tree: Tree,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    fmt: StepFormat,
    config: MCTSConfig,
    gamma: float,
    lam: float,
    width: int,
    terminal_only: bool = False,
    values: str = "rating",
) -> Experience:
    """Every non-root node of B trees as an experience. prompts: [B, P]; prompt_lengths: [B].

    fmt: headers for `config.max_depth`; width: at least `experience_width(fmt, P, config)`;
      the trees' thought length is `config.thought_length` (each a ValueError otherwise).
    terminal_only: average GAE over the paths to terminal leaves only; nodes without one are
      marked invalid.
    values: "rating" (the model's ratings) or "outcome" (mean terminal reward below each node;
      requires terminal_only).
    """
    if values not in VALUE_SOURCES:
        raise ValueError(
            f"tree_to_experiences: values must be one of {VALUE_SOURCES}, got {values!r}"
        )
    if values == "outcome" and not terminal_only:
        raise ValueError("tree_to_experiences: values='outcome' needs terminal_only=True")
    check_step_format(fmt, config.max_depth, "tree_to_experiences")
    check_prompts(tree, prompts, prompt_lengths, "tree_to_experiences")
    if tree.thought_length != config.thought_length:
        raise ValueError(
            f"tree_to_experiences: the trees hold thoughts of {tree.thought_length} tokens, "
            f"MCTSConfig.thought_length is {config.thought_length}"
        )
    needed = experience_width(fmt, prompts.shape[1], config)
    if width < needed:
        raise ValueError(
            f"tree_to_experiences: width {width} < experience_width(fmt, {prompts.shape[1]}, "
            f"config) = {needed}: longer sequences would be cut"
        )
    b, n, max_len = tree.batch_size, tree.capacity, tree.thought_length
    d = config.max_depth
    nodes = jnp.arange(1, n)  # [N - 1]
    in_use = nodes[None, :] < tree.num_nodes[:, None]  # [B, N - 1]
    is_leaf = in_use & (tree.num_children[:, 1:] == 0)  # [B, N - 1]
    if terminal_only:
        is_leaf &= tree.terminal[:, 1:]
    leaves = jnp.broadcast_to(nodes[None, :], (b, n - 1))
    paths = jax.vmap(lambda col: path_from_root(tree, col, d), in_axes=1, out_axes=1)(leaves)
    weight = (is_leaf[:, :, None] & (paths != NO_NODE)).astype(jnp.float32)  # [B, N - 1, D]
    target = jnp.where(weight > 0, paths, n)  # dropped when not a real leaf path
    rows = jnp.arange(b)[:, None, None]
    count = jnp.zeros((b, n)).at[rows, target].add(weight, mode="drop")  # leaves below a node

    if values == "outcome":
        leaf_reward = jnp.where(is_leaf, tree.reward[:, 1:], 0.0)  # [B, N - 1]
        reward_sum = (
            jnp.zeros((b, n)).at[rows, target].add(weight * leaf_reward[:, :, None], mode="drop")
        )
        node_values = reward_sum / jnp.maximum(count, 1.0)  # [B, N]
        root_value = leaf_reward.sum(1) / jnp.maximum(is_leaf.sum(1), 1)
    else:
        node_values = None
        # V(root) on the scale of the values after each thought (the search's backed-up Q of the
        # root is not: discounted per level, with answer rewards mixed in): the mean over the
        # root's children of what follows them, reward + gamma * rating, weighted by the leaves
        # below each (the paths GAE averages over), so the first thoughts' advantages average 0.
        first = in_use & (tree.parent[:, 1:] == ROOT)  # [B, N - 1]
        after = jnp.where(tree.terminal[:, 1:], tree.reward[:, 1:], gamma * tree.rating[:, 1:])
        paths_below = jnp.where(first, count[:, 1:], 0.0)
        root_value = jnp.sum(paths_below * after, 1) / jnp.maximum(paths_below.sum(1), 1.0)

    # GAE along the path to every leaf; a node's advantage is the mean over leaves below it.
    def path_gae(path):  # path: [B, D]
        rewards, path_vals, mask = path_values(tree, path, root_value, node_values)
        advantages, returns = gae(rewards, path_vals, mask, gamma, lam)
        return advantages, rating_targets(path, tree, rewards, path_vals, returns, mask)

    advs, targets = jax.vmap(path_gae, in_axes=1, out_axes=1)(paths)  # [B, N - 1, D] each
    adv_sum = jnp.zeros((b, n)).at[rows, target].add(weight * advs, mode="drop")
    target_sum = jnp.zeros((b, n)).at[rows, target].add(weight * targets, mode="drop")
    advantage = (adv_sum / jnp.maximum(count, 1.0))[:, 1:]  # [B, N - 1]
    value_target = jnp.clip(target_sum / jnp.maximum(count, 1.0), 0.0, 1.0)[:, 1:]

    # Sequences: the parent's prefix (with this node's header), the thought, <start_of_rating>.
    parents = tree.parent[:, 1:]  # [B, N - 1]
    prefix_width = width - max_len - 1

    def node_prefixes(tree_b, parents_b, prompt_b, prompt_len_b):
        def one(parent):
            path = path_from_root(
                jax.tree.map(lambda x: x[None], tree_b), jnp.maximum(parent, 0)[None], d
            )[0]
            depth = tree_b.depth[jnp.maximum(parent, 0)]
            return _prefix_one(tree_b, path, depth, prompt_b, prompt_len_b, fmt, prefix_width)

        return jax.vmap(one)(parents_b)

    prefix, prefix_len = jax.vmap(node_prefixes)(tree, parents, prompts, prompt_lengths)
    thought = tree.tokens[:, 1:]  # [B, N - 1, L]
    thought_len = tree.lengths[:, 1:]
    t = jnp.arange(max_len + 1)
    tail = jnp.where(
        t[None, None, :] < thought_len[..., None],
        jnp.pad(thought, ((0, 0), (0, 0), (0, 1))),
        fmt.pad,
    )
    tail = jnp.where(t[None, None, :] == thought_len[..., None], fmt.start_of_rating, tail)
    tokens = jnp.concatenate([prefix, jnp.full((b, n - 1, max_len + 1), fmt.pad)], axis=-1)
    dest = prefix_len[..., None] + t[None, None, :]  # [B, N - 1, L + 1]
    dest = jnp.where(t[None, None, :] <= thought_len[..., None], dest, width)
    bi = jnp.arange(b)[:, None, None]
    ni = jnp.arange(n - 1)[None, :, None]
    tokens = tokens.at[bi, ni, dest].set(tail, mode="drop")

    # A meta-action tag the search forced is context, not an action: the actions start after it.
    forced = tree.forced[:, 1:].astype(jnp.int32)  # [B, N - 1]
    logprobs = tree.logprobs[:, 1:]  # [B, N - 1, L]
    after_tag = jnp.pad(logprobs[..., 1:], ((0, 0), (0, 0), (0, 1)))
    behaviour = jnp.where(forced[..., None] > 0, after_tag, logprobs)

    flat = lambda x: x.reshape((b * (n - 1), *x.shape[2:]))
    return Experience(
        tokens=flat(tokens),
        length=flat(prefix_len + thought_len + 1),
        action_start=flat(prefix_len + forced),
        action_length=flat(thought_len - forced),
        behaviour_logprobs=flat(behaviour),
        advantage=flat(advantage),
        value_target=flat(value_target),
        reward=flat(tree.reward[:, 1:]),
        valid=flat(in_use & (count[:, 1:] > 0)) if terminal_only else flat(in_use),
    )


def experience_width(fmt: StepFormat, prompt_width: int, config: MCTSConfig) -> int:
    """Static sequence width W of an experience."""
    prefix = fmt.max_prefix_length(prompt_width, config.max_depth, config.thought_length)
    return prefix + config.thought_length + 1
