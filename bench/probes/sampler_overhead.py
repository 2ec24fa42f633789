"""What `generate`'s loop costs over bare cached decode steps, on bench/sample.py's model.

Times, alternating in one process, `generate` (batch B, prompt 32, 128 new tokens at
temperature 1) and a jitted `fori_loop` of 128 cached decode steps that only take the argmax
(no sampling, stop checks or output buffers), and prints both per token step.

    python bench/probes/sampler_overhead.py [--batch 16] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import Gemma2Config
from o1jax.model.gemma2 import forward, init_cache, init_params
from o1jax.model.sampler import generate

PROMPT, NEW = 32, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    batch = args.batch
    cfg = Gemma2Config.tiny(vocab_size=512)
    params = init_params(cfg, jax.random.key(0))
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, 512, (batch, PROMPT)))
    lengths = jnp.full((batch,), PROMPT, jnp.int32)

    @jax.jit
    def bare_decode(params, prompts):
        cache = init_cache(cfg, batch, PROMPT + NEW)
        logits, cache = forward(params, cfg, prompts, cache=cache)
        token = jnp.argmax(logits[:, -1], -1)

        def step(i, carry):
            cache, token = carry
            pos = jnp.full((batch, 1), PROMPT + i, jnp.int32)
            logits, cache = forward(params, cfg, token[:, None], positions=pos, cache=cache)
            return cache, jnp.argmax(logits[:, 0], -1)

        return jax.lax.fori_loop(0, NEW, step, (cache, token))[1]

    def sample():
        key = jax.random.key(0)
        return generate(
            params, cfg, prompts, lengths, key=key, max_new_tokens=NEW, temperature=1.0
        ).tokens

    runs = {"generate": sample, "bare decode steps": lambda: bare_decode(params, prompts)}
    times = {name: [] for name in runs}
    for fn in runs.values():
        jax.block_until_ready(fn())
    for _ in range(args.reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        seconds = statistics.median(ts)
        print(f"{name:>18}: {seconds / NEW * 1e3:.3f} ms per token step, "
              f"{batch * NEW / seconds:.0f} tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
