"""Host memory of restoring a workdir's policy, as `python -m o1jax.evaluate --workdir` does.

Opens the run (its config, tokenizer and base model), then restores the latest checkpoint's
trainer states with `pipeline.restore_policy`, and prints how much the process's peak resident
memory (`ru_maxrss`) grew during the restore. On a CPU that is the restore's whole footprint:
the restored states plus whatever else was alive meanwhile.

    python bench/probes/restore_memory.py --workdir runs/tiny
"""

from __future__ import annotations

import argparse
import resource

import jax


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a train.py run with a checkpoint")
    args = parser.parse_args()

    from o1jax.train.pipeline import restore_policy
    from o1jax.train.run_context import open_run

    ctx = open_run(args.workdir)
    jax.block_until_ready(ctx.params)
    before = peak_mib()
    params, _ = restore_policy(ctx)
    jax.block_until_ready(params)
    after = peak_mib()
    n = sum(x.size for x in jax.tree.leaves(ctx.params))
    print(
        f"base params {n / 1e6:.0f}M; peak resident memory {before:.0f} MiB before the restore, "
        f"{after:.0f} MiB after: the restore added {after - before:.0f} MiB"
    )


if __name__ == "__main__":
    main()
