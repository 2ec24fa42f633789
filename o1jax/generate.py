"""Sample from a model directory (or a trained run) from the command line.

    python -m o1jax.generate --model DIR --prompt "What is 2 + 3?" [--max-new-tokens 64]
    python -m o1jax.generate --workdir runs/tiny --prompt "Start with 4, add 5." --longcot
    python -m o1jax.generate --model DIR --prompt TEXT --samples 4 --temperature 0.8 --top-p 0.9

--model reads an HF Gemma2 directory (safetensors + tokenizer files; nothing is downloaded);
--workdir reads a `train.py` run (its tokenizer and its latest checkpoint, LoRA included).
--longcot wraps the prompt as the root of a long-CoT tree, as search and training see it.
Prints each sample's text; --json prints tokens, per-token log-probs and stop flags instead.
Bad input (missing directory, unreadable checkpoint, bad settings) exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an HF Gemma2 directory (safetensors + tokenizer)")
    source.add_argument("--workdir", help="a train.py workdir (its tokenizer and checkpoint)")
    parser.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=1, help="continuations per prompt")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        help="a stop token (text); default: EOS, and every eos_token_id of the model directory",
    )
    parser.add_argument("--longcot", action="store_true", help="render the prompt as a tree root")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON records, one per line")
    return parser.parse_args(argv)


def _load(args):
    """(params, cfg, tokenizer, lora, eos ids) from --model or --workdir.

    With --model and --longcot, the long-CoT tokens are added to the tokenizer (and the
    embedding grown to match) as `train.py` does, unless the directory's tokenizer has them.
    """
    import jax.numpy as jnp

    from o1jax.model.hf_io import eos_token_ids

    if args.workdir:
        from o1jax.train.pipeline import restore_policy
        from o1jax.train.run_context import open_run

        ctx = open_run(args.workdir)
        try:
            params, adapter = restore_policy(ctx)
        finally:
            ctx.checkpointer.close()
        model_dir = ctx.config.model_dir  # a run of an HF checkpoint: its eos ids too
        return (
            params,
            ctx.cfg,
            ctx.tokenizer,
            adapter,
            eos_token_ids(model_dir) if model_dir else (),
        )

    from o1jax.data.tokenizer import add_longcot_tokens, fit_embeddings, load_tokenizer
    from o1jax.model.hf_io import load_hf

    cfg, params = load_hf(args.model, dtype=jnp.dtype(args.dtype))
    tokenizer = load_tokenizer(args.model)
    if args.longcot:  # new rows: the mean of their names' pieces (`fit_embeddings`)
        first_added = len(tokenizer)
        add_longcot_tokens(tokenizer)
        params = fit_embeddings(params, tokenizer, first_added)
        cfg = cfg.replace(vocab_size=max(len(tokenizer), cfg.vocab_size))
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"{args.model}: the tokenizer has {len(tokenizer)} tokens but the embedding has "
            f"{cfg.vocab_size} rows"
        )
    return params, cfg, tokenizer, None, eos_token_ids(args.model)


def _stop_ids(tokenizer, stops: list[str], model_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The --stop tokens, else the tokenizer's EOS and every EOS id the model directory names."""
    if not stops:
        eos = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
        return tuple(dict.fromkeys((*eos, *model_eos)))
    ids = []
    for text in stops:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(f"--stop {text!r} is {len(tokens)} tokens; a stop must be one token")
        ids.append(int(tokens[0]))
    return tuple(ids)


def _encode(tokenizer, prompts: list[str], longcot: bool):
    import jax.numpy as jnp

    from o1jax.search.format import _pad_rows, encode_prompts

    if longcot:
        return encode_prompts(tokenizer, prompts)
    rows = [tokenizer.encode(p) for p in prompts]
    if any(not r for r in rows):
        raise ValueError("--prompt: an empty prompt encodes to no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return jnp.asarray(_pad_rows(rows, pad)), jnp.asarray([len(r) for r in rows], jnp.int32)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    import jax
    import numpy as np

    from o1jax.model import CheckpointError
    from o1jax.model.sampler import generate
    from o1jax.train.config import ConfigError

    try:
        params, cfg, tokenizer, adapter, model_eos = _load(args)
        stop_tokens = _stop_ids(tokenizer, args.stop, model_eos)
        prompts, lengths = _encode(tokenizer, args.prompt, args.longcot)
        out = generate(
            params,
            cfg,
            prompts,
            lengths,
            key=jax.random.key(args.seed),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_tokens=stop_tokens,
            num_samples=args.samples,
            lora=adapter,
        )
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    tokens, lengths_out = np.asarray(out.tokens), np.asarray(out.lengths)
    logprobs, stopped = np.asarray(out.logprobs), np.asarray(out.stopped)
    for row in range(tokens.shape[0]):
        n = int(lengths_out[row])
        ids = [int(t) for t in tokens[row, :n]]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        prompt = args.prompt[row // args.samples]
        if args.json:
            record = {
                "prompt": prompt,
                "sample": row % args.samples,
                "text": text,
                "tokens": ids,
                "logprobs": [round(float(x), 6) for x in logprobs[row, :n]],
                "stopped": bool(stopped[row]),
            }
            print(json.dumps(record))
        else:
            header = f"--- prompt {row // args.samples}, sample {row % args.samples}"
            end = "stop token" if stopped[row] else "token budget"
            print(
                f"{header} ({n} tokens, ended by the {end}, log p = {logprobs[row, :n].sum():.2f})"
            )
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
