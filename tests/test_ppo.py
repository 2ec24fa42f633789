"""PPO on LoRA: exact ratio/KL at the start, base untouched, 1 vs 8 devices, learning direction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.model import Gemma2Config, forward, init_params, lora
from o1jax.parallel.mesh import make_mesh
from o1jax.rl.experience import Experience
from o1jax.rl.ppo import PPOConfig, PPOTrainer, sequence_logprobs, thought_logprobs

CFG = Gemma2Config.tiny(
    vocab_size=40,
    num_layers=2,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    ffn_dim=64,
    sliding_window=6,
)
POS, NEG, START_RATING = 4, 5, 6
M, W, L = 16, 24, 6


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(8, CFG.vocab_size, (M, W)).astype(np.int32)
    start = rng.integers(4, 12, M).astype(np.int32)
    act_len = rng.integers(2, L + 1, M).astype(np.int32)
    length = start + act_len + 1
    for i in range(M):
        tokens[i, length[i] - 1] = START_RATING
        tokens[i, length[i] :] = 0
    adv = np.where(np.arange(M) % 2 == 0, 1.0, -1.0).astype(np.float32)
    return Experience(
        tokens=jnp.asarray(tokens),
        length=jnp.asarray(length),
        action_start=jnp.asarray(start),
        action_length=jnp.asarray(act_len),
        behaviour_logprobs=jnp.zeros((M, L)),
        advantage=jnp.asarray(adv),
        value_target=jnp.asarray(rng.uniform(0, 1, M), jnp.float32),
        reward=jnp.zeros(M),
        valid=jnp.ones(M, bool),
    )


@pytest.fixture(scope="module")
def base():
    return init_params(CFG, jax.random.key(0))


def _trainer(base, mesh, epochs=2, lr=3e-3, kl_coef=0.05, loss_chunk=0, micro_batch_size=0):
    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    config = PPOConfig(
        epochs=epochs,
        learning_rate=lr,
        kl_coef=kl_coef,
        loss_chunk=loss_chunk,
        micro_batch_size=micro_batch_size,
    )
    return PPOTrainer(CFG, base, adapter, config, mesh, rating_tokens=(POS, NEG))


def test_first_update_has_ratio_one_and_kl_zero_exactly(base):
    trainer = _trainer(base, make_mesh())
    metrics, priorities = trainer.update(_batch(), jnp.ones(M))
    assert float(metrics["first/ratio_mean"]) == 1.0
    assert float(metrics["first/kl"]) == 0.0
    assert float(metrics["first/clip_fraction"]) == 0.0
    assert float(metrics["ratio_mean"]) != 1.0  # the second epoch saw a changed policy
    assert priorities.shape == (M,) and bool(jnp.all(priorities > 0))
    # A later batch also starts at ratio 1: the epoch's behaviour log-probs are its own.
    metrics, _ = trainer.update(_batch(1), jnp.ones(M))
    assert float(metrics["first/ratio_mean"]) == 1.0
    assert float(metrics["first/kl"]) > 0.0  # the adapter has moved away from the base


def test_new_priorities_are_on_the_scale_of_the_raw_advantages(base):
    """A replayed item's priority must be comparable with a new item's |advantage| + 1e-6 (what
    the RL stage adds it with): at ratio 1 (one epoch) they are equal, also for an item of
    advantage 0, which the batch normalisation would give a nonzero advantage, and with the
    value loss on (value_coef 1, the default): its cross-entropy, added to the signed policy
    term, brought an item of advantage 0 back at about 0.7, one of +0.5 at 0.2, one of -0.5 at
    1.2."""
    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    config = PPOConfig(epochs=1, kl_coef=0.05)
    assert config.value_coef == 1.0
    trainer = PPOTrainer(CFG, base, adapter, config, make_mesh(), rating_tokens=(POS, NEG))
    batch = _batch().replace(value_target=jnp.full((M,), 0.5))
    adv = np.asarray([0.0, 0.3, -0.05, 0.01, 0.5, -0.5, 0.0, 0.0] * (M // 8), np.float32)
    batch = batch.replace(advantage=jnp.asarray(adv))
    _, priorities = trainer.update(batch, jnp.ones(M))
    np.testing.assert_allclose(np.asarray(priorities), np.abs(adv) + 1e-6, rtol=1e-6, atol=1e-9)


def test_the_callers_adapter_survives_the_donated_update(base):
    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    before = jax.tree.map(jnp.copy, adapter)  # (a NumPy view would pin the buffers)
    one = make_mesh(devices=jax.devices()[:1])  # where a put would not copy the adapter
    trainer = PPOTrainer(CFG, base, adapter, PPOConfig(), one, rating_tokens=(POS, NEG))
    trainer.update(_batch(), jnp.ones(M))
    assert not any(x.is_deleted() for x in jax.tree.leaves(adapter))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, adapter))


def test_updates_touch_no_base_parameter(base):
    trainer = _trainer(base, make_mesh())
    before = jax.tree.map(np.asarray, base)
    trainer.update(_batch(), jnp.ones(M))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, trainer.params))
    # Every optimizer-state array is adapter-shaped (no moments of the base).
    adapter_shapes = {x.shape for x in jax.tree.leaves(trainer.state.lora)}
    for x in jax.tree.leaves(trainer.state.opt_state):
        assert x.ndim == 0 or x.shape in adapter_shapes


@pytest.mark.parametrize("loss_chunk", [0, 4])
def test_ppo_step_is_the_same_on_1_and_8_devices(base, loss_chunk):
    """And the same with the thought logits unembedded 4 positions at a time (L = 6: the last
    chunk padded) on 8 devices as all at once on one."""
    one = _trainer(base, make_mesh(devices=jax.devices()[:1]))
    eight = _trainer(base, make_mesh({"data": 2, "fsdp": 4}), loss_chunk=loss_chunk)
    m1, p1 = one.update(_batch(), jnp.linspace(0.5, 1.0, M))
    m8, p8 = eight.update(_batch(), jnp.linspace(0.5, 1.0, M))
    for k in ("first/loss", "loss", "value_loss", "kl", "entropy"):
        np.testing.assert_allclose(float(m1[k]), float(m8[k]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p8), atol=1e-5, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        one.lora,
        eight.lora,
    )


def test_micro_batches_give_the_whole_batchs_update(base):
    """Gradient accumulation over micro-batches of 8 (on 8 devices, two passes), each normalised
    by the whole batch: the metrics, priorities and new adapter of the whole batch at once (one
    device), also with invalid rows and uneven importance weights."""
    batch = _batch().replace(valid=jnp.arange(M) % 5 != 3)
    weights = jnp.linspace(0.2, 1.0, M)
    whole = _trainer(base, make_mesh(devices=jax.devices()[:1]))
    micro = _trainer(base, make_mesh({"data": 2, "fsdp": 4}), micro_batch_size=8)
    m1, p1 = whole.update(batch, weights)
    m8, p8 = micro.update(batch, weights)
    assert set(m1) == set(m8)
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m8[k]), atol=1e-5, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p8), atol=1e-5, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        whole.lora,
        micro.lora,
    )


@pytest.mark.parametrize("micro", [3, 4])  # 3 does not divide 16; 4 is no multiple of 8 devices
def test_micro_batches_that_do_not_split_the_batch_or_the_mesh_are_refused(base, micro):
    trainer = _trainer(base, make_mesh({"data": 2, "fsdp": 4}), micro_batch_size=micro)
    with pytest.raises(ValueError, match=f"micro_batch_size {micro} must divide the batch of 16"):
        trainer.update(_batch(), jnp.ones(M))


def test_updates_raise_positive_and_lower_negative_advantage_thoughts(base):
    trainer = _trainer(base, make_mesh(), epochs=4, lr=1e-2, kl_coef=0.0)
    batch = _batch()

    def thought_logp(adapter):
        mask = jnp.arange(W)[None, :] < batch.length[:, None]
        logits = forward(trainer.params, CFG, batch.tokens, attention_mask=mask, lora=adapter)
        logp, _ = sequence_logprobs(logits, batch.tokens, batch.action_start, L)
        act = jnp.arange(L)[None, :] < batch.action_length[:, None]
        return np.asarray(jnp.sum(logp * act, axis=1))

    start = thought_logp(trainer.lora)
    for _ in range(3):
        trainer.update(batch, jnp.ones(M))
    change = thought_logp(trainer.lora) - start
    positive = np.asarray(batch.advantage) > 0
    assert np.all(change[positive] > 0), change[positive]
    assert np.all(change[~positive] < 0), change[~positive]


def test_log_probs_outside_the_thoughts_cannot_make_the_loss_nan(base, monkeypatch):
    """The policy may put any log-prob on padding and the rating marker: 100 nats there once
    made exp() overflow and inf * 0 turn loss, gradients and priorities into NaN."""
    from o1jax.rl import ppo

    batch = _batch()
    pred = np.zeros((M, W), bool)  # positions that predict a thought token
    for i in range(M):
        s, n = int(batch.action_start[i]), int(batch.action_length[i])
        pred[i, s - 1 : s - 1 + n] = True

    def stub_forward(params, cfg, tokens, attention_mask=None, lora=None, return_hidden=False):
        logits = jnp.zeros((M, W, CFG.vocab_size))  # stands for the hidden states as well
        if lora is None:  # the reference
            return logits
        return jnp.where(pred[..., None], logits, logits.at[..., 0].set(-lora))

    from o1jax.model import logprobs

    monkeypatch.setattr(ppo, "forward", stub_forward)
    monkeypatch.setattr(ppo, "unembed", lambda params, cfg, hidden: hidden)
    monkeypatch.setattr(logprobs, "unembed", lambda params, cfg, hidden: hidden)
    # Only the embedding's shape is read: [V, D], D = V here (the "hidden states" are logits).
    params = {"embedder": {"embedding": jnp.zeros((CFG.vocab_size, CFG.vocab_size))}}
    old = jnp.where(jnp.arange(L)[None] < batch.action_length[:, None], 0.0, -100.0)
    for old_logp in (None, old - jnp.log(CFG.vocab_size)):
        f = lambda shift, o=old_logp: ppo.ppo_loss(
            shift, params, CFG, batch, jnp.ones(M), o, PPOConfig(), (POS, NEG)
        )
        (loss, (aux, _, priorities)), grad = jax.value_and_grad(f, has_aux=True)(100.0)
        assert np.isfinite(float(loss)) and float(grad) == 0.0
        assert float(aux["kl"]) == 0.0 and np.all(np.isfinite(np.asarray(priorities)))


def test_ppo_reads_only_the_width_of_the_behaviour_logprobs(base):
    """The replay buffer does not store the sampler's log-probs (batches sampled from it carry
    NaN there): loss, metrics, log-probs, priorities and gradient must not depend on them."""
    from o1jax.rl import ppo

    adapter = _moved_adapter()
    config = PPOConfig(entropy_coef=0.01)

    def run(batch):
        f = lambda a: ppo.ppo_loss(a, base, CFG, batch, jnp.ones(M), None, config, (POS, NEG))
        return jax.value_and_grad(f, has_aux=True)(adapter)

    want = run(_batch())
    got = run(_batch().replace(behaviour_logprobs=jnp.full((M, L), jnp.nan)))
    assert np.isfinite(float(got[0][0]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)


def test_equal_advantages_normalise_to_no_signal(base):
    """A batch whose advantages are all equal (here 0.9, not exact in float32 sums) has no
    policy gradient after normalisation, rather than its rounding residue blown up."""
    from o1jax.rl import ppo

    batch = _batch().replace(advantage=jnp.full((M,), 0.9, jnp.float32))
    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    _, (aux, _, _) = ppo.ppo_loss(
        adapter, base, CFG, batch, jnp.ones(M), None, PPOConfig(), (POS, NEG)
    )
    assert float(aux["policy_loss"]) == 0.0


def _moved_adapter(seed=1):
    """An adapter whose B is not 0: the policy differs from the base, so the KL is not 0."""
    adapter = lora.init(CFG, jax.random.key(seed), lora.LoRAConfig(rank=4, alpha=8))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype), adapter
    )


def test_invalid_rows_count_for_nothing(base):
    """Rows with valid False (unused slots, non-terminal nodes) weigh 0 in every term and stay
    out of the advantage statistics and the value mean: the loss, its metrics and its gradient
    are those of the valid rows alone, whatever the invalid rows hold."""
    from o1jax.rl import ppo

    config = PPOConfig(entropy_coef=0.01, kl_coef=0.05)
    adapter = _moved_adapter()
    valid = np.ones(M, bool)
    valid[[3, 7, 12]] = False
    batch = _batch().replace(
        advantage=jnp.where(valid, jnp.linspace(-1.0, 2.0, M), 1e3),  # garbage where invalid
        value_target=jnp.where(valid, _batch().value_target, jnp.nan),
        valid=jnp.asarray(valid),
    )
    weights = jnp.linspace(0.5, 1.0, M)

    @jax.jit
    def loss_and_grad(adapter, batch, weights, old):
        f = lambda a: ppo.ppo_loss(a, base, CFG, batch, weights, old, config, (POS, NEG))
        return jax.value_and_grad(f, has_aux=True)(adapter)

    (_, (_, logp, _)), _ = loss_and_grad(adapter, batch, weights, jnp.zeros((M, L)))
    old = logp + 0.05 * jnp.asarray(np.random.default_rng(2).normal(size=(M, L)), jnp.float32)
    (loss, (aux, _, prio)), grad = loss_and_grad(adapter, batch, weights, old)
    keep = np.flatnonzero(valid)
    sub = jax.tree.map(lambda x: x[keep], batch)
    (ref, (ref_aux, _, ref_prio)), ref_grad = loss_and_grad(adapter, sub, weights[keep], old[keep])
    assert float(aux["kl"]) > 0 and float(aux["entropy"]) > 0 and float(aux["ratio_mean"]) != 1
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    for k in ref_aux:
        np.testing.assert_allclose(float(aux[k]), float(ref_aux[k]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(prio)[keep], np.asarray(ref_prio), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(prio)[~valid], np.float32(1e-6))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
        grad,
        ref_grad,
    )
    # A batch with no valid row moves nothing.
    none = batch.replace(valid=jnp.zeros(M, bool))
    (loss, _), grad = loss_and_grad(adapter, none, weights, old)
    assert float(loss) == 0.0
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad))


def test_mis_shaped_weights_and_fields_are_refused_naming_them(base):
    """Weights [M, 1] once broadcast every term to [M, M, ...] and scaled the loss by M."""
    from o1jax.rl import ppo

    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    batch, config = _batch(), PPOConfig(epochs=1)
    kw = dict(optimizer=ppo.make_optimizer(config), rating_tokens=(POS, NEG))
    bad_batches = {
        "advantage": batch.replace(advantage=batch.advantage[:, None]),
        "length": batch.replace(length=batch.length[:-1]),
        "behaviour_logprobs": batch.replace(behaviour_logprobs=jnp.zeros(M)),
        "valid": batch.replace(valid=jnp.ones(M + 1, bool)),
    }
    cases = [(batch, jnp.ones((M, 1)), "weights"), (batch, jnp.ones(1), "weights")]
    cases += [(b, jnp.ones(M), name) for name, b in bad_batches.items()]
    # Eight devices: a field of 15 rows would otherwise fail in the sharding, not by name.
    trainer = PPOTrainer(CFG, base, adapter, config, make_mesh({"data": 2, "fsdp": 4}), (POS, NEG))
    for b, w, name in cases:
        with pytest.raises(ValueError, match=f"ppo: {name} must be"):
            ppo.ppo_loss(adapter, base, CFG, b, w, None, config, (POS, NEG))
        with pytest.raises(ValueError, match=f"ppo: {name} must be"):
            state = ppo.init_train_state(adapter, kw["optimizer"])
            ppo.ppo_epochs(state, base, b, w, cfg=CFG, config=config, **kw)
        with pytest.raises(ValueError, match=f"ppo: {name} must be"):
            trainer.update(b, np.asarray(w))


def test_init_train_state_keeps_the_callers_adapter(base):
    """`ppo_epochs` donates its state; the adapter handed to `init_train_state` must survive."""
    from o1jax.rl import ppo

    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    before = jax.tree.map(np.array, adapter)
    config = PPOConfig(epochs=1)
    optimizer = ppo.make_optimizer(config)
    state = ppo.init_train_state(adapter, optimizer)
    kw = dict(cfg=CFG, config=config, optimizer=optimizer, rating_tokens=(POS, NEG))
    state, _, _ = ppo.ppo_epochs(state, base, _batch(), jnp.ones(M), **kw)
    assert not any(x.is_deleted() for x in jax.tree.leaves(adapter))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, adapter))
    assert int(state.step) == 1


def test_thought_logprobs_from_hidden_states_equal_those_of_the_full_logits(base):
    # PPO unembeds only the thought positions; the full [M, W, V] logits give the same numbers.
    batch = _batch()
    mask = jnp.arange(W)[None, :] < batch.length[:, None]
    logits = forward(base, CFG, batch.tokens, attention_mask=mask)
    hidden = forward(base, CFG, batch.tokens, attention_mask=mask, return_hidden=True)
    want_logp, want_rows = sequence_logprobs(logits, batch.tokens, batch.action_start, L)
    logp, entropy = thought_logprobs(
        base, CFG, hidden, batch.tokens, batch.action_start, L, entropy=True
    )
    want_entropy = -jnp.sum(jnp.exp(want_rows) * want_rows, axis=-1)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(want_logp), atol=1e-6)
    np.testing.assert_allclose(np.asarray(entropy), np.asarray(want_entropy), atol=1e-5)
    only_logp = thought_logprobs(base, CFG, hidden, batch.tokens, batch.action_start, L)
    np.testing.assert_array_equal(np.asarray(only_logp), np.asarray(logp))


def test_under_fsdp_each_device_unembeds_only_its_own_rows():
    """fsdp splits the params' D over the devices that split the batch. Left to itself, with one
    experience per device, XLA contracted over the split D: every device computed the MLP
    activations and thought logits [M, L, V] of the whole batch (41 GiB per device for
    Gemma2-2B's PPO step, bench/memory.py --step ppo). The model's residual stream and
    `thought_logprobs` pin the rows to their devices."""
    from o1jax.parallel.mesh import shard_batch
    from o1jax.rl import ppo

    cfg = Gemma2Config.tiny(
        vocab_size=4096, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2, head_dim=32,
        ffn_dim=1024, sliding_window=64,
    )  # fmt: skip
    m, w, thought = 8, 128, 16
    mesh = make_mesh({"fsdp": 8})
    adapter = lora.init(cfg, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    trainer = PPOTrainer(
        cfg, init_params(cfg, jax.random.key(0)), adapter, PPOConfig(epochs=1), mesh, (4, 5)
    )
    batch = Experience(
        tokens=jnp.ones((m, w), jnp.int32),
        length=jnp.full((m,), w, jnp.int32),
        action_start=jnp.full((m,), w - thought - 1, jnp.int32),
        action_length=jnp.full((m,), thought, jnp.int32),
        behaviour_logprobs=jnp.zeros((m, thought)),
        advantage=jnp.ones(m),
        value_target=jnp.ones(m),
        reward=jnp.zeros(m),
        valid=jnp.ones(m, bool),
    )
    with jax.set_mesh(mesh):
        batch, weights = shard_batch((batch, jnp.ones(m)), mesh)
        lowered = ppo.ppo_epochs.lower(
            trainer.state,
            trainer.params,
            batch,
            weights,
            cfg=cfg,
            config=trainer.config,
            optimizer=trainer.optimizer,
            rating_tokens=trainer.rating_tokens,
        )
    text = lowered.compile().as_text()
    assert f"f32[1,{thought},{cfg.vocab_size}]" in text  # each device's own row of logits
    assert f"f32[{m},{thought},{cfg.vocab_size}]" not in text
    assert f"f32[1,{w},{cfg.ffn_dim}]" in text  # and of the MLP
    assert f"f32[{m},{w},{cfg.ffn_dim}]" not in text


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("epochs", 0, "epochs must be >= 1"),  # ran one update
        ("epochs", 2.0, "epochs must be an int"),
        ("clip_eps", -0.1, "clip_eps must be > 0"),  # inverted the clip range
        ("clip_eps", 0.0, "clip_eps must be > 0"),
        ("max_grad_norm", 0.0, "max_grad_norm must be > 0"),  # zeroed every update
        ("learning_rate", float("nan"), "learning_rate must be a finite number"),
        ("kl_coef", -1.0, "kl_coef must be >= 0"),
    ],
)
def test_config_fields_out_of_range_are_named(field, value, message):
    """A notebook's PPOConfig is not the train config's: it ran these silently."""
    with pytest.raises(ValueError, match=f"PPOConfig.{message}"):
        PPOConfig(**{field: value})


def test_config_accepts_the_edges_of_its_ranges():
    PPOConfig(
        epochs=1,
        kl_coef=0,
        entropy_coef=0.0,
        learning_rate=0.0,
        max_grad_norm=np.inf,
        clip_eps=np.inf,
    )


def test_rating_tokens_outside_the_vocabulary_are_refused(base):
    """An id past the vocabulary read the last logit instead (JAX clamps the gather)."""
    from o1jax.rl import ppo

    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    for tokens in ((POS, CFG.vocab_size), (-1, NEG), (POS,)):
        with pytest.raises(ValueError, match=r"rating_tokens .* must be two ids"):
            ppo.ppo_loss(adapter, base, CFG, _batch(), jnp.ones(M), None, PPOConfig(), tokens)


def test_loss_terms_follow_the_clipped_surrogate_at_ratios_off_one(monkeypatch):
    """policy_loss, value_loss, kl, entropy, clip_fraction and ratio_mean against the module's
    formulas in NumPy, at ratios 0.5, 1 and 1.5 and advantages of both signs, with uneven
    importance weights and an invalid row. Every other test sees ratio 1 (or only compares two
    runs of the same code): an unclipped surrogate (`clipped = ratio`), a value loss against
    1 - target or a misnormalised term passed them all."""
    from o1jax.model import logprobs
    from o1jax.rl import ppo

    rng = np.random.default_rng(3)
    pol = rng.normal(size=(M, W, CFG.vocab_size)).astype(np.float32)  # the policy's logits
    ref = rng.normal(size=(M, W, CFG.vocab_size)).astype(np.float32)  # the base's

    def stub_forward(params, cfg, tokens, attention_mask=None, lora=None, return_hidden=False):
        return jnp.asarray(ref if lora is None else pol)  # stands for the hidden states as well

    monkeypatch.setattr(ppo, "forward", stub_forward)
    monkeypatch.setattr(ppo, "unembed", lambda params, cfg, hidden: hidden)
    monkeypatch.setattr(logprobs, "unembed", lambda params, cfg, hidden: hidden)
    # Only the embedding's shape is read: [V, D], D = V here (the "hidden states" are logits).
    params = {"embedder": {"embedding": jnp.zeros((CFG.vocab_size, CFG.vocab_size))}}

    def log_softmax(x):  # in float64
        x = x.astype(np.float64)
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    batch = _batch()
    tokens, start = np.asarray(batch.tokens), np.asarray(batch.action_start)
    length, act_len = np.asarray(batch.length), np.asarray(batch.action_length)
    rows = np.arange(M)[:, None]
    pos = np.clip(start[:, None] - 1 + np.arange(L)[None, :], 0, W - 1)  # [M, L] predicting
    target = tokens[rows, np.clip(pos + 1, 0, W - 1)]  # [M, L]
    lsm = log_softmax(pol)  # [M, W, V]
    logp = lsm[rows, pos, target]  # [M, L]
    ref_logp = log_softmax(ref)[rows, pos, target]
    entropy_tok = -np.sum(np.exp(lsm) * lsm, -1)[rows, pos]  # [M, L]
    rating = log_softmax(pol[np.arange(M), length - 1][:, [POS, NEG]])  # [M, 2]

    ratio_of_row = np.array([0.5, 1.0, 1.5])[np.arange(M) % 3]  # with i % 2: every pair
    old = (logp - np.log(ratio_of_row)[:, None]).astype(np.float32)  # [M, L]
    valid = np.arange(M) != 7
    raw_adv = np.where(np.arange(M) % 2 == 0, 1.0, -1.0) * (0.5 + 0.25 * (np.arange(M) % 4))
    value_target = rng.uniform(0, 1, M)
    batch = batch.replace(
        advantage=jnp.asarray(np.where(valid, raw_adv, 1e3), jnp.float32),  # garbage if invalid
        value_target=jnp.asarray(np.where(valid, value_target, np.nan), jnp.float32),
        valid=jnp.asarray(valid),
    )
    weights = np.linspace(0.5, 1.0, M)
    config = PPOConfig(kl_coef=0.05, entropy_coef=0.01)
    assert config.value_coef > 0 and config.normalize_advantages

    _, (aux, _, _) = ppo.ppo_loss(
        1.0, params, CFG, batch, jnp.asarray(weights, jnp.float32), jnp.asarray(old), config,
        (POS, NEG),
    )  # fmt: skip

    act = (np.arange(L)[None, :] < act_len[:, None]) & valid[:, None]  # [M, L]
    w_tok = act * weights[:, None]
    n_tok, n_valid = act.sum(), valid.sum()
    adv = raw_adv - raw_adv[valid].mean()
    adv = adv / (np.sqrt(np.mean(adv[valid] ** 2)) + 1e-6)
    for r in (0.5, 1.5):  # both signs at both clipped ratios
        assert {np.sign(a) for a in adv[valid & (ratio_of_row == r)]} == {-1.0, 1.0}
    ratio = np.exp(logp - old)  # [M, L]
    eps = config.clip_eps
    surrogate = np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None])
    log_r = ref_logp - logp
    t = np.where(valid, value_target, 0.0)
    want = {
        "policy_loss": np.sum(-surrogate * w_tok) / n_tok,
        "kl": np.sum((np.exp(log_r) - log_r - 1) * w_tok) / n_tok,
        "entropy": np.sum(entropy_tok * w_tok) / n_tok,
        "value_loss": np.sum(-(t * rating[:, 0] + (1 - t) * rating[:, 1]) * weights * valid)
        / n_valid,
        "clip_fraction": np.sum((np.abs(ratio - 1) > eps) * act) / n_tok,
        "ratio_mean": np.sum(ratio * act) / n_tok,
    }
    want["loss"] = (
        want["policy_loss"]
        + config.value_coef * want["value_loss"]
        + config.kl_coef * want["kl"]
        - config.entropy_coef * want["entropy"]
    )
    assert 0 < want["clip_fraction"] < 1 and want["kl"] > 0
    for k, v in want.items():
        np.testing.assert_allclose(float(aux[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
