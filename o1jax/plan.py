"""Memory per device of a run, from its config alone (no weights are read).

    python -m o1jax.plan --config configs/gemma2-9b.yaml --mesh data=1,fsdp=8,tensor=1
    python -m o1jax.plan --config configs/gemma2-2b.yaml --devices 8 model_dir=/data/gemma-2-2b

Estimates the resident arrays, placed by the partition rules of o1jax.parallel.mesh: the frozen
base, the LoRA adapter and its Adam moments (with sft.full_finetune: the trained float32 copy
of the params and its moments), the sampler's KV cache during self-play, and the
replay buffer. Activations and XLA temporaries come on top: `bench/memory.py` measures a
compiled SFT or PPO step's (the last lines printed name the commands).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import types


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def per_device_bytes(tree, mesh: dict[str, int], heads=None) -> float:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) placed by the partition
    rules (`o1jax.parallel.mesh.spec_for`: a dimension the axis does not divide is replicated;
    with the model config `heads`, attention projections split over tensor in whole heads only)."""
    import jax
    import numpy as np

    from o1jax.parallel.mesh import _path_str, spec_for

    sizes = types.SimpleNamespace(shape=mesh)  # spec_for reads only `mesh.shape`
    total = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(np.shape(x))
        spec = spec_for(_path_str(path), shape, sizes, heads)  # an axis name or None per dim
        shards = math.prod(mesh[axis] for axis in spec if axis is not None)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize / shards
    return total


def _dtype_name(tree) -> str:
    import jax
    import numpy as np

    kinds = {np.dtype(x.dtype) for x in jax.tree.leaves(tree) if np.ndim(x) >= 1}
    short = {np.dtype("float32"): "f32", np.dtype("bfloat16"): "bf16"}
    return "/".join(sorted(short.get(k, k.name) for k in kinds))


def estimate(config, cfg, mesh: dict[str, int], devices: int) -> dict[str, float]:
    """Bytes per device of each resident array group.

    Shapes come from `jax.eval_shape` of the real initialisers and optimizer (nothing is
    allocated), placements from the partition rules. A full fine-tune (`sft.full_finetune`)
    trains a float32 copy of the params (the base stays resident) with float32 Adam moments;
    otherwise the LoRA adapter (f32) and its f32 moments train.
    """
    import jax
    import jax.numpy as jnp

    from o1jax.model import init_params, lora
    from o1jax.train.sft import SFTConfig, make_optimizer

    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    key = jax.random.key(0)
    params = jax.eval_shape(lambda k: init_params(cfg, k, dtype), key)
    lcfg = lora.LoRAConfig(rank=config.lora.rank, targets=tuple(config.lora.targets))
    adapter = jax.eval_shape(lambda k: lora.init(cfg, k, lcfg), key)
    # A full fine-tune trains a float32 master copy of the params (`SFTTrainer`).
    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    trained = master if config.sft.full_finetune else adapter
    opt_state = jax.eval_shape(make_optimizer(SFTConfig()).init, trained)
    param_bytes = jnp.dtype(dtype).itemsize
    s = config.search
    prompt = 512 if config.model_dir else 64
    path = prompt + s.max_depth * (s.thought_length + 16)  # the prefix of an expansion
    context = path + s.thought_length + 1  # + a thought and its <start_of_rating>
    prefixes = config.rl.problems_per_iteration * s.leaves_per_tree
    rows = prefixes * s.num_children
    kv_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * param_bytes  # one token's
    # The sampler stores each prefix once and each of its K rows' new tokens apart.
    kv = kv_slot * (prefixes * path + rows * (context - path))
    experience = 4 * (context + 8) + 4 * s.thought_length
    data, fsdp, tensor = (mesh[a] for a in ("data", "fsdp", "tensor"))
    out = {"base params": per_device_bytes(params, mesh, cfg)}
    if config.sft.full_finetune:
        trained = per_device_bytes(master, mesh, cfg)
        out[f"trained copy of the params ({_dtype_name(master)})"] = trained
    out[f"LoRA adapter ({_dtype_name(adapter)})"] = per_device_bytes(adapter, mesh, cfg)
    out[f"optimizer (Adam, {_dtype_name(opt_state)})"] = per_device_bytes(opt_state, mesh, cfg)
    # Self-play samples under the run's mesh, its rows split over data x fsdp and its kv heads
    # over tensor when they divide by it (else every device holds them all, as it does k_proj
    # and v_proj).
    kv_split = tensor if cfg.num_kv_heads % tensor == 0 else 1
    out["KV cache (self-play)"] = kv / (data * fsdp * kv_split)
    out["replay buffer (one device)"] = config.rl.buffer_capacity * experience
    return out


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
            if axis not in mesh or not re.fullmatch(r"-?[0-9]+", size):
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
    for part, count, name in (
        ("q_proj/o_proj", cfg.num_heads, "query"),
        ("k_proj/v_proj and the KV cache", cfg.num_kv_heads, "kv"),
    ):
        if mesh["tensor"] > 1 and count % mesh["tensor"]:
            print(
                f"  {part}: replicated over tensor={mesh['tensor']} ({count} {name} heads do not "
                "split into whole heads per device)"
            )
    # The same run for bench/memory.py: this config, its overrides and the mesh sized here.
    same = [*args.overrides, *(f"mesh.{axis}={size}" for axis, size in mesh.items())]
    command = f"python bench/memory.py --config {shlex.quote(args.config)} --devices "
    command += f"{total_devices} " + " ".join(map(shlex.quote, same))
    print(f"activations and temporaries of the SFT step (remat, sft.loss_chunk, "
          f"sft.micro_batch_size): {command}")  # fmt: skip
    print(f"... and of the PPO step (remat, rl.loss_chunk, rl.micro_batch_size): {command} "
          "--step ppo")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
