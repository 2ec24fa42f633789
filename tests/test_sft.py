"""SFT: packing with document masks, loss masks, LoRA vs full, 1 vs 8 devices, NaN skipping,
chunked losses and micro-batches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.model import Gemma2Config, forward, init_params, lora
from o1jax.parallel.mesh import make_mesh, shard_batch
from o1jax.train.checkpoint import Checkpointer
from o1jax.train.config import ConfigError
from o1jax.train.sft import Example, SFTConfig, SFTTrainer, lm_loss, nonfinite_count, pack

CFG = Gemma2Config.tiny(
    vocab_size=40,
    num_layers=2,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    ffn_dim=64,
    sliding_window=5,
)


def _examples(n=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = int(rng.integers(5, 14))
        tokens = rng.integers(3, CFG.vocab_size, size).astype(np.int32)
        mask = np.arange(size) >= size // 3  # the "problem" third is not trained on
        out.append(Example(tokens, mask))
    return out


def test_pack_fills_rows_in_order_and_rejects_long_examples():
    examples = _examples()
    packed = pack(examples, seq_len=32)
    assert packed.tokens.shape[1] == 32
    flat = [
        t for row, seg in zip(packed.tokens, packed.segment_ids, strict=True) for t in row[seg > 0]
    ]
    np.testing.assert_array_equal(flat, np.concatenate([e.tokens for e in examples]))
    assert packed.positions[packed.segment_ids == 1].min() == 0
    with pytest.raises(ValueError, match="example 0 has 40 tokens"):
        pack([Example(np.ones(40, np.int32), np.ones(40, bool))], seq_len=32)


def test_pack_rejects_a_loss_mask_of_another_shape_and_float_tokens():
    """A length-1 mask used to be broadcast over the tokens, and float tokens truncated."""
    good = Example(np.arange(3, 8, dtype=np.int32), np.ones(5, bool))
    bad_mask = Example(np.arange(3, 8, dtype=np.int32), np.asarray([True]))
    with pytest.raises(ValueError, match=r"example 1 has tokens of shape \(5,\) and a loss_mask "):
        pack([good, bad_mask], seq_len=8)
    with pytest.raises(ValueError, match=r"example 1 has tokens of shape \(1, 5\)"):
        pack([good, Example(good.tokens[None], good.loss_mask[None])], seq_len=8)
    with pytest.raises(ValueError, match="example 1 has float64 tokens"):
        pack([good, Example(np.arange(5) + 2.7, np.ones(5, bool))], seq_len=8)
    packed = pack([good, Example([3, 4, 5], [0, 1, 1])], seq_len=8)  # lists are fine
    np.testing.assert_array_equal(packed.loss_mask[0], [1, 1, 1, 1, 1, 0, 1, 1])


def test_packed_rows_equal_separate_documents():
    params = init_params(CFG, jax.random.key(0))
    examples = _examples(6)
    packed = pack(examples, seq_len=40)
    logits = forward(
        params,
        CFG,
        jnp.asarray(packed.tokens),
        positions=jnp.asarray(packed.positions),
        segment_ids=jnp.asarray(packed.segment_ids),
    )
    row, seg = 0, 2
    sel = packed.segment_ids[row] == seg
    doc = packed.tokens[row][sel]
    alone = forward(params, CFG, jnp.asarray(doc)[None])[0]
    np.testing.assert_allclose(np.asarray(logits[row])[sel], np.asarray(alone), atol=1e-5)


def test_loss_counts_only_masked_targets_inside_documents():
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10]])
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1]], bool)
    logits = jax.random.normal(jax.random.key(0), (1, 6, 40))
    loss, count = lm_loss(logits, tokens, mask, segments)
    logp = jax.nn.log_softmax(logits[0])
    # Targets: 6 (from 5), 7 (from 6), and 9 (from 8) — not 8 (crosses documents), not padding.
    expected = -(logp[0, 6] + logp[1, 7] + logp[3, 9]) / 3
    assert int(count) == 3
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def _train(mesh, steps=4, adapter=None, config=None):
    params = init_params(CFG, jax.random.key(1))
    config = config or SFTConfig(
        steps=steps, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=2
    )
    trainer = SFTTrainer(CFG, params, config, mesh, lora=adapter)
    packed = pack(_examples(40), seq_len=32)
    losses = [float(trainer.train_step(packed.batch(s, 8, seed=0))["loss"]) for s in range(steps)]
    return trainer, losses


def test_sft_loss_curve_is_the_same_on_1_and_8_devices():
    _, one = _train(make_mesh(devices=jax.devices()[:1]))
    _, eight = _train(make_mesh({"data": 2, "fsdp": 4}))
    assert one[-1] < one[0]
    np.testing.assert_allclose(one, eight, atol=1e-5)


def test_lora_sft_trains_only_the_adapter():
    adapter = lora.init(CFG, jax.random.key(2), lora.LoRAConfig(rank=4, alpha=8))
    base = init_params(CFG, jax.random.key(1))
    trainer, losses = _train(make_mesh(), adapter=adapter)
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, base, jax.tree.map(np.asarray, trainer.params))
    assert any(
        float(jnp.abs(b["b"]).max()) > 0
        for layer in trainer.lora.weights.values()
        for g in layer.values()
        for b in g.values()
    )


def test_the_callers_params_and_adapter_survive_the_donated_steps():
    """The step donates its state; what the caller handed in (the params of a full fine-tune,
    or an adapter) must stay usable, e.g. to evaluate the base model afterwards."""
    params = init_params(CFG, jax.random.key(1))
    adapter = lora.init(CFG, jax.random.key(2), lora.LoRAConfig(rank=4, alpha=8))
    kept = jax.tree.map(jnp.copy, (params, adapter))  # (a NumPy view would pin the buffers)
    packed = pack(_examples(16), seq_len=32)
    one = make_mesh(devices=jax.devices()[:1])  # params already there are not copied by a put
    for lora_ in (None, adapter):
        trainer = SFTTrainer(CFG, params, SFTConfig(batch_size=8, seq_len=32), one, lora=lora_)
        for step in range(2):
            trainer.train_step(packed.batch(step, 8, 0))
    assert not any(x.is_deleted() for x in jax.tree.leaves((params, adapter)))
    jax.tree.map(np.testing.assert_array_equal, kept, jax.tree.map(np.asarray, (params, adapter)))


def test_nonfinite_loss_skips_the_update_and_is_counted():
    params = init_params(CFG, jax.random.key(1))
    with pytest.raises(ValueError, match="multiple of the mesh's data x fsdp size 8"):
        SFTTrainer(CFG, params, SFTConfig(batch_size=4), make_mesh())
    trainer = SFTTrainer(CFG, params, SFTConfig(steps=3, batch_size=8, seq_len=32), make_mesh())
    packed = pack(_examples(16), seq_len=32)
    trainer.train_step(packed.batch(0, 8, 0))
    before = jax.tree.map(np.asarray, trainer.state.trainable)
    # Poison the params so the loss is NaN: the step must leave the state unchanged.
    emb = trainer.state.trainable["embedder"]["embedding"]
    trainer.state.trainable["embedder"]["embedding"] = emb.at[0, 0].set(jnp.nan)
    poisoned = jax.tree.map(np.asarray, trainer.state.trainable)
    metrics = trainer.train_step(packed.batch(1, 8, 0))
    assert not bool(metrics["finite"])
    assert nonfinite_count(trainer.state.opt_state) == 1
    jax.tree.map(
        np.testing.assert_array_equal, poisoned, jax.tree.map(np.asarray, trainer.state.trainable)
    )
    assert before is not None


def test_no_warmup_means_the_full_rate_from_the_first_step():
    from o1jax.train.sft import make_optimizer

    params = {"w": jnp.ones(3)}
    optimizer = make_optimizer(SFTConfig(steps=10, warmup_steps=0, learning_rate=0.01))
    updates, _ = optimizer.update({"w": jnp.ones(3)}, optimizer.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) > 0.005  # was 0: one step at rate 0


def test_bf16_full_finetune_trains_float32_master_weights_and_resumes(tmp_path):
    """Adam's first steps, about the learning rate in size, round away when added to bfloat16
    weights (here, 2 steps at lr 1e-5 move 27% of them). A full fine-tune of bf16 params trains a
    float32 copy, samples with it cast back, and checkpoints and resumes it as it is."""
    params = init_params(CFG, jax.random.key(1), jnp.bfloat16)
    config = SFTConfig(
        steps=6, batch_size=8, seq_len=32, learning_rate=1e-5, warmup_steps=0, weight_decay=0.0
    )
    mesh = make_mesh()
    packed = pack(_examples(40), seq_len=32)
    start = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
    trainer = SFTTrainer(CFG, params, config, mesh)
    for step in range(2):
        trainer.train_step(packed.batch(step, 8, 0))
    floats = [
        x.dtype
        for x in jax.tree.leaves((trainer.state.trainable, trainer.state.opt_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert set(floats) == {np.dtype(np.float32)}  # the trained copy and Adam's moments
    trained = jax.tree.leaves(trainer.state.trainable)
    moved = [np.asarray(t) != s for t, s in zip(trained, start, strict=True)]
    assert np.mean(np.concatenate([m.ravel() for m in moved])) > 0.95
    sampled = jax.tree.leaves(trainer.params)
    assert {x.dtype for x in sampled} == {jnp.dtype(jnp.bfloat16)}
    for x, t in zip(sampled, trained, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(t.astype(jnp.bfloat16)))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))  # the caller's survive

    # Save, restore into the structure a fresh trainer has (as pipeline._checkpoint_like does),
    # and go on: the same losses and the same state as the uninterrupted trainer.
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(2, {"sft": trainer.state}, {"stage": "sft", "step": 2})
    like = {"sft": SFTTrainer(CFG, params, SFTConfig(batch_size=8), mesh).state}
    restored, _ = checkpointer.restore(2, like)
    checkpointer.close()
    resumed = SFTTrainer(CFG, params, config, mesh)
    resumed.state = restored["sft"]
    losses = [
        [float(t.train_step(packed.batch(step, 8, 0))["loss"]) for step in (2, 3)]
        for t in (trainer, resumed)
    ]
    assert losses[0] == losses[1]
    for a, b in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(resumed.state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- memory knobs
def _one_step(config, mesh, cfg=CFG, adapter=None, steps=2):
    """Losses, grad norms and the trained state after `steps` steps of a batch of 16 rows."""
    params = init_params(cfg, jax.random.key(1))
    trainer = SFTTrainer(cfg, params, config, mesh, lora=adapter)
    packed = pack(_examples(64), seq_len=32)
    metrics = [trainer.train_step(packed.batch(s, config.batch_size, 0)) for s in range(steps)]
    return (
        [float(m["loss"]) for m in metrics],
        [float(m["grad_norm"]) for m in metrics],
        [float(m["target_tokens"]) for m in metrics],
        jax.tree.map(np.asarray, trainer.state.trainable),
    )


def _assert_same_run(a, b, atol=1e-5):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=atol)  # losses
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=atol)  # grad norms
    assert a[2] == b[2]  # target tokens
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a[3], b[3])


def test_chunked_lm_loss_equals_the_full_one_values_and_grads():
    from o1jax.train.sft import lm_nll_chunked

    params = init_params(CFG, jax.random.key(1))
    packed = pack(_examples(16), seq_len=32)
    b = {k: jnp.asarray(v) for k, v in packed.batch(0, 4, 0).items()}
    masks = (b["tokens"], b["loss_mask"], b["segment_ids"])
    kw = dict(positions=b["positions"], segment_ids=b["segment_ids"])

    def full(p):
        return lm_loss(forward(p, CFG, b["tokens"], **kw), *masks)

    def chunked(p, chunk):
        hidden = forward(p, CFG, b["tokens"], return_hidden=True, **kw)
        total, count = lm_nll_chunked(p, CFG, hidden, *masks, chunk=chunk)
        return total / jnp.maximum(count, 1.0), count

    grad = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)
    (want, want_count), want_grads = grad(lambda p, _: full(p))(params, None)
    for chunk in (8, 12):  # a divisor of T = 32, a non-divisor
        (got, count), grads = grad(chunked)(params, chunk)
        assert float(count) == float(want_count) > 0
        np.testing.assert_allclose(got, want, rtol=1e-6)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), grads, want_grads)


_KNOBS_BASE = SFTConfig(steps=10, batch_size=16, seq_len=32, learning_rate=1e-2, warmup_steps=2)


def test_micro_batches_and_loss_chunks_train_as_the_whole_batch_does():
    """The memory knobs change what is kept, not what is computed: 4 micro-batches of 4 rows
    with the loss in chunks of 12 positions (T = 32) give the whole batch's losses, gradient
    norms and trained params, to float reassociation."""
    one = make_mesh(devices=jax.devices()[:1])
    knobs = dataclasses.replace(_KNOBS_BASE, micro_batch_size=4, loss_chunk=12)
    _assert_same_run(_one_step(knobs, one), _one_step(_KNOBS_BASE, one))


def test_micro_batches_on_8_devices_with_remat_and_lora_train_as_the_whole_batch_does():
    """Micro-batches of one row per device (data 2 x fsdp 4), remat and a chunked loss, on a
    LoRA adapter: the whole batch's run on one device, to float reassociation."""
    adapter = lambda: lora.init(CFG, jax.random.key(2), lora.LoRAConfig(rank=4, alpha=8))
    knobs = dataclasses.replace(_KNOBS_BASE, micro_batch_size=8, loss_chunk=8)
    eight = make_mesh({"data": 2, "fsdp": 4})
    _assert_same_run(
        _one_step(knobs, eight, CFG.replace(remat=True), adapter=adapter()),
        _one_step(_KNOBS_BASE, make_mesh(devices=jax.devices()[:1]), adapter=adapter()),
    )


def test_micro_batches_that_do_not_split_the_batch_or_the_mesh_are_refused():
    params = init_params(CFG, jax.random.key(1))
    for config, message in [
        (SFTConfig(batch_size=16, micro_batch_size=6), r"sft.micro_batch_size: must divide "),
        (SFTConfig(batch_size=16, micro_batch_size=4), r"sft.micro_batch_size: must be a mul"),
        (SFTConfig(batch_size=16, micro_batch_size=-1), r"sft.micro_batch_size: must be >= 0"),
        (SFTConfig(batch_size=16, loss_chunk=-2), r"sft.loss_chunk: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SFTTrainer(CFG, params, config, make_mesh())  # 8 devices on `data`


def test_a_chunked_loss_never_holds_the_batchs_logits():
    """XLA's memory analysis of the compiled step (nothing runs): with a 32k vocabulary the
    [B, T, V] float32 logits are 128 MiB. Without chunks the step's temporaries exceed them
    (logits, log-softmax and their gradients); with chunks of 64 positions they stay below."""
    cfg = Gemma2Config.tiny(
        vocab_size=32768, num_layers=1, d_model=64, num_heads=2, num_kv_heads=1, head_dim=32,
        ffn_dim=128, sliding_window=64,
    )  # fmt: skip
    b, t = 2, 512
    logits_bytes = b * t * cfg.vocab_size * 4
    params = init_params(cfg, jax.random.key(0))
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = {
        "tokens": np.ones((b, t), np.int32),
        "loss_mask": np.ones((b, t), bool),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
    }

    def temp_bytes(loss_chunk):
        config = SFTConfig(batch_size=b, seq_len=t, loss_chunk=loss_chunk)
        trainer = SFTTrainer(cfg, params, config, mesh)
        with jax.set_mesh(mesh):
            lowered = trainer._step.lower(trainer.state, trainer.frozen, shard_batch(batch, mesh))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(0) > logits_bytes
    assert temp_bytes(64) < logits_bytes


def test_under_fsdp_a_chunked_loss_keeps_each_devices_rows_on_it():
    """fsdp splits the params' D over the devices that split the batch. Left to itself, XLA
    contracted over the split D with one row per device: every device computed the whole
    batch's MLP activations and logits and all-reduced them. The chunked loss pins the rows to
    their devices (and the model's layers follow): no array of the whole batch is left."""
    cfg = Gemma2Config.tiny(
        vocab_size=4096, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2, head_dim=32,
        ffn_dim=1024, sliding_window=64,
    )  # fmt: skip
    b, t, chunk = 8, 256, 64
    mesh = make_mesh({"fsdp": 8})
    adapter = lora.init(cfg, jax.random.key(2), lora.LoRAConfig(rank=4, alpha=8))
    config = SFTConfig(batch_size=b, seq_len=t, loss_chunk=chunk)
    trainer = SFTTrainer(cfg, init_params(cfg, jax.random.key(0)), config, mesh, lora=adapter)
    batch = {
        "tokens": np.ones((b, t), np.int32),
        "loss_mask": np.ones((b, t), bool),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
    }
    with jax.set_mesh(mesh):
        lowered = trainer._step.lower(trainer.state, trainer.frozen, shard_batch(batch, mesh))
    text = lowered.compile().as_text()
    assert f"f32[1,{t},{cfg.ffn_dim}]" in text  # each device's own row of the MLP
    assert f"f32[{b},{t},{cfg.ffn_dim}]" not in text
    assert f"f32[{b},{chunk},{cfg.vocab_size}]" not in text


@pytest.mark.parametrize("shape", [{"data": -1}, {"fsdp": -1}])
def test_the_caller_keeps_its_arrays_and_adam_starts_sharded(shape):
    """On 8 devices: a step donates the trainer's state, never the caller's params or adapter
    (device_put(..., may_alias=False) handed a single-device array's buffer to a replicated
    layout); and Adam's moments are laid out like what they train from the start, not whole on
    every device until the first step (and again after every restore into a fresh trainer)."""
    mesh = make_mesh(shape)
    packed = pack(_examples(16), seq_len=32)
    for use_lora in (False, True):
        params = init_params(CFG, jax.random.key(1))
        adapter = lora.init(CFG, jax.random.key(2), lora.LoRAConfig(rank=4, alpha=8))
        given = adapter if use_lora else None
        trainer = SFTTrainer(CFG, params, SFTConfig(batch_size=8, seq_len=32), mesh, lora=given)
        per_device = lambda t: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(t))
        # Adam's two moments take twice what they train on each device (plus small scalars).
        assert per_device(trainer.state.opt_state) <= 2 * per_device(trainer.state.trainable) + 64
        trainer.train_step(packed.batch(0, 8, 0))
        mine = jax.tree.leaves(adapter if use_lora else params)
        assert not any(x.is_deleted() for x in mine)
