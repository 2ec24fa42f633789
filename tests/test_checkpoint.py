"""Run checkpoints: a round trip, and a clear one-line error for a state of another layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.model import CheckpointError
from o1jax.train.checkpoint import Checkpointer


def _state(levels):
    return {"lora": jnp.arange(3, dtype=jnp.float32), "buffer": levels}


def test_restore_gives_back_what_was_saved(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    saved = _state((jnp.ones(1), jnp.full((16,), 2.0)))
    checkpointer.save(7, saved, {"stage": "rl", "step": 7})
    restored, meta = checkpointer.restore(7, saved)
    checkpointer.close()
    assert meta == {"stage": "rl", "step": 7}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_state_of_another_layout_is_a_one_line_checkpoint_error(tmp_path):
    # An older o1jax's replay buffer kept one array per level; this one keeps one flat array.
    # (A shape mismatch is not exercised here: orbax fails it mid-read and leaves its pending
    # reads to warn in whichever test runs next. The config fingerprint already refuses a
    # workdir whose config, and so whose shapes, differ.)
    like = _state(jnp.zeros(17))
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(3, _state((jnp.ones(1), jnp.full((16,), 2.0))), {"stage": "rl"})
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore(3, like)
    checkpointer.close()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "3") + ":")


def test_a_save_cut_short_by_a_kill_leaves_no_directory_behind(tmp_path):
    """A kill mid-save leaves orbax's tmp directory; at 27B scale each is as large as a
    checkpoint, so the next run must remove it rather than keep it forever."""
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(2, _state(jnp.ones(4)), {"stage": "sft"})
    checkpointer.close()
    (tmp_path / "3.orbax-checkpoint-tmp-12345").mkdir()
    checkpointer = Checkpointer(str(tmp_path), keep=1)
    assert checkpointer.latest_step() == 2
    checkpointer.save(3, _state(jnp.ones(4)), {"stage": "sft"})
    checkpointer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]
