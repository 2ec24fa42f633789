"""The RL stage's replay buffer: what it stores of an experience, what PPO gets back from it, and
its checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_experience import _fmt
from test_mcts import L, synthetic_expand_fn

from o1jax.model import CheckpointError
from o1jax.rl import per
from o1jax.rl.experience import experience_width, tree_to_experiences
from o1jax.rl.ppo import check_batch
from o1jax.search import mcts
from o1jax.search.mcts import MCTSConfig
from o1jax.train import rl_loop
from o1jax.train.checkpoint import Checkpointer


def _self_play_items():
    """(buffer items of a small self-play's valid experiences, the experience width)."""
    config = MCTSConfig(num_simulations=7, num_children=2, max_depth=4, thought_length=L)
    targets = np.array([7, 12])
    tree = mcts.run(
        synthetic_expand_fn(config, answer_depth=3),
        2,
        config,
        jax.random.key(3),
        reward_fn=lambda b, tok, n: (tok[:, 1] == targets[b]).astype(np.float32),
    )
    fmt = _fmt(config.max_depth)
    prompts, plens = jnp.asarray([[10, 11, 12, 0], [13, 14, 0, 0]]), jnp.asarray([3, 2])
    width = experience_width(fmt, prompts.shape[1], config)
    exps = tree_to_experiences(tree, prompts, plens, fmt, config, 0.99, 0.95, width, True)
    valid = np.flatnonzero(np.asarray(exps.valid))
    assert valid.size > 4
    return {k: np.asarray(v)[valid] for k, v in rl_loop._buffer_items(exps).items()}, width


def test_the_buffer_keeps_no_behaviour_logprobs_and_gives_ppo_what_it_reads():
    """PPO never reads the sampler's log-probs (an update's old log-probs are its own), yet the
    buffer stored [L] of them per item. Now it stores every other field, and a sampled batch
    comes back as an Experience PPO accepts, field for field the items added."""
    items, width = _self_play_items()
    layout = rl_loop._experience_item(width)
    assert "behaviour_logprobs" not in layout and "behaviour_logprobs" not in items
    assert set(items) == set(layout)
    state = per.init(64, layout)
    assert "behaviour_logprobs" not in state.items
    state = rl_loop._add_to_buffer(state, items, np.abs(items["advantage"]) + 1e-6, chunk=4)
    assert int(state.size) == len(items["length"])
    sample, indices, weights = per.sample(state, jax.random.key(0), 8, 0.4)
    batch = rl_loop._as_experience(sample, L)
    check_batch(batch, weights)
    assert batch.behaviour_logprobs.shape == (8, L) and bool(jnp.all(batch.valid))
    for name, value in items.items():
        np.testing.assert_array_equal(np.asarray(getattr(batch, name)), value[indices])


def test_a_checkpointed_buffer_restores_and_one_of_the_old_layout_is_refused(tmp_path):
    """The buffer's checkpoint restores into `rl_structures`' layout; one written while the
    buffer still held the behaviour log-probs is a one-line CheckpointError, not a crash."""
    items, width = _self_play_items()
    state = per.init(32, rl_loop._experience_item(width))
    state = rl_loop._add_to_buffer(state, items, np.abs(items["advantage"]) + 1e-6)
    saved = jax.tree.map(np.asarray, state)
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(1, {"per": state}, {"stage": "rl"})
    like = {"per": per.init(32, rl_loop._experience_item(width))}
    restored, _ = checkpointer.restore(1, like)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored["per"]), saved)

    old_layout = rl_loop._experience_item(width) | {"behaviour_logprobs": np.zeros(L, np.float32)}
    checkpointer.save(2, {"per": per.init(32, old_layout)}, {"stage": "rl"})
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore(2, like)
    checkpointer.close()
    assert "\n" not in str(error.value)


def test_a_skipped_update_leaves_its_items_priorities_alone():
    """An update skipped for a non-finite loss or gradient may return NaN priorities; writing
    them would store mass 0 and drop those items from replay for good. They keep their old
    priorities."""
    items, width = _self_play_items()
    state = per.init(64, rl_loop._experience_item(width))
    state = rl_loop._add_to_buffer(state, items, np.abs(items["advantage"]) + 1e-6, chunk=4)
    before = np.asarray(state.leaf_mass).copy()
    _, indices, _ = per.sample(state, jax.random.key(1), 4, 0.4)
    nan = jnp.full((4,), jnp.nan)
    state = rl_loop._write_priorities(state, indices, nan, skipped=True)
    np.testing.assert_array_equal(np.asarray(state.leaf_mass), before)
    state = rl_loop._write_priorities(state, indices, jnp.full((4,), 2.0), skipped=False)
    assert np.all(np.asarray(state.leaf_mass)[np.asarray(indices)] == pytest.approx(2.0**0.6))
