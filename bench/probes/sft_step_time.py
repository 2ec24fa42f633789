"""Seconds per SFT step of the default model's shape (16 x 256 packed tokens, 4 segments a row).

The attention soft-cap is on (50) unless `--softcap 0`; configs/tiny.yaml turns it off, so
`--softcap 0` times the default run's step.

python bench/probes/sft_step_time.py                      # as configured (YNN dot on CPU)
python bench/probes/sft_step_time.py --softcap 0          # the default run's step
O1JAX_CPU_YNN_DOT=0 python bench/probes/sft_step_time.py  # XLA's default dot emitter
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from o1jax.model import Gemma2Config, init_params
from o1jax.parallel.mesh import make_mesh
from o1jax.train.sft import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--softcap", type=float, default=50.0, help="0: no attention soft-cap")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    b, t = 16, 256
    cfg = Gemma2Config.tiny(
        vocab_size=318, num_layers=4, d_model=128, num_heads=4, num_kv_heads=1, head_dim=32,
        ffn_dim=512, query_pre_attn_scalar=32, sliding_window=128,
        attn_logit_softcapping=args.softcap or None,
    )  # fmt: skip
    trainer = SFTTrainer(
        cfg, init_params(cfg, jax.random.key(0)), SFTConfig(steps=100, batch_size=b, seq_len=t),
        make_mesh(),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32),
        "positions": np.tile(np.arange(t // 4), 4)[None].repeat(b, 0).astype(np.int32),
        "segment_ids": np.repeat(np.arange(1, 5), t // 4)[None].repeat(b, 0).astype(np.int32),
        "loss_mask": np.ones((b, t), bool),
    }
    for _ in range(2):
        jax.block_until_ready(trainer.train_step(batch))
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = trainer.train_step(batch)
    jax.block_until_ready(metrics)
    print(f"SFT step: {(time.perf_counter() - start) / args.steps:.3f} s")


if __name__ == "__main__":
    main()
