"""How `generate`'s cost grows with rows and prompt length, on the search's tiny model.

For 1 and 32 prompts (2 samples each, as search draws them) and prompts of 32, 128 and 320
tokens: the median time of `generate` with 1 new token (prefill + 1 step) and with 24, and the
decode step as their difference over 23 steps.

    python bench/probes/generate_scaling.py [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import Gemma2Config
from o1jax.model.gemma2 import init_params
from o1jax.model.sampler import generate

NEW, SAMPLES = 24, 2


def median_seconds(params, cfg, prompts, lengths, new_tokens: int, reps: int) -> float:
    def call():
        out = generate(
            params, cfg, prompts, lengths, key=jax.random.key(0), max_new_tokens=new_tokens,
            temperature=1.0, num_samples=SAMPLES,
        )  # fmt: skip
        jax.block_until_ready(out.tokens)

    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed calls per point (median)")
    args = parser.parse_args()
    cfg = Gemma2Config.tiny(
        vocab_size=512, d_model=128, num_heads=4, num_kv_heads=1, head_dim=32, ffn_dim=512,
        num_layers=4,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    print(f"{'prompts':>7} {'rows':>5} {'prompt':>6} {'prefill+1 ms':>13} {'decode step ms':>15}")
    for batch in (1, 32):
        for width in (32, 128, 320):
            prompts = jnp.asarray(np.random.default_rng(0).integers(3, 512, (batch, width)))
            lengths = jnp.full((batch,), width, jnp.int32)
            first = median_seconds(params, cfg, prompts, lengths, 1, args.reps)
            full = median_seconds(params, cfg, prompts, lengths, NEW, args.reps)
            step = (full - first) / (NEW - 1)
            print(
                f"{batch:>7} {batch * SAMPLES:>5} {width:>6} {first * 1e3:>13.1f} "
                f"{step * 1e3:>15.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
