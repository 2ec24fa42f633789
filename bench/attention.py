"""Pallas attention kernels against the XLA (materialising) path: memory and time, or correctness.

On a GPU (or TPU): for each sequence length, the compiled temp memory (`memory_analysis()`) and
the median time of forward and forward+backward, Pallas vs XLA in the same run, with ratios;
then decode (one token against a KV cache of each length). XLA runs that do not fit are reported
as OOM. `--sweep` also times a few flash block sizes at the longest length.

On the CPU there is no Pallas compiler: the script then runs interpret-mode CORRECTNESS checks
only (relative errors of the Pallas kernels against the reference) and prints no timings.

    python bench/attention.py                       # Gemma2-2B attention shapes, bf16
    python bench/attention.py --seqs 512 1024 2048 4096 8192 --batch 2 --sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels import BlockSizes


def median_ms(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def temp_mb(fn, args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def inputs(b, t, s, h, k, d, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, t, h, d), dtype),
        jax.random.normal(kk, (b, s, k, d), dtype),
        jax.random.normal(kv, (b, s, k, d), dtype),
    )


def attention_fns(impl, block_sizes=None, **kw):
    """(jitted forward, jitted forward+backward) for one implementation."""
    fwd = lambda q, k, v: kernels.attention(q, k, v, impl=impl, block_sizes=block_sizes, **kw)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(fn, args, reps):
    """(temp MiB, median ms) or None when XLA cannot allocate it."""
    try:
        return temp_mb(fn, args), median_ms(fn, args, reps)
    except Exception as err:  # report an OOM and keep going
        if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
            return None
        raise


def row(pallas, xla) -> str:
    """Table cells: time pallas | time xla | ratio | temp pallas | temp xla | ratio."""
    cell = lambda r, i, unit: "OOM" if r is None else f"{r[i]:.2f} {unit}"
    both = pallas is not None and xla is not None
    t_ratio = f"x{xla[1] / pallas[1]:.2f}" if both else "-"
    m_ratio = f"x{xla[0] / max(pallas[0], 1e-9):.1f}" if both else "-"
    return (
        f"{cell(pallas, 1, 'ms')} | {cell(xla, 1, 'ms')} | {t_ratio} | "
        f"{cell(pallas, 0, 'MiB')} | {cell(xla, 0, 'MiB')} | {m_ratio}"
    )


_HEADER = "time pallas | time xla | xla/pallas | temp pallas | temp xla | xla/pallas |"


def bench_device(args, dtype, kw) -> None:
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(
        f"shapes: batch {args.batch}, heads {args.heads}/{args.kv_heads}, head dim {args.head_dim},"
        f" {args.dtype}, softcap {kw['softcap']}, window {kw['window']}, causal"
    )
    print("ratios are xla / pallas (higher = pallas better); memory = compiled temp bytes\n")
    print(f"| T | pass | {_HEADER}")
    print("|---" * 8 + "|")
    for t in args.seqs:
        qkv = inputs(args.batch, t, t, args.heads, args.kv_heads, args.head_dim, dtype)
        p_fwd, p_bwd = attention_fns("pallas", **kw)
        x_fwd, x_bwd = attention_fns("xla", **kw)
        for name, p_fn, x_fn in (("fwd", p_fwd, x_fwd), ("fwd+bwd", p_bwd, x_bwd)):
            p, x = measure(p_fn, qkv, args.reps), measure(x_fn, qkv, args.reps)
            print(f"| {t} | {name} | {row(p, x)} |", flush=True)

    print("\ndecode: one token per row against a full KV cache of S slots")
    print(f"| S | layer | {_HEADER}")
    print("|---" * 8 + "|")
    for s in args.decode_seqs:
        b = args.decode_batch
        q, k, v = inputs(b, 1, s, args.heads, args.kv_heads, args.head_dim, dtype)
        lengths = jnp.full((b,), s, jnp.int32)
        for layer, window in (("global", None), (f"local {kw['window']}", kw["window"])):
            res = {}
            for impl in ("pallas", "xla"):
                fn = jax.jit(
                    lambda q, k, v, n, impl=impl, window=window: kernels.decode_attention(
                        q, k, v, n, impl=impl, softcap=kw["softcap"], window=window
                    )
                )
                res[impl] = measure(fn, (q[:, 0], k, v, lengths), args.reps)
            print(f"| {s} | {layer} | {row(res['pallas'], res['xla'])} |", flush=True)

    if args.sweep:
        t = max(args.seqs)
        qkv = inputs(args.batch, t, t, args.heads, args.kv_heads, args.head_dim, dtype)
        print(f"\nblock-size sweep at T={t} (forward+backward)")
        print("| block_q, block_k, block_q_bwd, block_k_bwd, warps, stages | fwd | fwd+bwd |")
        print("|---|---|---|")
        for blocks in (
            BlockSizes(64, 64, 32, 32, 4, 2),
            BlockSizes(64, 64, 32, 32, 8, 2),
            BlockSizes(128, 64, 32, 32, 8, 2),
            BlockSizes(64, 32, 32, 32, 4, 3),
            BlockSizes(128, 32, 64, 32, 8, 2),
            BlockSizes(64, 64, 64, 32, 8, 2),
        ):
            fwd, bwd = attention_fns("pallas", block_sizes=blocks, **kw)
            label = ", ".join(str(x) for x in dataclasses.astuple(blocks))
            try:
                f, b = median_ms(fwd, qkv, args.reps), median_ms(bwd, qkv, args.reps)
                print(f"| {label} | {f:.2f} ms | {b:.2f} ms |", flush=True)
            except Exception as err:  # e.g. shared memory exceeded
                print(f"| {label} | failed: {type(err).__name__}: {str(err)[:80]} | |")


def check_correctness(interpret: bool) -> None:
    """Relative errors of the Pallas kernels against the XLA reference (float32 reference on the
    same inputs): in the interpreter on a CPU, compiled on an accelerator before its timings."""
    if interpret:
        print(
            "CPU backend: Pallas cannot compile for the CPU, so this run checks CORRECTNESS ONLY\n"
            "(interpret=True against the XLA reference). No timings or memory figures: the Pallas\n"
            "interpreter is not a performance path. Run on a GPU for the benchmark.\n"
        )
    else:
        print("compiled Pallas kernels against the XLA reference (relative errors):\n")
    print("| case | dtype | out rel err | dq | dk | dv |")
    print("|---|---|---|---|---|---|")
    blocks = BlockSizes(64, 64, 32, 32)
    cases = [  # (name, B, T, S, H, K, D, kwargs)
        ("gemma2 local, T=256", 1, 256, 256, 4, 2, 64, dict(softcap=50.0, window=128)),
        ("gemma2 global, cap 5, T=200", 2, 200, 200, 4, 2, 64, dict(softcap=5.0)),
        ("chunked prefill 96 of 300, GQA 4", 1, 96, 300, 8, 2, 32, dict(softcap=5.0, window=64)),
    ]
    for dtype in (jnp.float32, jnp.bfloat16):
        for name, b, t, s, h, k, d, kw in cases:
            q, kk, v = inputs(b, t, s, h, k, d, dtype, seed=1)
            mask = jnp.arange(s)[None, :] >= (jnp.arange(b) * (s // 4))[:, None]  # left padding
            p_fwd, p_bwd = attention_fns(
                "pallas", block_sizes=blocks, interpret=interpret, mask=mask, **kw
            )
            x_fwd, x_bwd = attention_fns("xla", mask=mask, **kw)
            f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
            errs = [rel_err(p_fwd(q, kk, v), x_fwd(*f32))]
            errs += [rel_err(a, b_) for a, b_ in zip(p_bwd(q, kk, v), x_bwd(*f32), strict=True)]
            cells = " | ".join(f"{e:.1e}" for e in errs)
            print(f"| {name} | {jnp.dtype(dtype).name} | {cells} |", flush=True)

    q, k, v = inputs(4, 1, 700, 8, 4, 64, jnp.float32, seed=2)
    lengths = jnp.array([700, 513, 64, 1])
    kw = dict(softcap=50.0, window=256)
    out = kernels.decode_attention(
        q[:, 0], k, v, lengths, impl="pallas", interpret=interpret, num_splits=3, **kw
    )
    ref = kernels.decode_attention(q[:, 0], k, v, lengths, **kw)
    print(f"\ndecode (S=700, 3 splits, window 256, cap 50): rel err {rel_err(out, ref):.1e}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--decode-seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)  # Gemma2-2B: 8 query heads,
    parser.add_argument("--kv-heads", type=int, default=4)  # 4 kv heads,
    parser.add_argument("--head-dim", type=int, default=256)  # head dim 256,
    parser.add_argument("--softcap", type=float, default=50.0)  # soft-cap 50,
    parser.add_argument("--window", type=int, default=4096)  # local layers: window 4096
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="time a few flash block sizes")
    args = parser.parse_args()

    if jax.default_backend() == "cpu":
        check_correctness(interpret=True)
        return
    check_correctness(interpret=False)
    kw = dict(causal=True, softcap=args.softcap, window=args.window)
    bench_device(args, jnp.dtype(args.dtype), kw)


if __name__ == "__main__":
    main()
