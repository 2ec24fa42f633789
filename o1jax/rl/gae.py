"""Generalised advantage estimation as a reverse `lax.scan` over time.

    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)

rewards, mask: [B, T]; values: [B, T + 1] (the last column bootstraps the step after T; 0 after
a terminal step). `mask` is true (nonzero) on real steps and false (0) on the padding after a
path's end: padded steps get zero advantage and pass nothing back to the real steps before them.
gamma and lam lie in [0, 1] (checked unless traced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards, values, mask, gamma: float, lam: float):
    """(advantages [B, T], returns [B, T]) with delta_t = r_t + gamma V_{t+1} - V_t."""
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not isinstance(x, jax.core.Tracer) and not 0.0 <= float(x) <= 1.0:  # NaN too
            raise ValueError(f"gae: {name} must be in [0, 1], got {x}")
    rank2 = jnp.ndim(rewards) == 2
    b, t = jnp.shape(rewards) if rank2 else (0, 0)
    if not rank2 or jnp.shape(values) != (b, t + 1) or jnp.shape(mask) != (b, t):
        raise ValueError(
            "gae: rewards and mask must be [B, T] and values [B, T + 1], got rewards "
            f"{jnp.shape(rewards)}, values {jnp.shape(values)}, mask {jnp.shape(mask)}"
        )
    rewards = rewards.astype(jnp.float32)
    values = values.astype(jnp.float32)
    mask = mask != 0  # a flag, whatever the dtype
    deltas = rewards + gamma * values[:, 1:] - values[:, :-1]  # [B, T]

    # `where`, not a product with the mask: 0 * NaN is NaN, so a non-finite reward or value on
    # the padding made every advantage of its path NaN.
    def step(carry, xs):
        delta, m = xs  # [B] each
        advantage = jnp.where(m, delta + gamma * lam * carry, 0.0)
        return advantage, advantage

    _, advantages = jax.lax.scan(
        step, jnp.zeros((b,), jnp.float32), (deltas.T, mask.T), reverse=True
    )
    advantages = advantages.T  # [B, T]
    returns = jnp.where(mask, advantages + values[:, :-1], 0.0)
    return advantages, returns
