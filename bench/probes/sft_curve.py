"""SFT learning curve with the pipeline's own data: greedy pass@1 at chosen steps.

    python bench/probes/sft_curve.py --steps 750 --evals 300,450,600,750 --out /tmp/sft \\
        [key=value ...]

Saves the params at each evaluated step as `OUT/step_N` (HF safetensors) for the other probes.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import context, save_params

from o1jax.train import evaluate as ev
from o1jax.train import sft_stage
from o1jax.train.sft import SFTConfig, SFTTrainer, pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--evals", required=True, help="comma-separated steps to evaluate at")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    evals = {int(x) for x in args.evals.split(",")}
    ctx = context(args.out, [f"sft.steps={args.steps}", *args.overrides])
    s = ctx.config.sft
    sft_config = SFTConfig(
        steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len, learning_rate=s.learning_rate,
        warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
    )  # fmt: skip
    trainer = SFTTrainer(ctx.cfg, ctx.params, sft_config, ctx.mesh)
    examples = sft_stage.sft_examples(ctx.config, ctx.tokenizer, ctx.train)
    packed = pack(examples, s.seq_len, pad_id=ctx.tokenizer.pad_token_id or 0)
    start, eval_seconds = time.time(), 0.0
    for step in range(args.steps):
        metrics = trainer.train_step(packed.batch(step, s.batch_size, ctx.config.seed))
        if step + 1 in evals:
            t = time.time()
            result = ev.evaluate(
                trainer.params, ctx.cfg, ctx.tokenizer, ctx.test[:200], key=jax.random.key(0),
                max_new_tokens=160, batch_size=32, progress=None,
            )  # fmt: skip
            eval_seconds += time.time() - t
            train_s = time.time() - start - eval_seconds
            print(f"step {step + 1}: loss {float(metrics['loss']):.3f}, held-out greedy pass@1 "
                  f"{result.pass1:.3f}, SFT {train_s:.0f} s", flush=True)  # fmt: skip
            save_params(f"{args.out}/step_{step + 1}", ctx.cfg, jax.device_get(trainer.params))


if __name__ == "__main__":
    main()
