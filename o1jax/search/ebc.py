"""Enhanced Borda Count (LLaMA-Berry): pairwise preferences -> a global order -> node values.

    pref = preference_matrix(p_better, valid)        # [B, n, n] bool, i preferred to j
    reach = transitive_closure(pref)                 # Floyd-Warshall, jitted
    wins = borda_counts(reach, valid)                # [B, n] how many each solution beats
    soft = soft_scores(p_better, valid)              # [B, n] sum_j P(i > j), the tie-break
    value = global_values(wins, valid, soft)         # [B, n] in [0, 1], 1 = ranked first

`p_better[b, i, j]` is P(solution i is better than solution j) from a pairwise reward model
(`o1jax.search.pprm`), NaN where the pair was not compared. The closure completes missing pairs
through chains (a > b and b > c give a > c). Solutions on a preference cycle reach each other,
so they beat the same solutions and tie on Borda count. LLaMA-Berry re-ranks such ties by a soft
comparison: among equal Borda counts, the solution with the larger summed preference probability
against the other valid solutions (`soft_scores`) ranks higher; different Borda counts keep
their order. The global value is rank based: a solution's rank is the number of valid solutions
ranked strictly above it (ties left, soft scores within `SOFT_TOL` included, share the better
rank), and its value is `1 - rank / (n_valid - 1)` (the paper's `1 - (rank - 1) / (|V| - 1)`
with 1-based ranks).
`mix_values` blends it with a local value, as LLaMA-Berry does for node values; the final answer
is the solution ranked first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def preference_matrix(p_better: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, n, n] bool: i is preferred to j (P > 1/2), both valid, i != j, the pair compared."""
    n = p_better.shape[-1]
    both = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
    return both & (p_better > 0.5)  # NaN (not compared) compares False


@jax.jit
def transitive_closure(pref: jax.Array) -> jax.Array:
    """[B, n, n] bool: j is reachable from i by a chain of preferences (Floyd-Warshall)."""

    def through(k, reach):  # allow paths through solution k
        return reach | (reach[:, :, k, None] & reach[:, None, k, :])

    return jax.lax.fori_loop(0, pref.shape[-1], through, pref)


@jax.jit
def borda_counts(reach: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, n] int32: how many other valid solutions each valid one beats (0 if invalid)."""
    n = reach.shape[-1]
    beats = reach & valid[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
    return jnp.where(valid, jnp.sum(beats, axis=-1), 0).astype(jnp.int32)


@jax.jit
def soft_scores(p_better: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, n] float32: sum over the other valid j of P(i better than j), a pair not compared
    (NaN) counting 1/2; 0 if invalid. In [0, n_valid - 1]: LLaMA-Berry's soft comparison."""
    n = p_better.shape[-1]
    others = valid[:, None, :] & ~jnp.eye(n, dtype=bool)[None]  # [B, i, j]
    p = jnp.where(jnp.isnan(p_better), 0.5, p_better)
    return jnp.where(valid, jnp.sum(jnp.where(others, p, 0.0), axis=-1), 0.0)


SOFT_TOL = 1e-5  # soft scores closer than this tie (float sums of the same terms may differ)


@jax.jit
def global_values(wins: jax.Array, valid: jax.Array, soft: jax.Array | None = None) -> jax.Array:
    """[B, n] float32 in [0, 1] from Borda counts: 1 for the top rank, 0 for the last; invalid 0.

    soft: [B, n] `soft_scores` or None; orders equal Borda counts (LLaMA-Berry's re-ranking).
    Soft scores within `SOFT_TOL` of the next lower one tie with it, and a chain of such steps
    is one tie: ranks stay a consistent order (a pairwise tolerance would tie a with b and b
    with c yet rank a under c).
    """
    n = wins.shape[-1]
    soft = jnp.zeros(wins.shape, jnp.float32) if soft is None else soft
    # Valid first, then by Borda count, then by soft score, both descending.
    order = jnp.lexsort((-soft, -wins, ~valid), axis=-1)  # [B, n]
    w, s = (jnp.take_along_axis(x, order, axis=-1) for x in (wins, soft))
    # A new rank starts where the count drops, or the soft score drops by more than SOFT_TOL.
    drops = (w[:, 1:] != w[:, :-1]) | (s[:, :-1] - s[:, 1:] > SOFT_TOL)  # [B, n - 1]
    starts = jnp.concatenate([jnp.ones_like(drops[:, :1]), drops], axis=-1)  # [B, n]
    # The rank of a tie group is the sorted position of its first member.
    first = jax.lax.cummax(jnp.where(starts, jnp.arange(n), 0), axis=1)  # [B, n]
    rank = jnp.take_along_axis(first, jnp.argsort(order, axis=-1), axis=-1).astype(jnp.float32)
    n_valid = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    value = 1.0 - rank / jnp.maximum(n_valid - 1.0, 1.0)
    return jnp.where(valid, value, 0.0)


def enhanced_borda_count(p_better: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Borda counts [B, n], global values [B, n]) of the solutions of B trees, equal Borda
    counts re-ranked by their soft scores (LLaMA-Berry).

    p_better: [B, n, n] float; valid: [B, n] bool, or numbers read as bool (nonzero: valid);
    shapes checked: a mismatch is a ValueError.
    """
    valid = jnp.asarray(valid).astype(bool)  # an int 2 must not go through bitwise &
    b, n = jnp.shape(valid) if jnp.ndim(valid) == 2 else (None, None)
    if n is None or jnp.shape(p_better) != (b, n, n):
        raise ValueError(
            f"enhanced_borda_count: p_better must be [B, n, n] and valid [B, n], got "
            f"{jnp.shape(p_better)} and {jnp.shape(valid)}"
        )
    reach = transitive_closure(preference_matrix(p_better, valid))
    wins = borda_counts(reach, valid)
    return wins, global_values(wins, valid, soft_scores(p_better, valid))


def mix_values(global_value: jax.Array, local_value: jax.Array, weight: float) -> jax.Array:
    """A node's value: `weight * global + (1 - weight) * local` (weight in [0, 1])."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mix_values: weight must be in [0, 1], got {weight}")
    return weight * global_value + (1.0 - weight) * local_value
