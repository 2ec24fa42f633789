"""More SFT on a LoRA adapter over a run's SFT'd policy: how far does held-out greedy move?

    python bench/probes/continued_sft.py --workdir /tmp/seed2 --lr 1e-4 --evals 8,16,32 seed=2

Trains a fresh LoRA adapter (the config's rank) on the run's own SFT data, reshuffled, at a
constant learning rate after one warmup step, and prints greedy pass@1 on the 200 held-out
problems at each of `--evals` steps. The same number of updates as RL's PPO stage, on correct
worked data instead of self-play, says how much of RL's swing in greedy accuracy is simply what
any small update of this model does, and how much an update in a good direction can gain.
"""

from __future__ import annotations

import argparse
import sys

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import context

from o1jax.model import lora
from o1jax.train import evaluate as ev
from o1jax.train import pipeline, run_context, sft_stage
from o1jax.train.sft import SFTConfig, SFTTrainer, pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a train.py workdir: its SFT'd policy")
    parser.add_argument("--out", default="/tmp/continued_sft")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16, help="packed rows per step")
    parser.add_argument("--evals", default="8,16,32")
    parser.add_argument("--shuffle-seed", type=int, default=1000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    evals = sorted(int(x) for x in args.evals.split(","))
    ctx = context(args.out, args.overrides)
    params, _ = pipeline.restore_policy(run_context.open_run(args.workdir))
    config = ctx.config
    adapter = lora.init(ctx.cfg, jax.random.key(args.shuffle_seed), run_context.lora_config(config))
    sft = SFTConfig(
        steps=10**9, batch_size=args.batch_size, seq_len=config.sft.seq_len,
        learning_rate=args.lr, warmup_steps=1,
    )  # fmt: skip
    trainer = SFTTrainer(ctx.cfg, params, sft, ctx.mesh, lora=adapter)
    packed = pack(
        sft_stage.sft_examples(config, ctx.tokenizer, ctx.train), config.sft.seq_len,
        pad_id=ctx.tokenizer.pad_token_id or 0,
    )  # fmt: skip

    def greedy(adapter_now) -> float:
        return ev.evaluate(
            params, ctx.cfg, ctx.tokenizer, ctx.test[:200], key=jax.random.key(7),
            max_new_tokens=160, batch_size=32, lora=adapter_now, progress=None,
        ).pass1  # fmt: skip

    print(f"greedy after SFT: {greedy(None):.3f}", flush=True)
    for step in range(evals[-1]):
        metrics = trainer.train_step(packed.batch(step, args.batch_size, args.shuffle_seed))
        if step + 1 in evals:
            print(
                f"step {step + 1}: loss {float(metrics['loss']):.3f}, "
                f"greedy {greedy(trainer.lora):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
