"""Prioritized replay: o1jax's sum tree against flashbax's prioritised item buffer.

One round = add 256 items + sample 256 + set 256 priorities, both buffers jitted with donated
state, same item shape, same machine, one run. Measured three ways for both libraries:
"three calls" (add, sample and update each a jitted call, as a Python training loop makes them),
"one program" (the whole round traced into one jitted function, as inside a jitted training
step, where per-call dispatch no longer hides the work), and "in a jitted loop" (`LOOP_ROUNDS`
rounds inside one `fori_loop`, as in a fully jitted training loop, flashbax's intended use;
the time per round is then the buffer's own work, with no dispatch at all). Then o1jax's time
across capacities 2^14..2^20 (three calls, and in a jitted loop).

Every comparison alternates its contenders in blocks (`interleaved`), so that the machine's
drift during a run weighs on all of them alike; a ratio is the median of the per-block ratios.

    python bench/replay.py [--reps 200] [--loop-rounds 64]
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


class Runner:
    """A buffer set up for one mode: `call(state, i) -> state` runs one timed call (one round,
    or `LOOP_ROUNDS` rounds in the loop mode) on the donated state; `rounds` per call."""

    def __init__(self, call, state, rounds: int = 1):
        self.call, self.state, self.rounds = call, state, rounds
        self.i = 0

    def warm_up(self) -> None:
        for _ in range(5):
            self.step()
        jax.block_until_ready(self.state)

    def step(self) -> float:
        start = time.perf_counter()
        self.state = self.call(self.state, self.i)
        jax.block_until_ready(self.state)
        self.i += 1
        return time.perf_counter() - start


def interleaved(runners: dict, calls: int, blocks: int = 10) -> dict:
    """Median seconds per round of each runner, and of their ratios, timed in alternating blocks.

    Each of `blocks` blocks times `calls // blocks` calls of every runner in turn and keeps the
    block's median per round, so a change in the machine's state during the run (this 2-core
    machine drifts by 30% or more within a minute) weighs on every runner alike. Returns
    {name: median of the block medians} and {"ratios": per-block times / the first runner's}.
    """
    for runner in runners.values():
        runner.warm_up()
    per_block = {name: [] for name in runners}
    for _ in range(blocks):
        for name, runner in runners.items():
            times = [runner.step() for _ in range(max(calls // blocks, 1))]
            per_block[name].append(statistics.median(times) / runner.rounds)
    first = next(iter(per_block.values()))
    out = {name: statistics.median(times) for name, times in per_block.items()}
    out["ratios"] = {
        name: statistics.median(t / f for t, f in zip(times, first, strict=True))
        for name, times in per_block.items()
    }
    return out


def _loop_runner(one_round, state) -> Runner:
    """`LOOP_ROUNDS` rounds inside one jitted fori_loop per call. one_round(i, state) ->
    (state, sampled items); the loop sums the items into its carry, so their gather is part of
    the work rather than dead code."""

    def body(i, carry):
        state, total = carry
        state, items = one_round(i, state)
        return state, total + sum(jnp.sum(x) for x in jax.tree.leaves(items))

    program = jax.jit(
        lambda carry: jax.lax.fori_loop(0, LOOP_ROUNDS, body, carry), donate_argnums=0
    )
    return Runner(lambda carry, i: program(carry), (state, jnp.zeros((), jnp.float32)), LOOP_ROUNDS)


def _prios(i: int):
    return jnp.asarray(np.random.default_rng(i).uniform(0.1, 2, BATCH), jnp.float32)


def ours(capacity: int, mode: str = "calls") -> Runner:
    state = per.init(capacity, ITEM)
    state = per.add(
        state, jax.tree.map(lambda x: jnp.zeros((capacity, *x.shape)), ITEM), jnp.ones(capacity)
    )
    batches = [_batch(i) for i in range(8)]
    prios = [_prios(i) for i in range(8)]

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

        return _loop_runner(loop_round, state)
    fn = jax.jit(one_round, donate_argnums=0) if mode == "program" else one_round
    return Runner(
        lambda state, i: fn(state, batches[i % 8], prios[i % 8], KEYS[i % 16], prios[(i + 1) % 8]),
        state,
    )


def flashbax(capacity: int, mode: str = "calls") -> Runner:
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
    prios = [_prios(i) for i in range(8)]

    if mode == "loop":

        def loop_round(i, state):
            items, prios_i = _loop_batch(i)
            state = buf.add(state, items)
            batch = buf.sample(state, jax.random.fold_in(KEYS[0], i))
            return buf.set_priorities(state, batch.indices, prios_i[::-1]), batch.experience

        return _loop_runner(loop_round, state)
    if mode == "program":

        def one_round(state, items, key, new_prios):
            state = buf.add(state, items)
            batch = buf.sample(state, key)
            return buf.set_priorities(state, batch.indices, new_prios)

        program = jax.jit(one_round, donate_argnums=0)
        return Runner(
            lambda state, i: program(state, batches[i % 8], KEYS[i % 16], prios[(i + 1) % 8]),
            state,
        )

    def round_fn(state, i):
        state = add(state, batches[i % 8])
        batch = sample(state, KEYS[i % 16])
        return set_prio(state, batch.indices, prios[(i + 1) % 8])

    return Runner(round_fn, state)


def main() -> None:
    global LOOP_ROUNDS  # --loop-rounds sets it for the runners
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="timed rounds per buffer and mode")
    parser.add_argument(
        "--loop-rounds", type=int, default=LOOP_ROUNDS,
        help="rounds per call in the jitted-loop mode (fewer on a GPU, where flashbax's round "
        "takes 140 ms)",
    )  # fmt: skip
    args = parser.parse_args()
    LOOP_ROUNDS = args.loop_rounds
    loop_calls = max(args.reps // LOOP_ROUNDS * 4, 10)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}); one round = add {BATCH} + sample "
        f"{BATCH} + set {BATCH} priorities; medians over 10 alternating blocks of "
        f"{args.reps // 10} rounds (in the loop: of {loop_calls // 10} calls of {LOOP_ROUNDS} "
        f"rounds)"
    )
    modes = (("calls", "three calls"), ("program", "one program"), ("loop", "in a jitted loop"))
    for mode, label in modes:
        calls = loop_calls if mode == "loop" else args.reps
        t = interleaved({"o1jax": ours(65536, mode), "flashbax": flashbax(65536, mode)}, calls)
        print(
            f"capacity 65536, {label}: o1jax {t['o1jax'] * 1e3:.3f} ms, flashbax "
            f"{t['flashbax'] * 1e3:.3f} ms, flashbax / o1jax = {t['ratios']['flashbax']:.2f}x"
        )
    for mode, label in modes[::2]:
        calls = loop_calls if mode == "loop" else args.reps
        t = interleaved({f"2^{n}": ours(1 << n, mode) for n in (14, 16, 18, 20)}, calls)
        for n in (14, 16, 18, 20):
            print(f"capacity 2^{n}, {label}: o1jax {t[f'2^{n}'] * 1e3:.3f} ms")
        print(f"growth 2^20 / 2^14, {label}: {t['ratios']['2^20']:.2f}x")


if __name__ == "__main__":
    main()
