"""Enhanced Borda Count on hand-made preference matrices, and the closure against a plain loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.search import ebc

NAN = np.nan


def _p(pairs: dict[tuple[int, int], float], n: int) -> np.ndarray:
    """P(i better than j) for the listed pairs (and the complement for (j, i)); NaN elsewhere."""
    p = np.full((n, n), NAN, np.float32)
    for (i, j), v in pairs.items():
        p[i, j], p[j, i] = v, 1.0 - v
    return p


def _run(p, valid=None):
    p = jnp.asarray(p)[None]
    valid = jnp.ones(p.shape[:2], bool) if valid is None else jnp.asarray(valid)[None]
    wins, values = ebc.enhanced_borda_count(p, valid)
    return np.asarray(wins[0]).tolist(), np.asarray(values[0])


def test_a_chain_of_adjacent_pairs_is_completed_to_a_total_order():
    # Only a > b, b > c, c > d were compared; the closure supplies the other three pairs.
    wins, values = _run(_p({(0, 1): 0.9, (1, 2): 0.7, (2, 3): 0.6}, 4))
    assert wins == [3, 2, 1, 0]
    np.testing.assert_allclose(values, [1.0, 2 / 3, 1 / 3, 0.0], atol=1e-6)


def test_a_cycle_ties_its_members_above_what_they_all_beat():
    # a > b > c > a, and each of them beats d: the three tie for first, and their summed
    # preferences (0.8 + 0.2 + 0.9 each) tie too, so the soft re-ranking keeps the tie.
    p = _p({(0, 1): 0.8, (1, 2): 0.8, (2, 0): 0.8, (0, 3): 0.9, (1, 3): 0.9, (2, 3): 0.9}, 4)
    wins, values = _run(p)
    assert wins == [3, 3, 3, 0]
    np.testing.assert_allclose(values, [1.0, 1.0, 1.0, 0.0], atol=1e-6)


def test_a_cycle_is_re_ranked_by_summed_preference():
    """LLaMA-Berry's soft comparison: equal Borda counts ordered by sum_j P(i > j)."""
    # 0 > 1 at .51, 1 > 2 at .51, 2 > 0 at .99; all three beat 3. Summed preferences:
    # 0: .51 + .01 + .9 = 1.42; 1: .49 + .51 + .9 = 1.90; 2: .49 + .99 + .9 = 2.38.
    p = _p({(0, 1): 0.51, (1, 2): 0.51, (2, 0): 0.99, (0, 3): 0.9, (1, 3): 0.9, (2, 3): 0.9}, 4)
    wins, values = _run(p)
    assert wins == [3, 3, 3, 0]  # the Borda counts themselves are unchanged
    np.testing.assert_allclose(values, [1 / 3, 2 / 3, 1.0, 0.0], atol=1e-6)
    assert int(np.argmax(values)) == 2
    soft = np.asarray(ebc.soft_scores(jnp.asarray(p)[None], jnp.ones((1, 4), bool)))[0]
    np.testing.assert_allclose(soft, [1.42, 1.90, 2.38, 0.3], atol=1e-5)


def test_soft_scores_within_the_tolerance_of_a_neighbour_tie_as_one_group():
    """a within SOFT_TOL of b, b within it of c: all three tie (a pairwise tolerance tied a with
    b and b with c, yet ranked a under c). A gap above SOFT_TOL still orders, invalid slots
    count for nothing."""
    tol = ebc.SOFT_TOL
    wins = jnp.asarray([[2, 2, 2, 2, 0, 2]])
    soft = jnp.asarray([[1.0, 1.0 + 0.6 * tol, 1.0 + 1.2 * tol, 0.5, 0.0, 9.0]], jnp.float32)
    valid = jnp.asarray([[True, True, True, True, True, False]])
    values = np.asarray(ebc.global_values(wins, valid, soft))[0]
    np.testing.assert_allclose(values, [1.0, 1.0, 1.0, 0.25, 0.0, 0.0], atol=1e-6)
    rng = np.random.default_rng(0)  # without soft scores: ranks by Borda count alone
    for _ in range(20):
        wins, valid = rng.integers(0, 4, (1, 7)), rng.random((1, 7)) < 0.8
        got = np.asarray(ebc.global_values(jnp.asarray(wins), jnp.asarray(valid)))[0]
        above = [sum(valid[0, j] and wins[0, j] > wins[0, i] for j in range(7)) for i in range(7)]
        want = 1 - np.asarray(above) / max(valid.sum() - 1, 1)
        np.testing.assert_allclose(got, np.where(valid[0], want, 0.0), atol=1e-6)


def test_soft_scores_never_reorder_different_borda_counts():
    # 0 beats only 1, barely (.51), but reaches everything through 1, which wins its other
    # pairs at .99: 1's summed preference (2.98) is larger than 0's (2.01), 0 still ranks first.
    p = _p({(0, 1): 0.51, (1, 2): 0.51, (1, 3): 0.99, (2, 3): 0.99, (1, 4): 0.99, (3, 4): 0.6}, 5)
    wins, values = _run(p)
    assert wins == [4, 3, 2, 1, 0]
    soft = np.asarray(ebc.soft_scores(jnp.asarray(p)[None], jnp.ones((1, 5), bool)))[0]
    assert soft[1] > soft[0]  # 1 has the larger sum, but fewer wins
    np.testing.assert_allclose(values, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)


def test_missing_pairs_and_disconnected_groups():
    # a > b and c > d only: a and c tie on Borda count (1 win each), b and d behind them. The
    # soft comparison (a pair not compared counts 1/2) orders the ties: a (1.75) above c (1.55),
    # d (1.45) above b (1.25).
    wins, values = _run(_p({(0, 1): 0.75, (2, 3): 0.55}, 4))
    assert wins == [1, 0, 1, 0]
    np.testing.assert_allclose(values, [1.0, 0.0, 2 / 3, 1 / 3], atol=1e-6)


def test_reversed_probability_and_an_exact_half_mean_no_preference():
    # P(a > b) = 0.2 means b > a; P = 0.5 is no preference either way.
    wins, _ = _run(_p({(0, 1): 0.2, (1, 2): 0.5}, 3))
    assert wins == [0, 1, 0]


def test_invalid_slots_neither_win_nor_count():
    p = _p({(0, 1): 0.9, (1, 2): 0.9, (2, 3): 0.9}, 4)
    wins, values = _run(p, valid=np.array([True, False, True, True]))
    # b is padding: a no longer reaches c through b. a and d tie on Borda count; d lost to c
    # (soft 0.5 + 0.1) while a was never compared with c or d (0.5 + 0.5): a ranks above d.
    assert wins == [0, 0, 1, 0]
    np.testing.assert_allclose(values, [0.5, 0.0, 1.0, 0.0], atol=1e-6)


def _closure_loop(pref: np.ndarray) -> np.ndarray:
    reach = pref.copy()
    n = reach.shape[0]
    for k in range(n):
        for i in range(n):
            for j in range(n):
                if reach[i, k] and reach[k, j]:
                    reach[i, j] = True
    return reach


@pytest.mark.parametrize("density", [0.05, 0.15, 0.4])
def test_jitted_closure_equals_a_plain_floyd_warshall_loop(density):
    rng = np.random.default_rng(int(density * 100))
    pref = rng.random((6, 9, 9)) < density
    for b in range(6):
        np.fill_diagonal(pref[b], False)
    got = np.asarray(ebc.transitive_closure(jnp.asarray(pref)))
    for b in range(6):
        np.testing.assert_array_equal(got[b], _closure_loop(pref[b]))


def test_mix_values_weights_and_rejects_bad_weights():
    g, loc = jnp.asarray([1.0, 0.0]), jnp.asarray([0.2, 0.6])
    np.testing.assert_allclose(np.asarray(ebc.mix_values(g, loc, 0.25)), [0.4, 0.45], atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        ebc.mix_values(g, loc, 1.5)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"p_better must be \[B, n, n\] and valid \[B, n\]"):
        ebc.enhanced_borda_count(jnp.zeros((1, 3, 2)), jnp.ones((1, 3), bool))
    with pytest.raises(ValueError, match="got \\(1, 3, 3\\) and \\(1, 2\\)"):
        ebc.enhanced_borda_count(jnp.zeros((1, 3, 3)), jnp.ones((1, 2), bool))


def test_valid_is_read_as_bool_whatever_its_dtype():
    """valid = 2 (int) or 1.0 (float) means valid: no bitwise & with the preference matrix."""
    p = _p({(0, 1): 0.9, (1, 2): 0.8}, 3)
    expected = _run(p)
    for valid in (np.full(3, 2, np.int32), np.ones(3, np.float32)):
        wins, values = _run(p, valid=valid)
        assert wins == expected[0] == [2, 1, 0]
        np.testing.assert_allclose(values, expected[1], atol=1e-6)
    wins, values = _run(p, valid=np.array([2, 0, 3], np.int32))  # 0 stays invalid
    assert wins == [0, 0, 0]
    np.testing.assert_allclose(values, [1.0, 0.0, 1.0], atol=1e-6)
