"""Export a trained run as a Hugging Face Gemma2 directory that transformers reads as it is.

    python -m o1jax.export --workdir runs/tiny --out runs/tiny/hf
    python -m o1jax.export --workdir runs/berry --out runs/berry/pprm_hf --pprm

Writes the run's policy at its latest checkpoint (the SFT'd model with the RL adapter merged
in; the SFT'd model alone before RL) or, with --pprm, its pairwise preference reward model (the
SFT'd model with the PPRM's adapter merged in): `config.json` and safetensors weights
(`o1jax.model.save_hf`), the run's tokenizer (long-CoT tokens included) and, for a run of an HF
checkpoint, that directory's `generation_config.json`. `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` then load it with no o1jax installed (vLLM too).

The directory is written beside --out under a temporary name and renamed into place, so an
interrupted export leaves no half-written model. --out must not exist yet, or be empty. Bad
input (no run, no checkpoint, no PPRM, an --out in use) exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a train.py workdir")
    parser.add_argument("--out", required=True, help="the HF directory to write (new or empty)")
    parser.add_argument(
        "--pprm", action="store_true", help="export the run's PPRM instead of its policy"
    )
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        print(f"error: --out {args.out}: exists and is not an empty directory", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.workdir, "config.yaml")):
        print(
            f"error: --workdir {args.workdir}: not a train.py run (no config.yaml)", file=sys.stderr
        )
        return 2

    from o1jax.data.tasks import DataError
    from o1jax.model import CheckpointError, save_hf
    from o1jax.train.config import ConfigError
    from o1jax.train.pipeline import restore_policy, restore_pprm
    from o1jax.train.run_context import open_run

    try:
        ctx = open_run(args.workdir)
        try:
            params, adapter = restore_pprm(ctx) if args.pprm else restore_policy(ctx)
        finally:
            ctx.checkpointer.close()
        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
        try:
            save_hf(staging, ctx.cfg, params, adapter)
            ctx.tokenizer.save_pretrained(staging)
            source = ctx.config.model_dir
            if source and os.path.isfile(os.path.join(source, "generation_config.json")):
                shutil.copy(os.path.join(source, "generation_config.json"), staging)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would stay after the rename
            os.replace(staging, out)  # onto an empty directory too
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {args.out}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    what = "PPRM" if args.pprm else "policy"
    print(f"{args.workdir}: its {what} written to {out} (Hugging Face Gemma2 + tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
