"""Train the PPRM on the default task's pairs and report held-out pair accuracy.

python bench/probes/pprm_accuracy.py --params /tmp/sft/step_600 --steps 400

--schedule cosine: a linear warmup over --warmup steps to --learning-rate, then a cosine decay
to 0 at --steps (probe-only; the library's PPRM stage keeps a constant rate).

--layout interleaved: a probe-only prompt layout (not the library's) that lays the two
solutions out step by step, "A: {step i of a} B: {step i of b}" on line i, so the steps that
differ sit side by side.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import add_policy_source, context, policy_params

from o1jax.model import lora
from o1jax.search import pprm as search_pprm
from o1jax.search import ratings
from o1jax.train import pprm


def encode_interleaved(tokenizer, question: str, first: str, second: str) -> list[int]:
    """`search_pprm.encode_pair` with the two solutions' steps interleaved, one pair a line."""
    _, tail = search_pprm.answer_format(tokenizer)
    steps = itertools.zip_longest(first.split("; "), second.split("; "), fillvalue="-")
    lines = "\n".join(f"A: {a} B: {b}" for a, b in steps)
    return tokenizer.encode(f"{question}\n{lines}\nBetter:{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_policy_source(parser)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layout", choices=("sequential", "interleaved"), default="sequential")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--rated", action="store_true", help="the policy's verdicts in the texts")
    args = parser.parse_args()
    if args.layout == "interleaved":
        search_pprm.encode_pair = encode_interleaved
    ctx = context("/tmp/o1jax_probe_pprm", [])
    params = policy_params(args)
    rater = None
    if args.rated:
        rater = functools.partial(ratings.thought_ratings, params, ctx.cfg, ctx.tokenizer)
    start = time.time()
    train = pprm.task_pairs(ctx.tokenizer, ctx.train, np.random.default_rng(0), rater)
    held_out = pprm.task_pairs(ctx.tokenizer, ctx.test[:200], np.random.default_rng(1), rater)
    print(f"pairs built in {time.time() - start:.0f} s", flush=True)
    adapter = lora.init(ctx.cfg, jax.random.key(9), lora.LoRAConfig(args.rank, 2.0 * args.rank))
    rate = args.learning_rate
    if args.schedule == "cosine":  # optax takes a schedule wherever it takes a rate
        rate = optax.warmup_cosine_decay_schedule(0.0, rate, args.warmup, args.steps)
    trainer = pprm.PPRMTrainer(ctx.cfg, params, adapter, pprm.PPRMConfig(learning_rate=rate),
                               ctx.mesh, ctx.tokenizer)  # fmt: skip
    accuracy = lambda: pprm.pairwise_accuracy(
        params, ctx.cfg, trainer.lora, held_out, trainer.answer_tokens
    )
    print(f"{len(train.lengths)} training rows, {held_out.num_pairs} held-out pairs; "
          f"accuracy before training {accuracy():.3f}", flush=True)  # fmt: skip
    start = time.time()
    for step in range(args.steps):
        metrics = trainer.train_step(train.batch(step, args.batch_size, 0))
        if (step + 1) % args.eval_every == 0:
            print(f"step {step + 1}: loss {float(metrics['loss']):.3f}, held-out pair accuracy "
                  f"{accuracy():.3f} ({time.time() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
