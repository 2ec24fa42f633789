"""Sum-tree PER: sampling law, zero priorities, overwrite, duplicates, IS weights, no drift."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from o1jax.rl import per

ITEM = {"x": np.zeros((3,), np.float32), "id": np.zeros((), np.int32)}


def _items(ids):
    ids = np.asarray(ids, np.int32)
    return {"x": np.repeat(ids[:, None].astype(np.float32), 3, 1), "id": ids}


# 64 slots (depth 2): sampling searches the leaves in one pass; 2^16 (depth 4) and 2^20
# (depth 5): it searches the level of 256 nodes, then descends two or three levels per draw.
CAPACITIES = [64, 1 << 16, 1 << 20]


def _spread(capacity: int, priorities) -> tuple[np.ndarray, np.ndarray]:
    """(slots, leaf priorities [capacity]) with `priorities` spread over the whole buffer."""
    slots = np.linspace(0, capacity - 1, len(priorities)).astype(np.int64)
    full = np.zeros(capacity, np.float32)
    full[slots] = priorities
    return slots, full


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_sampling_frequencies_follow_p_alpha(capacity):
    alpha = 0.6
    state = per.init(capacity, ITEM, alpha=alpha)
    rng = np.random.default_rng(0)
    slots, priorities = _spread(capacity, rng.uniform(0.05, 3.0, 40).astype(np.float32))
    state = per.add(state, _items(np.arange(capacity)), jnp.asarray(priorities))
    counts = np.zeros(capacity)
    for i in range(200):
        items, idx, _ = per.sample(state, jax.random.key(i), 256, 1.0)
        np.testing.assert_array_equal(np.asarray(items["id"]), np.asarray(idx))
        counts += np.bincount(np.asarray(idx), minlength=capacity)
    assert counts.sum() == counts[slots].sum()  # nothing outside the 40 items
    mass = priorities.astype(np.float64) ** alpha
    expected = mass[slots] / mass.sum() * counts.sum()
    assert stats.chisquare(counts[slots], expected).pvalue > 1e-3


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_zero_priority_items_are_never_drawn(capacity):
    state = per.init(capacity, ITEM)
    priorities = np.zeros(20, np.float32)
    priorities[[3, 7, 19]] = [1e-6, 2.0, 1e-30]  # tiny masses sit beside large ones
    slots, full = _spread(capacity, priorities)
    state = per.add(state, _items(np.arange(capacity)), jnp.asarray(full))
    drawn = set()
    for i in range(100):
        _, idx, _ = per.sample(state, jax.random.key(i), 128, 0.4)
        drawn |= set(np.asarray(idx).tolist())
    assert drawn <= set(slots[[3, 7, 19]].tolist())
    assert slots[7] in drawn


def test_a_zero_mass_node_is_never_drawn_where_a_blocked_cumsum_steps_up(monkeypatch):
    """XLA sums a long cumsum in blocks, and the running total can step up by an ulp at a
    zero-mass node that starts a block. A draw landing in that one-ulp step once took the empty
    node, returning a zero-priority slot or a NaN weight for the whole batch. Searched over the
    level of 4096 nodes, whose cumsum XLA's CPU backend blocks, every such draw must still
    land on an item of positive priority."""
    monkeypatch.setattr(per, "SCAN_LEVEL_SIZE", 4096)  # read when `_descend` runs (eagerly here)
    capacity = 1 << 16
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, capacity).astype(np.float32) ** 4 * 100
    p.reshape(-1, 16)[rng.random(capacity // 16) < 0.3] = 0  # zero-mass nodes of that level
    state = per.add(per.init(capacity, ITEM, alpha=1.0), _items(np.arange(capacity)), p)
    assert per._scan_level(state.depth) == 3
    cum = np.asarray(jnp.cumsum(per._level(state.tree, 3)))
    empty = p.reshape(-1, 16).sum(axis=1) == 0
    steps = [j for j in range(1, len(cum)) if empty[j] and cum[j] > cum[j - 1]]
    assert steps, "no zero-mass node where the blocked cumsum steps up: the test needs one"
    u = jnp.asarray([cum[j - 1] for j in steps], jnp.float32)  # inside each one-ulp step
    slots, mass = per._descend(state.tree, state.depth, u)
    assert (p[np.asarray(slots)] > 0).all() and (np.asarray(mass) > 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_priorities_that_are_not_positive_finite_numbers_are_never_drawn(alpha):
    """0 (also at alpha 0, where 0 ** 0 = 1), negative, NaN and inf all store mass 0; none of
    them reaches the largest priority that `add(priorities=None)` uses."""
    state = per.init(8, ITEM, alpha=alpha)
    bad = [0.0, -1.0, np.nan, np.inf]
    state = per.add(state, _items(np.arange(8)), jnp.asarray([2.0, 3.0, *bad, 1.0, 0.0]))
    state = per.update(state, jnp.asarray([1, 6]), jnp.asarray([np.nan, -2.0]))
    assert float(state.max_priority) == 3.0
    drawn = set()
    for i in range(20):
        _, idx, w = per.sample(state, jax.random.key(i), 16, 0.5)
        drawn |= set(np.asarray(idx).tolist())
        assert np.all(np.isfinite(np.asarray(w)))
    assert drawn == {0}
    state = per.add(state, _items([8]), None)  # the default priority is still a real one
    assert float(state.leaf_mass[0]) == float(np.float32(3.0) ** np.float32(alpha))


def test_a_buffer_without_mass_samples_in_range_with_zero_weights():
    state = per.add(per.init(8, ITEM), _items(np.arange(4)), jnp.zeros(4))
    _, idx, w = per.sample(state, jax.random.key(0), 6, 0.4)
    assert np.all((np.asarray(idx) >= 0) & (np.asarray(idx) < 8))
    np.testing.assert_array_equal(np.asarray(w), 0.0)


def test_empty_writes_and_out_of_range_indices_change_nothing():
    state = per.init(100, ITEM, alpha=1.0)
    state = per.add(state, _items(np.arange(100)), jnp.ones(100))
    before = np.asarray(state.tree).copy()
    state = per.add(state, _items([]), jnp.zeros(0))
    state = per.update(state, jnp.zeros(0, jnp.int32), jnp.zeros(0))
    state = per.update(state, jnp.asarray([-1, 100, 102, 5]), jnp.asarray([9.0, 9.0, 9.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(state.tree), before)
    assert int(state.size) == 100 and float(state.max_priority) == 1.0


def test_add_with_a_count_stores_only_that_many_items():
    """One compiled `add` for any number of items: the padding past `count` takes no slot and
    overwrites nothing."""
    state = per.init(6, ITEM, alpha=1.0)
    state = per.add(state, _items([0, 1, 2, 3]), jnp.ones(4))
    state = per.add(state, _items([4, 5, 6, 7]), jnp.asarray([2.0, 3.0, 9.0, 9.0]), 2)
    assert int(state.size) == 6 and int(state.position) == 0
    np.testing.assert_array_equal(np.asarray(state.items["id"]), [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(np.asarray(state.leaf_mass), [1, 1, 1, 1, 2, 3])
    assert float(state.max_priority) == 3.0
    state = per.add(state, _items([8, 9, 10, 11]), jnp.full(4, 5.0), 1)  # wraps to slot 0
    np.testing.assert_array_equal(np.asarray(state.items["id"]), [8, 1, 2, 3, 4, 5])
    assert int(state.position) == 1 and float(state.total) == 5 + 1 + 1 + 1 + 2 + 3


def test_circular_overwrite_replaces_the_oldest():
    state = per.init(5, ITEM)
    state = per.add(state, _items([0, 1, 2, 3]), jnp.ones(4))
    state = per.add(state, _items([4, 5, 6]), jnp.asarray([1.0, 1.0, 0.0]))
    assert int(state.size) == 5 and int(state.position) == 2
    np.testing.assert_array_equal(np.asarray(state.items["id"]), [5, 6, 2, 3, 4])
    np.testing.assert_allclose(np.asarray(state.leaf_mass), [1, 0, 1, 1, 1])


def test_update_with_duplicate_indices_takes_the_largest():
    state = per.init(8, ITEM, alpha=1.0)
    state = per.add(state, _items(np.arange(8)), jnp.ones(8))
    state = per.update(state, jnp.asarray([2, 5, 2, 2]), jnp.asarray([0.5, 4.0, 3.0, 1.0]))
    leaves = np.asarray(state.leaf_mass)
    np.testing.assert_allclose(leaves, [1, 1, 3, 1, 1, 4, 1, 1])
    assert float(state.total) == leaves.sum()
    assert float(state.max_priority) == 4.0


def test_importance_weights_match_a_hand_computation():
    alpha, beta = 0.5, 0.7
    state = per.init(4, ITEM, alpha=alpha)
    p = np.asarray([1.0, 4.0, 9.0, 16.0], np.float32)
    state = per.add(state, _items(np.arange(4)), jnp.asarray(p))
    _, idx, w = per.sample(state, jax.random.key(0), 64, beta)
    prob = p**alpha / np.sum(p**alpha)
    raw = (4 * prob[np.asarray(idx)]) ** (-beta)
    np.testing.assert_allclose(np.asarray(w), raw / raw.max(), rtol=1e-5)
    assert float(np.max(np.asarray(w))) == 1.0


@pytest.mark.parametrize("capacity", [50, 1000, 5000])
def test_circular_adds_keep_every_level_exact(capacity):
    # add() recomputes only the nodes above its run of slots, including runs that wrap around
    # a capacity that is not a multiple of the branching factor.
    state = per.init(capacity, ITEM, alpha=1.0)
    rng = np.random.default_rng(capacity)
    expected = np.zeros(capacity, np.float32)
    position = 0
    for m in (7, 300, 1, capacity - 1, 64, capacity, 33, 17):
        m = min(m, capacity)
        priorities = rng.uniform(0.1, 5.0, m).astype(np.float32)
        state = per.add(state, _items(np.arange(m)), jnp.asarray(priorities))
        expected[(position + np.arange(m)) % capacity] = priorities
        position = (position + m) % capacity
        np.testing.assert_array_equal(np.asarray(state.leaf_mass), expected)
        f = state.branching
        for upper, lower in zip(state.levels[:-1], state.levels[1:], strict=True):
            sums = np.asarray(lower, np.float64).reshape(-1, f).sum(axis=1)
            np.testing.assert_allclose(np.asarray(upper), sums, rtol=1e-6)


def test_sum_tree_does_not_drift_under_many_updates():
    # Large priorities, then many rounds of tiny ones: a tree updated by adding deltas keeps a
    # residue of the large values (~1e4 * eps per update) that dwarfs the small total.
    n = 1000
    state = per.init(n, ITEM, alpha=1.0)
    rng = np.random.default_rng(1)
    state = per.add(state, _items(np.arange(n)), jnp.full((n,), 1e4, jnp.float32))
    for step in range(300):
        idx = rng.permutation(n)[:500] if step else np.arange(n)
        small = rng.uniform(0, 1e-3, len(idx)).astype(np.float32)
        state = per.update(state, jnp.asarray(idx), jnp.asarray(small))
    leaves = np.asarray(state.leaf_mass, np.float64)
    np.testing.assert_allclose(float(state.total), leaves.sum(), rtol=1e-5)
    # Every internal node equals the sum of its children up to float32 rounding.
    f = state.branching
    for upper, lower in zip(state.levels[:-1], state.levels[1:], strict=True):
        sums = np.asarray(lower, np.float64).reshape(-1, f).sum(axis=1)
        np.testing.assert_allclose(np.asarray(upper), sums, rtol=1e-5, atol=1e-12)


def test_beta_schedule_anneals_linearly_to_one():
    assert per.beta_schedule(0) == 0.4
    assert abs(per.beta_schedule(50_000) - 0.7) < 1e-12
    assert per.beta_schedule(10**7) == 1.0
    with pytest.raises(ValueError, match="beta1 must be in"):
        per.beta_schedule(0, beta1=1.5)  # `sample` would refuse its betas only steps later
    assert per.beta_schedule(0, steps=0) == 1.0  # no annealing (it started at beta0)


def test_rl_anneals_beta_by_the_samples_ppo_drew():
    """An iteration that ran no update (its buffer still empty) draws nothing, so beta stays
    where it was (it advanced by the iteration's number before)."""
    from o1jax.train.config import RLSection
    from o1jax.train.rl_loop import update_beta

    r = RLSection(batch_size=32, epochs=2, beta0=0.4, beta_steps=640)
    assert update_beta(r, 0, 0) == 0.4  # the first update, whatever iteration it runs in
    assert update_beta(r, 0, 3) == per.beta_schedule(3 * 32, 0.4, 1.0, 640)
    assert update_beta(r, 2 * 5, 1) == per.beta_schedule(6 * 32, 0.4, 1.0, 640)


def test_a_round_in_one_program_writes_the_tree_in_place():
    # add -> sample -> update traced into one loop: no read of the tree may be left unordered
    # before update's in-place write, or XLA copies the whole tree every round.
    capacity, batch = 1 << 16, 64
    state = jax.eval_shape(lambda: per.init(capacity, ITEM))

    def round_(i, state):
        ids = jnp.full((batch,), i)
        items = {"x": jnp.zeros((batch, 3), jnp.float32) + i, "id": ids}
        state = per.add(state, items, jnp.ones((batch,)))
        _, idx, weights = per.sample(state, jax.random.key(0), batch, 0.4)
        return per.update(state, idx, weights)

    loop = jax.jit(lambda s: jax.lax.fori_loop(0, 4, round_, s), donate_argnums=0)
    hlo = loop.lower(state).compile().as_text()
    tree_shape = f"f32[{state.tree.shape[0]}]"
    copies = [line for line in hlo.splitlines() if f"{tree_shape}{{0}} copy(" in line]
    assert not copies, copies


def test_add_refuses_items_of_the_wrong_shape_or_dtype_naming_the_leaf():
    """A leaf missing its item axis, or with an extra one, was broadcast into every slot; float
    values were truncated into an int buffer."""
    example = {"tok": np.zeros((4,), np.int32), "adv": np.zeros((), np.float32)}
    ones = np.ones(4, np.float32)
    tok = np.arange(16, dtype=np.int32).reshape(4, 4)
    for bad, shape in (
        ({"tok": tok[0], "adv": ones}, "(4,)"),
        ({"tok": tok, "adv": ones[:, None]}, "(4, 1)"),
    ):
        with pytest.raises(ValueError, match=r"per.add: item \['(tok|adv)'\] has shape") as e:
            per.add(per.init(8, example), bad, ones)
        assert shape in str(e.value) and "expected (M, *item_shape)" in str(e.value)
    with pytest.raises(ValueError, match=r"\['tok'\] has shape \(4,\), .* = \(4, 4\)"):
        per.add(per.init(8, example), {"tok": tok[0], "adv": ones}, ones)
    with pytest.raises(TypeError, match=r"per.add: item \['tok'\] has dtype float32"):
        per.add(per.init(8, example), {"tok": np.full((4, 4), 2.7, np.float32), "adv": ones}, ones)
    # Same-kind casts still go through: int64 ids, int values into a float buffer.
    state = per.add(per.init(8, example), {"tok": tok.astype(np.int64), "adv": np.arange(4)}, ones)
    np.testing.assert_array_equal(np.asarray(state.items["tok"][:4]), tok)
    np.testing.assert_array_equal(np.asarray(state.items["adv"][:4]), np.arange(4.0))


def test_out_of_range_alpha_beta_and_batch_size_are_refused():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        per.init(8, ITEM, alpha=-1.0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        per.init(8, ITEM, alpha=float("nan"))
    state = per.add(
        per.init(8, ITEM, alpha=1.0), _items(np.arange(3)), jnp.asarray([1.0, 2.0, 3.0])
    )
    for beta in (-1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta must be in"):
            per.sample(state, jax.random.key(0), 4, beta)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        per.sample(state, jax.random.key(0), 0, 0.4)
    # Traced values are not checked, and work.
    state = jax.jit(lambda a: per.init(8, ITEM, alpha=a))(0.5)
    _, _, w = jax.jit(lambda b: per.sample(state, jax.random.key(0), 4, b))(0.5)
    assert w.shape == (4,)


def test_float_sizes_and_misshaped_priorities_are_refused_naming_them():
    """A float capacity or batch_size failed in a shape, and mismatched priorities in a chex
    check (a list of them, under add's jit, in a NumPy conversion of a tracer): none named
    the argument."""
    with pytest.raises(TypeError, match=r"per.init: capacity must be an int, got 8.0"):
        per.init(8.0, ITEM)
    state = per.init(8, ITEM)
    with pytest.raises(TypeError, match=r"per.sample: batch_size must be an int, got 2.0"):
        per.sample(state, jax.random.key(0), 2.0, 0.4)
    for bad, got in ((jnp.ones(3), r"\(3,\)"), ([1.0, 2.0], "list")):
        with pytest.raises(ValueError, match=rf"per.add: priorities must .* \(2,\), .*got {got}"):
            per.add(state, _items([1, 2]), bad)
    with pytest.raises(ValueError, match=r"per.update: .* \[M\], got \(2,\) and \(3,\)"):
        per.update(state, jnp.asarray([0, 1]), jnp.ones(3))
