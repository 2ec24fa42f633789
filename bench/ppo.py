"""PPO update throughput and memory: LoRA adapters (o1jax's path) against full fine-tuning.

The LoRA path runs o1jax's loss (`o1jax.rl.ppo.ppo_loss`: clipped surrogate, rating-token value
loss, entropy, k3 KL to the LoRA-off reference). `ppo_loss` has no full fine-tuning mode (its
reference is the base with LoRA off), so the full path runs the core of it: the same thought
log-probs (`thought_logprobs`, from hidden states), the clipped surrogate and the k3 KL to a
frozen copy of the params, without the value and entropy terms. Same batch of experiences,
same model. Reports tokens/s and XLA's compiled memory (arguments, outputs and temporaries) of
one update.

    python bench/ppo.py [--batch 32] [--width 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from o1jax.model import Gemma2Config, forward, init_params, lora
from o1jax.rl.experience import Experience
from o1jax.rl.ppo import PPOConfig, ppo_loss, thought_logprobs

POS, NEG = 4, 5


def batch_of(m: int, width: int, thought: int, vocab: int) -> Experience:
    rng = np.random.default_rng(0)
    tokens = rng.integers(8, vocab, (m, width)).astype(np.int32)
    start = np.full(m, width - thought - 1, np.int32)
    return Experience(
        tokens=jnp.asarray(tokens),
        length=jnp.full(m, width, jnp.int32),
        action_start=jnp.asarray(start),
        action_length=jnp.full(m, thought, jnp.int32),
        behaviour_logprobs=jnp.zeros((m, thought)),
        advantage=jnp.asarray(rng.normal(size=m)),
        value_target=jnp.full(m, 0.5),
        reward=jnp.zeros(m),
        valid=jnp.ones(m, bool),
    )


def lora_step(cfg, config, optimizer):
    def step(adapter, opt_state, params, batch):
        grads = jax.grad(
            lambda a: ppo_loss(
                a, params, cfg, batch, jnp.ones(batch.length.shape), None, config, (POS, NEG)
            )[0]
        )(adapter)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def full_step(cfg, config, optimizer):
    def loss(params, reference, batch):
        max_len = batch.behaviour_logprobs.shape[1]
        mask = jnp.arange(batch.tokens.shape[1])[None, :] < batch.length[:, None]
        logp = thought_logprobs(
            params,
            cfg,
            forward(params, cfg, batch.tokens, attention_mask=mask, return_hidden=True),
            batch.tokens,
            batch.action_start,
            max_len,
        )
        ref = thought_logprobs(
            reference,
            cfg,
            forward(reference, cfg, batch.tokens, attention_mask=mask, return_hidden=True),
            batch.tokens,
            batch.action_start,
            max_len,
        )
        ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
        adv = batch.advantage[:, None]
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv).mean()
        log_r = jax.lax.stop_gradient(ref) - logp
        return pg + config.kl_coef * (jnp.exp(log_r) - log_r - 1).mean()

    def step(params, opt_state, reference, batch):
        grads = jax.grad(loss)(params, reference, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def measure(step, state, opt_state, other, batch, reps):
    compiled = step.lower(state, opt_state, other, batch).compile()
    mem = compiled.memory_analysis()
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    state, opt_state = step(state, opt_state, other, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, opt_state = step(state, opt_state, other, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), total, mem.temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    cfg = Gemma2Config.tiny(vocab_size=512)
    params = init_params(cfg, jax.random.key(0))
    batch = batch_of(args.batch, args.width, 24, cfg.vocab_size)
    config = PPOConfig()
    optimizer = optax.adamw(1e-4)
    adapter = lora.init(cfg, jax.random.key(1), lora.LoRAConfig(rank=16, alpha=32))
    t_lora, m_lora, tmp_lora = measure(
        lora_step(cfg, config, optimizer),
        adapter,
        optimizer.init(adapter),
        params,
        batch,
        args.reps,
    )
    full = jax.tree.map(jnp.copy, params)
    t_full, m_full, tmp_full = measure(
        full_step(cfg, config, optimizer), full, optimizer.init(full), params, batch, args.reps
    )
    tokens = args.batch * args.width
    n_base = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"tiny Gemma2 ({n_base / 1e6:.1f}M params), LoRA rank 16 on all projections "
        f"({lora.num_params(adapter) / 1e6:.2f}M), batch {args.batch} x {args.width} tokens; "
        f"jax {jax.__version__} ({jax.default_backend()})"
    )
    print(f"{'':>6} {'tokens/s':>10} {'memory MiB':>11} {'temp MiB':>9}")
    print(f"{'LoRA':>6} {tokens / t_lora:>10.0f} {m_lora / 2**20:>11.1f} {tmp_lora / 2**20:>9.1f}")
    print(f"{'full':>6} {tokens / t_full:>10.0f} {m_full / 2**20:>11.1f} {tmp_full / 2**20:>9.1f}")
    print(f"LoRA / full: speed {t_full / t_lora:.2f}x, memory {m_lora / m_full:.2f}x")


if __name__ == "__main__":
    main()
