"""Partition rules under tensor parallelism: attention projections split only in whole heads
(k/v replicated when the kv heads do not divide by the tensor axis), the same numbers as on one
device, and `o1jax.plan`'s per-device memory by the same rules."""

import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from o1jax import plan
from o1jax.model import Gemma2Config, init_params, lora
from o1jax.parallel.mesh import _path_str, make_mesh, param_shardings, spec_for
from o1jax.train.config import load_config
from o1jax.train.sft import Example, SFTConfig, SFTTrainer, make_optimizer, pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small(num_heads=8, num_kv_heads=4, head_dim=8):
    """Gemma2-2B's head layout (8 query heads, 4 kv heads) at a test's size."""
    return Gemma2Config.tiny(
        vocab_size=40,
        num_layers=2,
        d_model=32,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        ffn_dim=64,
        sliding_window=5,
    )


def _examples(n=40, vocab_size=40):
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 14, n)
    return [
        Example(rng.integers(3, vocab_size, k).astype(np.int32), np.arange(k) >= 2) for k in sizes
    ]


def _trees(cfg):
    """Shapes of the params, a LoRA adapter on every target and its Adam state."""
    key = jax.random.key(0)
    params = jax.eval_shape(lambda k: init_params(cfg, k), key)
    adapter = jax.eval_shape(lambda k: lora.init(cfg, k, lora.LoRAConfig(rank=4)), key)
    return params, adapter, jax.eval_shape(make_optimizer(SFTConfig()).init, adapter)


def test_gemma2_2b_heads_at_tensor_8_split_q_and_o_by_head_and_replicate_k_and_v():
    cfg, mesh = _small(), make_mesh({"tensor": 8})
    specs = {
        "layer_0/attn/q_proj/kernel": ((32, 64), P(None, "tensor")),
        "layer_0/attn/o_proj/kernel": ((64, 32), P("tensor", None)),
        "layer_0/attn/k_proj/kernel": ((32, 32), P(None, None)),  # was split: half a head each
        "layer_0/attn/v_proj/kernel": ((32, 32), P(None, None)),
        "weights/layer_0/attn/q_proj/b": ((4, 64), P(None, "tensor")),
        "weights/layer_0/attn/k_proj/b": ((4, 32), P(None, None)),
        "weights/layer_0/attn/o_proj/a": ((64, 4), P("tensor", None)),
        "layer_0/mlp/up_proj/kernel": ((32, 64), P(None, "tensor")),  # not heads: as before
    }
    for path, (shape, want) in specs.items():
        assert spec_for(path, shape, mesh, heads=cfg) == want, path
    # Without the heads, any dimension the axis divides is split (the rules' old behaviour).
    assert spec_for("layer_0/attn/k_proj/kernel", (32, 32), mesh) == P(None, "tensor")


@pytest.mark.parametrize(
    "heads, kv_heads",
    [(8, 4), (16, 8), (32, 16), (4, 1)],  # Gemma2 2B, 9B, 27B (head counts), the tiny model
)
@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_every_shard_of_an_attention_projection_holds_whole_heads(heads, kv_heads, tensor):
    cfg = _small(heads, kv_heads)
    mesh = make_mesh({"fsdp": 8 // tensor, "tensor": tensor})
    for tree in _trees(cfg):
        shardings = param_shardings(tree, mesh, heads=cfg)
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        for (path, x), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
            path = _path_str(path)
            m = re.search(r"(q|k|v|o)_proj/(kernel|a|b)$", path)
            if m is None:
                continue
            spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
            if "tensor" not in spec:
                continue
            count = kv_heads if m[1] in "kv" else heads
            dim = spec.index("tensor")
            assert x.shape[dim] == count * cfg.head_dim, path
            assert count % tensor == 0, f"{path} {x.shape} split over tensor={tensor}"
            assert sharding.shard_shape(x.shape)[dim] % cfg.head_dim == 0, path
    # Whole heads that divide by the axis are still split, as before.
    q = param_shardings(_trees(cfg)[0], mesh, heads=cfg)["layer_0"]["attn"]["q_proj"]["kernel"]
    assert ("tensor" in tuple(q.spec)) == (heads % tensor == 0)


def test_a_config_that_does_not_match_the_params_is_refused():
    with pytest.raises(ValueError, match=r"k_proj/kernel: dimension 48 is not num_kv_heads=4 x "):
        spec_for("layer_0/attn/k_proj/kernel", (32, 48), make_mesh({"tensor": 8}), heads=_small())


@pytest.mark.parametrize("shape", [{"tensor": 8}, {"data": 2, "tensor": 4}])
def test_lora_sft_on_a_data_x_tensor_mesh_matches_one_device(shape):
    """2B's head layout at tensor 8 (k/v replicated, one query head per device) and at data 2 x
    tensor 4 (one kv head and two query heads per device): the trainer places the base and the
    adapter by the whole-head rules, and two steps give one device's losses and adapter."""
    cfg = _small()
    params = init_params(cfg, jax.random.key(1))
    adapter = lora.init(cfg, jax.random.key(2), lora.LoRAConfig(rank=4, alpha=8))
    b = jax.random.normal(jax.random.key(3), (4, cfg.num_kv_heads * cfg.head_dim)) * 0.1
    adapter.weights["layer_0"]["attn"]["k_proj"]["b"] = b  # a nonzero k/v update to shard
    config = SFTConfig(steps=2, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=1)
    packed = pack(_examples(), seq_len=32)
    losses, trainers = {}, {}
    for name, mesh in (("one", make_mesh(devices=jax.devices()[:1])), ("mesh", make_mesh(shape))):
        trainer = SFTTrainer(cfg, params, config, mesh, lora=adapter)
        batches = [packed.batch(s, 8, seed=0) for s in range(2)]
        losses[name] = [float(trainer.train_step(batch)["loss"]) for batch in batches]
        trainers[name] = trainer
    np.testing.assert_allclose(losses["one"], losses["mesh"], atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        trainers["one"].lora,
        trainers["mesh"].lora,
    )
    tensor = shape["tensor"]
    attn = trainers["mesh"].frozen["layer_0"]["attn"]
    k_spec = tuple(attn["k_proj"]["kernel"].sharding.spec)
    assert ("tensor" in k_spec) == (cfg.num_kv_heads % tensor == 0), k_spec
    assert tuple(attn["q_proj"]["kernel"].sharding.spec)[-1] == "tensor"
    k_b = trainers["mesh"].lora.weights["layer_0"]["attn"]["k_proj"]["b"]
    assert k_b.sharding.shard_shape(k_b.shape)[1] % cfg.head_dim == 0


def test_plan_counts_k_v_and_the_kv_cache_whole_on_every_device_at_gemma2_2b_tensor_8(capsys):
    path = os.path.join(ROOT, "configs", "gemma2-2b.yaml")
    config, cfg = load_config(path), Gemma2Config.gemma2_2b()
    one = plan.estimate(config, cfg, {"data": 1, "fsdp": 1, "tensor": 1}, 1)
    eight = plan.estimate(config, cfg, {"data": 1, "fsdp": 1, "tensor": 8}, 8)
    d, kv_out = cfg.d_model, cfg.num_kv_heads * cfg.head_dim
    whole_kv = cfg.num_layers * 2 * d * kv_out * 2  # k_proj and v_proj kernels, bf16
    # q/o, the MLP and the embedding split 8 ways; k/v (and the [D] norms) stay whole.
    norms = (4 * cfg.num_layers + 1) * d * 2
    expected = (one["base params"] - whole_kv - norms) / 8 + whole_kv + norms
    assert eight["base params"] == pytest.approx(expected, rel=1e-9)
    assert eight["KV cache (self-play)"] == pytest.approx(one["KV cache (self-play)"])
    # 9B's 8 kv heads split into one per device: its cache and k/v divide by 8.
    cfg9 = Gemma2Config.gemma2_9b()
    nine = {t: plan.estimate(config, cfg9, {"data": 1, "fsdp": 1, "tensor": t}, t) for t in (1, 8)}
    assert nine[8]["KV cache (self-play)"] == pytest.approx(nine[1]["KV cache (self-play)"] / 8)
    assert plan.main(["--config", path, "--mesh", "data=1,fsdp=1,tensor=8"]) == 0
    out = capsys.readouterr().out
    assert "k_proj/v_proj and the KV cache: replicated over tensor=8 (4 kv heads" in out
    assert "q_proj/o_proj: replicated" not in out
