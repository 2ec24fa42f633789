"""o1jax's main job: SFT, then self-play MCTS + prioritized replay + PPO on LoRA adapters.

    python train.py                                     # the embedded tiny default, on a CPU
    python train.py --config configs/smoke.yaml --workdir runs/smoke
    python train.py --config configs/gemma2-2b.yaml --workdir runs/2b \\
        model_dir=/data/gemma-2-2b data.path=/data/train.jsonl

A workdir that holds a checkpoint of the same config is resumed; SIGTERM saves and exits.
Bad input exits with status 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: tiny)")
    parser.add_argument("--workdir", default="runs/tiny", help="outputs and checkpoints")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.steps=50")
    args = parser.parse_args(argv)

    from o1jax.data.tasks import DataError
    from o1jax.model import CheckpointError
    from o1jax.train.config import ConfigError, load_config
    from o1jax.train.pipeline import run
    from o1jax.train.run_context import NonFiniteLoss, Preempted, require_weights

    try:
        config = load_config(args.config, args.overrides)
        if config.model_dir and not os.path.isdir(config.model_dir):
            raise ConfigError(f"model_dir {config.model_dir}: no such directory")
        require_weights(config)
        report = run(config, args.workdir)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"preempted: {e}; run the same command again to resume", file=sys.stderr)
        return 143
    print(json.dumps(report, indent=2))
    wrote = [  # what this process wrote (process 0 of a multi-host run; curves if any metric)
        f"{what}: {path}"
        for what, name in (("report", "report.json"), ("curves", "learning_curves.png"))
        if os.path.exists(path := os.path.join(args.workdir, name))
    ]
    if os.path.isdir(logdir := os.path.join(args.workdir, "tensorboard")):
        wrote.append(f"tensorboard --logdir {logdir}")
    if wrote:
        print("; ".join(wrote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
