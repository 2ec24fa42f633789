"""K samples of one long prompt: o1jax's shared-prefix cache against a copy of the prompt per
sample (the same `generate`, each prompt repeated K times with one sample each).

Search expands a leaf by sampling K short thoughts after one long prefix (the problem and the
path so far). `generate(..., num_samples=K)` prefills the prefix once and keeps its keys and
values once: the K rows read them from one [B, ...] cache and write their new tokens to their
own [B * K, ...] caches (`o1jax.model.gemma2.with_shared_prefix`). The baseline gives each
sample its own prompt row, so it prefills and stores the prefix K times.

Both programs are compiled for the same shapes; the table gives XLA's memory analysis of each
(arguments + outputs + temporaries, so the KV cache and everything else) and the median wall
time of a call, for a model with Gemma2-2B's attention shape (8 heads of 256, 4 kv heads, 2
layers: d_model 2304 would not fit a CPU bench, so d_model is 512).

    python bench/shared_prefix.py [--prompt 1024] [--new 32] [--samples 2 4 8] [--batch 4]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from o1jax.model import Gemma2Config, init_params
from o1jax.model.sampler import _generate


def compiled_and_bytes(params, prompts, lengths, cfg, new: int, samples: int):
    kwargs = dict(
        cfg=cfg, max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, stop_tokens=(),
        num_samples=samples, score_suffix=(), score_tokens=(),
    )  # fmt: skip
    compiled = _generate.lower(
        params, prompts, lengths, jax.random.key(0), None, **kwargs
    ).compile()
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return compiled, total


def median_seconds(fn, reps: int) -> float:
    """Median seconds of `fn(None)` (the compiled sampler's `lora` argument)."""
    jax.block_until_ready(fn(None))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(None))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--samples", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=4, help="prompts")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    cfg = Gemma2Config.tiny(
        vocab_size=1024, num_layers=2, d_model=512, num_heads=8, num_kv_heads=4, head_dim=256,
        ffn_dim=2048, sliding_window=4096, query_pre_attn_scalar=256.0,
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    b, p = args.batch, args.prompt
    prompts = jnp.asarray(rng.integers(1, cfg.vocab_size, (b, p)), jnp.int32)
    lengths = jnp.full((b,), p, jnp.int32)
    print(
        f"{b} prompts of {p} tokens, {args.new} new tokens per sample, jax {jax.__version__} "
        f"({jax.default_backend()}); memory: XLA's analysis of the compiled program (MiB)"
    )
    print(
        f"{'K':>3} {'shared MiB':>11} {'copied MiB':>11} {'copied/shared':>14} "
        f"{'shared s':>9} {'copied s':>9} {'copied/shared':>14}"
    )
    for k in args.samples:
        shared, shared_bytes = compiled_and_bytes(params, prompts, lengths, cfg, args.new, k)
        rep_prompts, rep_lengths = jnp.repeat(prompts, k, 0), jnp.repeat(lengths, k)
        copied, copied_bytes = compiled_and_bytes(
            params, rep_prompts, rep_lengths, cfg, args.new, 1
        )
        key = jax.random.key(1)
        t_shared = median_seconds(
            functools.partial(shared, params, prompts, lengths, key), args.reps
        )
        t_copied = median_seconds(
            functools.partial(copied, params, rep_prompts, rep_lengths, key), args.reps
        )
        mib = 2**20
        print(
            f"{k:>3} {shared_bytes / mib:>11.1f} {copied_bytes / mib:>11.1f} "
            f"{copied_bytes / shared_bytes:>13.2f}x {t_shared:>9.3f} {t_copied:>9.3f} "
            f"{t_copied / t_shared:>13.2f}x"
        )


if __name__ == "__main__":
    main()
