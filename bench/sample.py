"""Sampling throughput of o1jax's `generate` against transformers' `generate` (PyTorch, CPU).

Same tiny Gemma2 (4 layers, d_model 256, 4 heads, 1 kv head, head_dim 64, ffn 1024, vocab 512),
same random weights, prompts of 32 tokens, 128 new tokens sampled at temperature 1, batches 16
and 64, in one run. Also measures this machine's matmul FLOP/s (a large float32 jnp.dot) and
reports the fraction of that roofline the sampler reaches.

The two libraries are timed in turn, rep by rep; the ratio is the median of the per-rep ratios.

    python bench/sample.py [--reps 3] [--hf-devices cpu cuda]

`--hf-devices cpu cuda` adds transformers on the GPU as a second baseline (each device gets its
own row; o1jax runs on JAX's default backend either way).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Gemma2Config as HFGemma2Config
from transformers import Gemma2ForCausalLM

from o1jax.model import Gemma2Config, load_hf
from o1jax.model.sampler import generate

PROMPT, NEW = 32, 128


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_seconds(first, second, reps: int) -> tuple[float, float, float]:
    """(median seconds of `first`, of `second`, median of the per-rep ratios first / second),
    the two timed in turn, so that the machine's drift during the run weighs on both alike."""
    first(), second()
    times = []
    for _ in range(reps):
        pair = []
        for fn in (first, second):
            start = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - start)
        times.append(pair)
    a, b = zip(*times, strict=True)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in times)


def matmul_flops_per_second(n: int = 1024, reps: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    seconds = median_seconds(lambda: dot(a).block_until_ready(), reps)
    return 2 * n**3 / seconds


def decode_flops_per_token(cfg: Gemma2Config, context: int) -> float:
    """Matmul FLOPs of one decoded token: projections, MLP, unembedding and attention."""
    d, hd = cfg.d_model, cfg.head_dim
    proj = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.ffn_dim
    attn = 2 * cfg.num_heads * hd * context
    return 2 * (cfg.num_layers * (proj + mlp + attn) + d * cfg.vocab_size)


def prefill_flops(cfg: Gemma2Config, prompt: int) -> float:
    """Matmul FLOPs of a prompt's first `prompt - 1` positions (the last one is the first
    `decode_flops_per_token`): projections, MLP and causal attention; `generate` unembeds only
    the last position."""
    d, hd = cfg.d_model, cfg.head_dim
    proj = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.ffn_dim
    attn = sum(2 * cfg.num_heads * hd * (p + 1) for p in range(prompt - 1))
    return 2 * cfg.num_layers * ((prompt - 1) * (proj + mlp) + attn)


def generate_flops(cfg: Gemma2Config, prompt: int, new: int) -> float:
    """Matmul FLOPs of one row of `generate(max_new_tokens=new)` on a `prompt`-token prompt:
    the prefill, its last position unembedded, and `new` decode steps, each forwarding the
    token it drew (the last one's logits go unused, but the step runs)."""
    return prefill_flops(cfg, prompt) + sum(
        decode_flops_per_token(cfg, prompt + i) for i in range(new + 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--hf-devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
        help="where transformers runs: its CPU build (the issue's baseline) and/or a GPU",
    )  # fmt: skip
    args = parser.parse_args()

    cfg = Gemma2Config.tiny(vocab_size=512)
    torch.manual_seed(0)
    hf_cpu = Gemma2ForCausalLM(HFGemma2Config(**cfg.to_hf(), attn_implementation="eager")).eval()
    with tempfile.TemporaryDirectory() as d:
        hf_cpu.save_pretrained(d)
        cfg, params = load_hf(d)
    # `Module.to` moves in place: the GPU copy is a deep copy, so the CPU model stays put.
    hf_models = {d: hf_cpu if d == "cpu" else copy.deepcopy(hf_cpu).to(d) for d in args.hf_devices}

    # 1024^3 keeps a CPU's measurement short; an accelerator needs a larger product to be busy.
    roofline_n = 1024 if jax.default_backend() == "cpu" else 8192
    peak = matmul_flops_per_second(roofline_n)
    print(
        f"tiny Gemma2: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads}/"
        f"{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}, ffn {cfg.ffn_dim}, vocab "
        f"{cfg.vocab_size}; prompt {PROMPT}, {NEW} new tokens, temperature 1; "
        f"torch threads {torch.get_num_threads()}, jax {jax.__version__} "
        f"({jax.default_backend()})"
    )
    print(f"measured matmul roofline ({roofline_n}^3 float32 jnp.dot): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"{'batch':>5} {'transformers on':>15} {'transformers tok/s':>19} {'o1jax tok/s':>12} "
        f"{'ratio':>6} "
        f"{'o1jax GFLOP/s':>14} {'of roofline':>11}"
    )
    for batch in args.batches:
        rng = np.random.default_rng(batch)
        prompts = rng.integers(3, cfg.vocab_size, (batch, PROMPT))
        prompts_j, lengths_j = jnp.asarray(prompts), jnp.full((batch,), PROMPT, jnp.int32)
        key = jax.random.key(0)

        def run_ours(prompts_j=prompts_j, lengths_j=lengths_j, key=key):
            out = generate(
                params, cfg, prompts_j, lengths_j, key=key, max_new_tokens=NEW, temperature=1.0
            )
            out.tokens.block_until_ready()

        for device, hf in hf_models.items():
            prompts_t = torch.as_tensor(prompts, device=device)

            def run_hf(hf=hf, prompts_t=prompts_t, batch=batch, device=device):
                with torch.inference_mode():
                    out = hf.generate(
                        prompts_t,
                        attention_mask=torch.ones_like(prompts_t),
                        do_sample=True,
                        temperature=1.0,
                        top_k=0,
                        top_p=1.0,
                        max_new_tokens=NEW,
                        min_new_tokens=NEW,
                        pad_token_id=0,
                    )
                if device == "cuda":
                    torch.cuda.synchronize()
                assert out.shape == (batch, PROMPT + NEW)

            n_tokens = batch * NEW
            t_hf, t_ours, ratio = alternating_seconds(run_hf, run_ours, args.reps)
            flops = batch * generate_flops(cfg, PROMPT, NEW)  # all the work `generate` times
            achieved = flops / t_ours
            print(
                f"{batch:>5} {device:>15} {n_tokens / t_hf:>19.0f} {n_tokens / t_ours:>12.0f} "
                f"{ratio:>5.1f}x {achieved / 1e9:>14.2f} {achieved / peak:>10.1%}"
            )


if __name__ == "__main__":
    main()
