"""Prefill throughput of o1jax's jitted `forward` against transformers' Gemma2ForCausalLM.

Both run the same tiny Gemma2 (random weights, saved by transformers and loaded with `load_hf`)
on the same tokens on this machine's CPU, in one run. Prints tokens/s and the ratio.

    python bench/forward.py [--batch 8] [--seq 256] [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Gemma2Config as HFGemma2Config
from transformers import Gemma2ForCausalLM

from o1jax.model import Gemma2Config, forward, load_hf


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    cfg = Gemma2Config.tiny(vocab_size=512)
    torch.manual_seed(0)
    hf_model = Gemma2ForCausalLM(HFGemma2Config(**cfg.to_hf(), attn_implementation="eager")).eval()
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        cfg, params = load_hf(d)

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    tokens_t = torch.as_tensor(tokens)
    tokens_j = jnp.asarray(tokens)
    jitted = jax.jit(lambda p, t: forward(p, cfg, t))

    def run_hf():
        with torch.inference_mode():
            hf_model(tokens_t, use_cache=False).logits.float().sum().item()

    def run_ours():
        jitted(params, tokens_j).block_until_ready()

    n_tokens = args.batch * args.seq
    t_hf = median_seconds(run_hf, args.reps)
    t_ours = median_seconds(run_ours, args.reps)
    print(
        f"config: tiny Gemma2 ({cfg.num_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}); "
        f"batch {args.batch} x seq {args.seq}; torch threads {torch.get_num_threads()}; "
        f"jax {jax.__version__} on {jax.default_backend()}"
    )
    print(f"transformers Gemma2ForCausalLM (eager, torch CPU): {n_tokens / t_hf:12.0f} tokens/s")
    print(f"o1jax forward (jax.jit):                           {n_tokens / t_ours:12.0f} tokens/s")
    print(f"ratio o1jax / transformers: {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
