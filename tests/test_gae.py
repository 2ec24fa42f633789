"""GAE at the edges of its masks: what lies on the padding never reaches the real steps."""

import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.rl.gae import gae


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (0.0, 0.0), (1.0, 1.0)])
def test_non_finite_padding_does_not_reach_the_real_steps(gamma, lam):
    """The mask multiplied each step's advantage, and 0 * NaN is NaN: a NaN or inf reward or
    value on the padding made every advantage and return of its path NaN."""
    rewards = np.asarray([[1.0, 0.5, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    values = np.asarray(
        [[0.5, 0.2, 0.1, 0.0], [0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32
    )  # the value after a path's last step bootstraps it; the rest is padding
    mask = np.asarray([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    clean = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    rewards[[0, 1, 1, 2], [2, 1, 2, 0]] = [np.nan, np.inf, -np.inf, np.nan]
    values[[0, 1, 2], [3, 3, 0]] = [np.nan, np.inf, np.nan]
    dirty = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    for got, want in zip(dirty, clean, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert np.all(np.asarray(got)[mask == 0] == 0)


def test_values_without_the_bootstrap_column_are_refused_naming_them():
    """Values [B, T] (many GAE codes take the bootstrap apart) failed a chex check that named
    no argument."""
    r = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"values \[B, T \+ 1\], got .* values \(2, 3\)"):
        gae(r, r, r, 0.9, 0.9)
    with pytest.raises(ValueError, match=r"got rewards \(3,\), values \(4,\), mask \(3,\)"):
        gae(r[0], np.zeros(4), r[0], 0.9, 0.9)
