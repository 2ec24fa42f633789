"""Prioritized replay: o1jax's sum tree against flashbax's prioritised item buffer.

One round = add 256 items + sample 256 + set 256 priorities, both buffers jitted with donated
state, same item shape, same machine, one run. Measured three ways for both libraries:
"three calls" (add, sample and update each a jitted call, as a Python training loop makes them),
"one program" (the whole round traced into one jitted function, as inside a jitted training
step, where per-call dispatch no longer hides the work), and "in a jitted loop" (`LOOP_ROUNDS`
rounds inside one `fori_loop`, as in a fully jitted training loop, flashbax's intended use;
the time per round is then the buffer's own work, with no dispatch at all). Then o1jax's time
across capacities 2^14..2^20 (three calls, and in a jitted loop).

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
LOOP_ROUNDS = 64
ITEM = {"obs": jnp.zeros((16,), jnp.float32), "reward": jnp.zeros((), jnp.float32)}


def _batch(i: int):
    return {"obs": jnp.full((BATCH, 16), float(i)), "reward": jnp.full((BATCH,), float(i))}


KEYS = [jax.random.key(i) for i in range(16)]  # made up front: key creation is host work


def _loop_batch(i):
    """Round i's items and priorities [BATCH], made on device inside the loop."""
    x = i.astype(jnp.float32)
    items = {"obs": jnp.full((BATCH, 16), x), "reward": jnp.full((BATCH,), x)}
    return items, jnp.abs(jnp.sin(jnp.arange(BATCH) + x)) + 0.1


def _median_loop(one_round, state, reps: int) -> float:
    """Median time per round of `LOOP_ROUNDS` rounds run inside one jitted fori_loop.

    one_round(i, state) -> (state, sampled items). The loop sums the sampled items into its
    carry, so the items gather is part of the work rather than dead code."""

    def body(i, carry):
        state, total = carry
        state, items = one_round(i, state)
        return state, total + sum(jnp.sum(x) for x in jax.tree.leaves(items))

    program = jax.jit(
        lambda carry: jax.lax.fori_loop(0, LOOP_ROUNDS, body, carry), donate_argnums=0
    )
    carry = (state, jnp.zeros((), jnp.float32))
    return _median_round(lambda carry, i: program(carry), carry, reps) / LOOP_ROUNDS


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


def ours(capacity: int, reps: int, mode: str = "calls") -> float:
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

    if mode == "loop":

        def loop_round(i, state):
            items, prios_i = _loop_batch(i)
            state = per.add(state, items, prios_i)
            sampled, idx, _ = per.sample(state, jax.random.fold_in(KEYS[0], i), BATCH, 0.4)
            return per.update(state, idx, prios_i[::-1]), sampled

        return _median_loop(loop_round, state, max(reps // LOOP_ROUNDS * 4, 5))
    if mode == "program":
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


def flashbax_round(capacity: int, reps: int, mode: str = "calls") -> float:
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

    if mode == "loop":

        def loop_round(i, state):
            items, prios_i = _loop_batch(i)
            state = buf.add(state, items)
            batch = buf.sample(state, jax.random.fold_in(KEYS[0], i))
            return buf.set_priorities(state, batch.indices, prios_i[::-1]), batch.experience

        return _median_loop(loop_round, state, max(reps // LOOP_ROUNDS * 4, 5))
    if mode == "program":

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
        f"{BATCH} + set {BATCH} priorities; median of {args.reps} rounds (in the loop: of "
        f"{max(args.reps // LOOP_ROUNDS * 4, 5)} calls of {LOOP_ROUNDS} rounds)"
    )
    modes = (("calls", "three calls"), ("program", "one program"), ("loop", "in a jitted loop"))
    for mode, label in modes:
        t_ours = ours(65536, args.reps, mode)
        t_fbx = flashbax_round(65536, args.reps, mode)
        print(
            f"capacity 65536, {label}: o1jax {t_ours * 1e3:.3f} ms, flashbax "
            f"{t_fbx * 1e3:.3f} ms, flashbax / o1jax = {t_fbx / t_ours:.2f}x"
        )
    for mode, label in modes[::2]:
        times = {}
        for log2 in (14, 16, 18, 20):
            times[log2] = ours(1 << log2, args.reps, mode)
            print(f"capacity 2^{log2}, {label}: o1jax {times[log2] * 1e3:.3f} ms")
        print(f"growth 2^20 / 2^14, {label}: {times[20] / times[14]:.2f}x")


if __name__ == "__main__":
    main()
