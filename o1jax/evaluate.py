"""Evaluate a trained run or an HF model on a problem set.

    python -m o1jax.evaluate --workdir runs/tiny [--samples 8] [--search mcts --simulations 16]
        [--trees DIR]   # with --search: one JSON per tree, for python -m o1jax.show_tree
    python -m o1jax.evaluate --workdir runs/berry --search mcts,mctsr,sr-mcts --rollouts 8
        # step-level MCTS, MCTSr (self-reward) and SR-MCTS (the run's PPRM + EBC) side by side;
        # with --trees DIR, DIR/<search>/ per search (refine trees as OpenLongCoT text)
    python -m o1jax.evaluate --model DIR --data problems.jsonl [--samples 8] [--limit 100]

Prints a summary table (greedy pass@1; pass@k and maj@k with --samples; search accuracy with
--search) and writes per-problem outputs as JSONL (--out, default beside the run or ./eval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

SEARCHES = ("mcts", "mctsr", "sr-mcts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a train.py workdir (its config and last checkpoint)")
    source.add_argument("--model", help="an HF Gemma2 directory (safetensors + tokenizer)")
    parser.add_argument("--data", help="JSONL problems (default with --workdir: its held-out set)")
    parser.add_argument("--samples", type=int, default=1, help="K for pass@k and maj@k")
    parser.add_argument(
        "--search",
        default="none",
        help="none, or a comma-separated list of mcts (step-level, LLaMA-O1), mctsr (self-refine "
        "with self-reward) and sr-mcts (self-refine with the run's PPRM + EBC, LLaMA-Berry)",
    )
    parser.add_argument("--simulations", type=int, default=16, help="for --search mcts")
    parser.add_argument("--rollouts", type=int, default=8, help="for --search mctsr | sr-mcts")
    parser.add_argument(
        "--trees",
        default="",
        help="with --search: write each tree to DIR (DIR/<search>/ for several searches); mcts "
        "trees as <id>.json (for show_tree) and OpenLongCoT <id>.txt, mctsr and sr-mcts (refine) "
        "trees as OpenLongCoT <id>.txt only",
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        help="greedy and sampling budget per problem; 0: the config's eval.max_new_tokens (160 "
        "in tiny.yaml and with --model, 1024 in the gemma2 configs; real solutions need the "
        "larger one)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="with --model: the weights' dtype on the device (bfloat16 halves their memory)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="directory for the per-problem JSONL")
    args = parser.parse_args(argv)
    if args.model and not args.data:
        parser.error("--model needs --data")
    for flag, value, least in (
        ("--samples", args.samples, 1),
        ("--simulations", args.simulations, 1),
        ("--rollouts", args.rollouts, 1),
        ("--batch-size", args.batch_size, 1),
        ("--limit", args.limit, 0),
        ("--max-new-tokens", args.max_new_tokens, 0),
    ):
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    searches = [] if args.search == "none" else args.search.split(",")
    unknown = [s for s in searches if s not in SEARCHES]
    if unknown:
        parser.error(f"--search: unknown {unknown[0]!r} (choose from none, {', '.join(SEARCHES)})")
    if args.trees and not searches:
        parser.error("--trees needs --search (the trees are the searches')")
    if "sr-mcts" in searches and not args.workdir:
        parser.error("--search sr-mcts needs --workdir (a run that trained a PPRM: pprm.steps > 0)")

    import jax

    from o1jax.data.tasks import DataError, load_jsonl
    from o1jax.model import CheckpointError
    from o1jax.train import evaluate as ev
    from o1jax.train.config import ConfigError, RunConfig

    try:
        if args.workdir:
            from o1jax.train.pipeline import restore_policy
            from o1jax.train.run_context import open_run, search_config

            ctx = open_run(args.workdir)
            try:  # the checkpoints are read here, and only here
                params, adapter = restore_policy(ctx)
                judge = None
                if "sr-mcts" in searches:
                    from o1jax.search.refine import PPRMJudge
                    from o1jax.train.pipeline import restore_pprm

                    base, pprm_adapter = restore_pprm(ctx)
                    rated = ctx.config.pprm.rates_steps
                    judge = PPRMJudge(base, ctx.cfg, pprm_adapter, ctx.tokenizer, rated=rated)
            finally:
                ctx.checkpointer.close()
            cfg, tokenizer, config, mesh = ctx.cfg, ctx.tokenizer, ctx.config, ctx.mesh
            problems = load_jsonl(args.data) if args.data else ctx.test
            out_dir = args.out or args.workdir
            stop_tokens = None  # the run's own tokenizer: its EOS
        else:
            from o1jax.model.hf_io import eos_token_ids
            from o1jax.train.config import ModelConfig
            from o1jax.train.run_context import build_model, build_tokenizer, search_config

            problems = load_jsonl(args.data)
            config = RunConfig(model_dir=args.model, model=ModelConfig(dtype=args.dtype))
            tokenizer, first_added = build_tokenizer(config, args.out or "eval")
            key = jax.random.key(args.seed)
            cfg, params = build_model(config, tokenizer, None, key, first_added)
            adapter = judge = mesh = None  # the model on one device (build_model's default)
            out_dir = args.out or "eval"
            # Stop where transformers' generate would: the tokenizer's EOS and every
            # eos_token_id of the directory (Gemma2-it also ends a turn on <end_of_turn>).
            eos = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
            stop_tokens = tuple(dict.fromkeys((*eos, *eos_token_ids(args.model))))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the model's own checks (Gemma2Config) on a saved config
        print(f"error: {args.workdir or args.model}: {e}", file=sys.stderr)
        return 2
    # Outputs that cannot be written fail now, not after the evaluation.
    for flag, path in (("--out", out_dir), ("--trees", args.trees)):
        try:
            if path:
                os.makedirs(path, exist_ok=True)
        except OSError as e:
            print(f"error: {flag} {path}: cannot create it ({e.strerror})", file=sys.stderr)
            return 2
    if args.limit:
        problems = problems[: args.limit]
    if not problems:
        source = args.data or f"{args.workdir}: its held-out set"
        print(f"error: {source}: no problems to evaluate", file=sys.stderr)
        return 2
    key = jax.random.key(args.seed)
    max_new = args.max_new_tokens or config.eval.max_new_tokens
    refine_searches = {}  # checked before any evaluation runs
    for name in [s for s in searches if s != "mcts"]:
        from o1jax.search.refine import RefineConfig

        value = "self_reward" if name == "mctsr" else "pprm"
        try:
            refine_searches[name] = RefineConfig(
                rollouts=args.rollouts, value=value, solution_length=max_new
            )
        except ValueError as e:  # a solution budget too short for the search
            print(
                f"error: --search {name}: {e} (a solution's budget is --max-new-tokens, "
                "else the run's eval.max_new_tokens)",
                file=sys.stderr,
            )
            return 2
    # A run's params lie on its mesh (restore_policy): under it each device decodes and searches
    # its share of the rows, where without it every device ran the whole batch.
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        result = ev.evaluate(
            params,
            cfg,
            tokenizer,
            problems,
            key=key,
            max_new_tokens=max_new,
            samples=args.samples,
            batch_size=args.batch_size,
            lora=adapter,
            stop_tokens=stop_tokens,
        )
        rows = {"problems": len(problems), "greedy pass@1": result.pass1}
        if args.samples > 1:
            rows |= {f"pass@{args.samples}": result.pass_k, f"maj@{args.samples}": result.maj_k}
        ev.write_records(os.path.join(out_dir, "eval_outputs.jsonl"), result.records)
        tree_dir = lambda name: (
            None if not args.trees else args.trees if len(searches) == 1 else f"{args.trees}/{name}"
        )
        if "mcts" in searches:
            found = ev.search_evaluate(
                params,
                cfg,
                tokenizer,
                problems,
                search_config(config, args.simulations),
                key=key,
                batch_size=args.batch_size,
                lora=adapter,
                tree_dir=tree_dir("mcts"),
            )
            rows[f"mcts accuracy ({args.simulations} sims)"] = found.pass1
            ev.write_records(os.path.join(out_dir, "search_outputs.jsonl"), found.records)
        for name, search in refine_searches.items():
            found = ev.refine_evaluate(
                params,
                cfg,
                tokenizer,
                problems,
                search,
                key=key,
                batch_size=args.batch_size,
                lora=adapter,
                judge=judge if search.value == "pprm" else None,
                tree_dir=tree_dir(name),
            )
            rows[f"{name} accuracy ({args.rollouts} rollouts)"] = found.pass1
            rows[f"{name} any solution right"] = sum(r["any_correct"] for r in found.records) / max(
                len(found.records), 1
            )
            cut = sum(r["truncated_children"] for r in found.records)
            rows[f"{name} refinements cut for room"] = cut / max(
                len(found.records) * args.rollouts, 1
            )
            ev.write_records(os.path.join(out_dir, f"{name}_outputs.jsonl"), found.records)
    print(ev.summary_table(rows))
    with open(os.path.join(out_dir, "eval_summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
