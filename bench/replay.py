"""Prioritized replay: o1jax's sum tree against flashbax's prioritised item buffer.

One round = add 256 items + sample 256 + set 256 priorities, both buffers jitted with donated
state, same item shape, same machine, one run. Measured two ways for both libraries:
"three calls" (add, sample and update each a jitted call, as a Python training loop makes them)
and "one program" (the whole round traced into one jitted function, as inside a jitted training
step, where per-call dispatch no longer hides the work). Then o1jax's time across capacities
2^14..2^20 (three calls).

    python bench/replay.py [--reps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.rl import per

BATCH = 256
ITEM = {"obs": jnp.zeros((16,), jnp.float32), "reward": jnp.zeros((), jnp.float32)}


def _batch(i: int):
    return {"obs": jnp.full((BATCH, 16), float(i)), "reward": jnp.full((BATCH,), float(i))}


KEYS = [jax.random.key(i) for i in range(16)]  # made up front: key creation is host work


def _median_round(round_fn, state, reps: int) -> float:
    for i in range(5):  # compile and warm up
        state = round_fn(state, i)
    jax.block_until_ready(state)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        state = round_fn(state, i)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(capacity: int, reps: int, fused: bool = False) -> float:
    state = per.init(capacity, ITEM)
    state = per.add(
        state, jax.tree.map(lambda x: jnp.zeros((capacity, *x.shape)), ITEM), jnp.ones(capacity)
    )
    batches = [_batch(i) for i in range(8)]
    prios = [
        jnp.asarray(np.random.default_rng(i).uniform(0.1, 2, BATCH), jnp.float32) for i in range(8)
    ]

    def one_round(state, items, add_prios, key, new_prios):
        state = per.add(state, items, add_prios)
        _, idx, _ = per.sample(state, key, BATCH, 0.4)
        return per.update(state, idx, new_prios)

    if fused:
        program = jax.jit(one_round, donate_argnums=0)
        return _median_round(
            lambda state, i: program(
                state, batches[i % 8], prios[i % 8], KEYS[i % 16], prios[(i + 1) % 8]
            ),
            state,
            reps,
        )
    return _median_round(
        lambda state, i: one_round(
            state, batches[i % 8], prios[i % 8], KEYS[i % 16], prios[(i + 1) % 8]
        ),
        state,
        reps,
    )


def flashbax_round(capacity: int, reps: int, fused: bool = False) -> float:
    import flashbax as fbx

    buf = fbx.make_prioritised_item_buffer(
        max_length=capacity, min_length=1, sample_batch_size=BATCH, add_batches=True
    )
    add = jax.jit(buf.add, donate_argnums=0)
    sample = jax.jit(buf.sample)
    set_prio = jax.jit(buf.set_priorities, donate_argnums=0)
    state = buf.init(jax.tree.map(lambda x: x, ITEM))
    state = add(state, jax.tree.map(lambda x: jnp.zeros((capacity, *x.shape)), ITEM))
    batches = [_batch(i) for i in range(8)]
    prios = [
        jnp.asarray(np.random.default_rng(i).uniform(0.1, 2, BATCH), jnp.float32) for i in range(8)
    ]

    if fused:

        def one_round(state, items, key, new_prios):
            state = buf.add(state, items)
            batch = buf.sample(state, key)
            return buf.set_priorities(state, batch.indices, new_prios)

        program = jax.jit(one_round, donate_argnums=0)
        return _median_round(
            lambda state, i: program(state, batches[i % 8], KEYS[i % 16], prios[(i + 1) % 8]),
            state,
            reps,
        )

    def round_fn(state, i):
        state = add(state, batches[i % 8])
        batch = sample(state, KEYS[i % 16])
        return set_prio(state, batch.indices, prios[(i + 1) % 8])

    return _median_round(round_fn, state, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} ({jax.default_backend()}); one round = add {BATCH} + sample "
        f"{BATCH} + set {BATCH} priorities; median of {args.reps} rounds"
    )
    for fused, label in ((False, "three calls"), (True, "one program")):
        t_ours = ours(65536, args.reps, fused)
        t_fbx = flashbax_round(65536, args.reps, fused)
        print(
            f"capacity 65536, {label}: o1jax {t_ours * 1e3:.3f} ms, flashbax "
            f"{t_fbx * 1e3:.3f} ms, flashbax / o1jax = {t_fbx / t_ours:.2f}x"
        )
    times = {}
    for log2 in (14, 16, 18, 20):
        times[log2] = ours(1 << log2, args.reps)
        print(f"capacity 2^{log2}: o1jax {times[log2] * 1e3:.3f} ms")
    print(f"growth 2^20 / 2^14: {times[20] / times[14]:.2f}x")


if __name__ == "__main__":
    main()
