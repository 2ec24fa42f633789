"""PPO on LoRA: exact ratio/KL at the start, base untouched, 1 vs 8 devices, learning direction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.model import Gemma2Config, forward, init_params, lora
from o1jax.parallel.mesh import make_mesh
from o1jax.rl.experience import Experience
from o1jax.rl.ppo import PPOConfig, PPOTrainer, sequence_logprobs

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


def _trainer(base, mesh, epochs=2, lr=3e-3, kl_coef=0.05):
    adapter = lora.init(CFG, jax.random.key(1), lora.LoRAConfig(rank=4, alpha=8))
    config = PPOConfig(epochs=epochs, learning_rate=lr, kl_coef=kl_coef)
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


def test_ppo_step_is_the_same_on_1_and_8_devices(base):
    one = _trainer(base, make_mesh(devices=jax.devices()[:1]))
    eight = _trainer(base, make_mesh({"data": 2, "fsdp": 4}))
    m1, p1 = one.update(_batch(), jnp.linspace(0.5, 1.0, M))
    m8, p8 = eight.update(_batch(), jnp.linspace(0.5, 1.0, M))
    for k in ("first/loss", "loss", "value_loss", "kl"):
        np.testing.assert_allclose(float(m1[k]), float(m8[k]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p8), atol=1e-5, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        one.lora,
        eight.lora,
    )


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

    def stub_forward(params, cfg, tokens, attention_mask=None, lora=None):
        logits = jnp.zeros((M, W, CFG.vocab_size))
        if lora is None:  # the reference
            return logits
        return jnp.where(pred[..., None], logits, logits.at[..., 0].set(-lora))

    monkeypatch.setattr(ppo, "forward", stub_forward)
    old = jnp.where(jnp.arange(L)[None] < batch.action_length[:, None], 0.0, -100.0)
    for old_logp in (None, old - jnp.log(CFG.vocab_size)):
        f = lambda shift, o=old_logp: ppo.ppo_loss(
            shift, None, CFG, batch, jnp.ones(M), o, PPOConfig(), (POS, NEG)
        )
        (loss, (aux, _, priorities)), grad = jax.value_and_grad(f, has_aux=True)(100.0)
        assert np.isfinite(float(loss)) and float(grad) == 0.0
        assert float(aux["kl"]) == 0.0 and np.all(np.isfinite(np.asarray(priorities)))


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
