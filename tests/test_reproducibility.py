"""Reproducibility across restarts: a run resumed on another number of devices (a TPU job
preempted and restarted on a slice of another size) restores its checkpoint and goes on."""

import os

import jax
import numpy as np
import optax
import pytest

from o1jax.model import Gemma2Config, lora
from o1jax.parallel.mesh import copy_to_mesh, init_sharded, make_mesh
from o1jax.rl import per
from o1jax.train.checkpoint import Checkpointer
from o1jax.train.config import ConfigError, dump_config, load_config, to_dict
from o1jax.train.run_context import check_workdir, require_same_config

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "smoke.yaml")  # fmt: skip


# How memory is spent changes no number either; a bigger or smaller slice may need another
# micro-batch (a multiple of the batch axes) or remat (tests/test_sft.py, test_ppo.py: the same
# updates with and without them).
MEMORY = ["sft.micro_batch_size=4", "rl.micro_batch_size=8", "sft.loss_chunk=32"]
MEMORY += ["rl.loss_chunk=16", "model.remat=true"]


@pytest.mark.parametrize(
    "mesh", [["mesh.data=1"], ["mesh.data=2", "mesh.fsdp=4"], ["mesh.data=4", *MEMORY]]
)
def test_a_resume_may_change_the_mesh_but_nothing_that_changes_numbers(tmp_path, mesh):
    saved = load_config(SMOKE)  # mesh {data: -1}
    dump_config(saved, str(tmp_path / "config.yaml"))
    # Restarted on another slice, which an explicit mesh must name: the same numbers up to
    # float rounding (test_train.py: the same SFT losses on 1 and 8 devices).
    moved = load_config(SMOKE, [*mesh, "checkpoint.every=4"])
    require_same_config(to_dict(saved), moved, "a checkpoint")
    check_workdir(moved, str(tmp_path))
    for override, diff in (
        ("seed=1", "seed: 0 in the workdir, 1 now"),
        ("sft.batch_size=16", "sft.batch_size: 8 in the workdir, 16 now"),
        ("rl.epochs=1", "rl.epochs: 2 in the workdir, 1 now"),
    ):
        other = load_config(SMOKE, [*mesh, override])
        with pytest.raises(ConfigError, match=diff):
            require_same_config(to_dict(saved), other, "a checkpoint")
        with pytest.raises(ConfigError, match=diff):
            check_workdir(other, str(tmp_path))


def _adapter_state(mesh):
    """A LoRA adapter and its Adam state laid out on `mesh` (as trainers hold them), and a
    replay buffer on one device."""
    cfg = Gemma2Config.tiny(vocab_size=64, num_layers=1, d_model=64, num_heads=2, num_kv_heads=1,
                            head_dim=32, ffn_dim=128)  # fmt: skip
    adapter = copy_to_mesh(
        lora.init(
            cfg,
            jax.random.key(0),
            lora.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "down_proj")),
        ),
        mesh,
        heads=cfg,
    )
    opt_state = init_sharded(optax.adam(1e-3).init, adapter, mesh, cfg)
    buffer = per.init(16, {"tokens": np.zeros((8,), np.int32)}, alpha=0.6)
    return {"lora": adapter, "opt": opt_state, "per": buffer}


@pytest.mark.parametrize("before,after", [(8, 1), (1, 8)])
def test_a_checkpoint_restores_onto_another_number_of_devices(tmp_path, before, after):
    devices = jax.devices()
    write_mesh = make_mesh({"fsdp": -1}, devices[:before])
    read_mesh = make_mesh({"fsdp": -1}, devices[:after])
    state = _adapter_state(write_mesh)
    state["lora"] = jax.tree.map(lambda x: x + 1.0, state["lora"])  # B no longer all zeros
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(3, state, {"stage": "rl", "iteration": 1})
    like = _adapter_state(read_mesh)
    restored, meta = checkpointer.restore(3, like)
    checkpointer.close()
    assert meta == {"stage": "rl", "iteration": 1}
    for got, want, shape in zip(
        jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(like), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(shape.sharding, got.ndim)
    assert any(len(x.sharding.device_set) == after for x in jax.tree.leaves(restored["lora"]))
