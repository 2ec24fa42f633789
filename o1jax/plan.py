"""Memory per device of a run, from its config alone (no weights are read).

    python -m o1jax.plan --config configs/gemma2-9b.yaml --mesh data=1,fsdp=8,tensor=1
    python -m o1jax.plan --config configs/gemma2-2b.yaml model_dir=/data/gemma-2-2b

Estimates the resident arrays: the frozen base, the LoRA adapter and its Adam moments (or the
full params' moments with sft.full_finetune), the sampler's KV cache during self-play, and the
replay buffer. Activations and XLA temporaries come on top; leave headroom.
"""

from __future__ import annotations

import argparse
import sys


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def estimate(config, cfg, mesh: dict[str, int], devices: int) -> dict[str, float]:
    """Bytes per device of each resident array group."""
    from o1jax.model.lora import ALL_TARGETS, target_shapes

    data, fsdp, tensor = (mesh[a] for a in ("data", "fsdp", "tensor"))
    param_bytes = 2 if config.model.dtype == "bfloat16" else 4
    d, v = cfg.d_model, cfg.vocab_size
    per_layer = sum(a * b for a, b in (target_shapes(cfg, t) for t in ALL_TARGETS)) + 4 * d
    n_params = cfg.num_layers * per_layer + v * d + d
    lora_params = cfg.num_layers * sum(
        config.lora.rank * sum(target_shapes(cfg, t)) for t in config.lora.targets
    )
    s = config.search
    prompt = 512 if config.model_dir else 64
    context = prompt + s.max_depth * (s.thought_length + 16) + s.thought_length + 1
    rows = config.rl.problems_per_iteration * s.num_children
    kv = 2 * cfg.num_layers * rows * context * cfg.num_kv_heads * cfg.head_dim * param_bytes
    experience = 4 * (context + 8) + 4 * s.thought_length
    trained = n_params if config.sft.full_finetune else lora_params
    return {
        "base params": n_params * param_bytes / (fsdp * tensor),
        "LoRA adapter (f32)": lora_params * 4 / tensor,
        "optimizer (Adam, f32)": 2
        * trained
        * 4
        / ((fsdp * tensor) if trained == n_params else tensor),
        "KV cache (self-play)": kv / (data * fsdp * tensor),
        "replay buffer (one device)": config.rl.buffer_capacity * experience,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--mesh", default="", help="e.g. data=2,fsdp=4,tensor=1 (default: config)")
    parser.add_argument("--devices", type=int, default=0, help="total devices (default: mesh)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from o1jax.model import Gemma2Config
    from o1jax.model.hf_io import CheckpointError, read_config
    from o1jax.model.lora import ALL_TARGETS
    from o1jax.parallel.mesh import mesh_shape
    from o1jax.train.config import ConfigError, load_config

    try:
        if args.devices < 0:
            raise ConfigError(f"--devices {args.devices}: must be >= 1 (or 0: from the mesh)")
        config = load_config(args.config, args.overrides)
        mesh = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
        for item in filter(None, args.mesh.split(",")):
            axis, _, size = item.partition("=")
            if axis not in mesh or not size.lstrip("-").isdigit():
                raise ConfigError(f"--mesh {args.mesh}: expected axis=size with axes {list(mesh)}")
            mesh[axis] = int(size)
        if -1 in mesh.values() and not args.devices:
            raise ConfigError("the mesh has a -1 axis: give --devices or a full --mesh")
        try:
            mesh = mesh_shape(mesh, args.devices or None)
        except ValueError as e:
            where = f"--mesh {args.mesh}" if args.mesh else f"{args.config}: mesh"
            devices = f" with --devices {args.devices}" if args.devices else ""
            raise ConfigError(f"{where}{devices}: {str(e).removeprefix('mesh: ')}") from e
        unknown = [t for t in config.lora.targets if t not in ALL_TARGETS]
        if unknown:
            raise ConfigError(f"lora.targets: unknown {unknown}; choose from {list(ALL_TARGETS)}")
        try:
            if config.model_dir:
                cfg = read_config(config.model_dir)
            elif config.model.preset != "tiny":
                cfg = Gemma2Config.preset(config.model.preset)
            else:
                from o1jax.train.run_context import tiny_model_config

                cfg = tiny_model_config(config, vocab_size=512)
        except (ConfigError, CheckpointError):
            raise
        except ValueError as e:  # the model's own checks (Gemma2Config)
            raise ConfigError(f"{args.config}: model: {e}") from e
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = estimate(config, cfg, mesh, args.devices)
    total_devices = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    print(
        f"model: {cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
        f"{config.model.dtype} base; mesh {mesh} ({total_devices} devices)"
    )
    for name, size in rows.items():
        print(f"  {name:<28}{_gib(size)} per device")
    print(f"  {'total (before activations)':<28}{_gib(sum(rows.values()))} per device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
