"""Per-device memory of one SFT or PPO step of a config, from XLA's analysis of the compiled step.

    python bench/memory.py --config configs/gemma2-2b.yaml --devices 8 [--layers 2,3,4] [key=value]
    python bench/memory.py --config configs/gemma2-2b.yaml --devices 8 --step ppo
    python bench/memory.py --config configs/gemma2-2b.yaml --devices 8 --step sample

Nothing is allocated and no weights are read: the step (`o1jax.train.sft.compile_step`) is lowered
with abstract inputs and compiled, and `compiled.memory_analysis()` gives the bytes one device
needs: its temporaries (activations, logits, gradients), its arguments (the frozen base, the
trained params or adapter, Adam's moments, the batch) and its outputs, less the donated state.

The model is the config's: its preset's geometry (or `model_dir`'s config.json) with the
vocabulary grown by `--extra-vocab` long-CoT tokens, `model.dtype` for the base, a LoRA adapter
(`lora`) or a full fine-tune (`sft.full_finetune`), `sft.batch_size` x `sft.seq_len` rows on the
config's mesh laid over `--devices` devices (fake host devices on this CPU). Each of `--layers`
is compiled twice: "before", without the memory knobs (no remat, `sft.loss_chunk` 0,
`sft.micro_batch_size` 0), and "after", with the config's (`model.remat`, `sft.loss_chunk`,
`sft.micro_batch_size`). From two layer counts or more the cost per layer (the largest step
between consecutive counts) is extrapolated to the model's depth.

`--step ppo` compiles `o1jax.rl.ppo.ppo_epochs` instead: `rl.epochs` updates of the RL adapter
on `rl.batch_size` experiences of the width self-play gives them (`experience_width`: the
prompt, `search.max_depth` thoughts of `search.thought_length` tokens with their step headers
and ratings, then one more thought; `--prompt-width` and `--step-tokens` stand in for what the
tokenizer decides), with the PPO settings of the `rl` section. "before" is without remat,
with the thought logits unembedded at once and without micro-batches, "after" with
`model.remat`, `rl.loss_chunk` and `rl.micro_batch_size` (PPO unembeds only the thought and
rating positions).

`--step sample` compiles the sampler call of one self-play expansion (`o1jax.model.sampler`'s
jitted program, as `mcts.make_lm_expand_fn` calls it): `rl.problems_per_iteration` x
`search.leaves_per_tree` leaves' prefixes at their widest (the prompt and `search.max_depth`
thoughts), each prefilled once and continued by `search.num_children` samples of
`search.thought_length` tokens, then rated, with the RL adapter applied on the fly. Its KV cache
holds every prefix and sample. Remat, chunks and micro-batches do not apply: one program is
compiled.

The numbers are XLA CPU's buffer assignment for the partitioned program of one device (with
remat's optimization barriers kept to the scheduler, see `main`); a GPU's compiler fuses and
lays out differently, and its allocator fragments: leave headroom. The CPU also computes
bfloat16 matmuls through float32 copies of their operands (2.2 GiB for Gemma2-2B's gathered
embedding) that a GPU does not make, so bfloat16 models measure somewhat high.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from itertools import pairwise


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a run config, e.g. configs/gemma2-2b.yaml")
    parser.add_argument("--devices", type=int, default=1, help="devices the mesh spans (default 1)")
    parser.add_argument(
        "--layers",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[2, 3, 4],
        help="decoder layer counts to compile, comma-separated (default 2,3,4)",
    )
    parser.add_argument(
        "--extra-vocab", type=int, default=16, help="tokens added to the preset's vocabulary"
    )
    parser.add_argument(
        "--only", choices=("before", "after"), default=None, help="compile one of the two"
    )
    parser.add_argument(
        "--step", choices=("sft", "ppo", "sample"), default="sft", help="the step to compile"
    )
    parser.add_argument(
        "--prompt-width", type=int, default=256, help="ppo, sample: tokens of a self-play prompt"
    )
    parser.add_argument(
        "--step-tokens",
        type=int,
        default=12,
        help="ppo, sample: tokens a thought's header and rating add to it (the tokenizer's; "
        "default 12)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. sft.micro_batch_size=16"
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or min(args.layers) < 1:
        parser.error("--devices and --layers must be >= 1")
    if args.prompt_width < 1 or args.step_tokens < 0:
        parser.error("--prompt-width must be >= 1 and --step-tokens >= 0")
    return args


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Before JAX starts: the fake devices, on the CPU. XLA's CPU pipeline drops the optimization
    # barriers of `jax.checkpoint` before it schedules (its cse_barrier_expander pass) and then
    # computes every rematerialised layer during the forward pass, so a remat step would measure
    # as much as one without; keeping the barriers, as a GPU compile does, measures remat.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={args.devices}"
        " --xla_disable_hlo_passes=cse_barrier_expander"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp

    from o1jax.model import Gemma2Config, init_params, lora
    from o1jax.parallel.mesh import batch_sharding, make_mesh, param_shardings, replicated
    from o1jax.train.config import ConfigError, load_config
    from o1jax.train.run_context import lora_config, tiny_model_config
    from o1jax.train.sft import (
        SFTState,
        check_micro_batch,
        compile_step,
        make_optimizer,
        master_dtypes,
    )
    from o1jax.train.sft_stage import trainer_config

    try:
        config = load_config(args.config, args.overrides)
        m = config.mesh
        mesh = make_mesh(
            {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor},
            devices=jax.devices()[: args.devices],
        )
        s = config.sft
        if args.step == "sft":
            check_micro_batch(trainer_config(config), mesh)
        elif args.step == "ppo":
            for key in ("batch_size", "micro_batch_size"):
                size = getattr(config.rl, key)
                if size % (mesh.shape["data"] * mesh.shape["fsdp"]):
                    raise ValueError(
                        f"rl.{key} {size} is not a multiple of data x fsdp = "
                        f"{mesh.shape['data'] * mesh.shape['fsdp']}"
                    )
        if config.model_dir:
            from o1jax.model.hf_io import read_config

            base = read_config(config.model_dir)
        elif config.model.preset == "tiny":
            base = tiny_model_config(config, 512)
        else:
            base = Gemma2Config.preset(config.model.preset)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = base.replace(
        vocab_size=base.vocab_size + args.extra_vocab, attention_impl=config.model.attention_impl
    )
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    use_lora = args.step != "sft" or not s.full_finetune
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    q = config.search
    per_thought = args.step_tokens + q.thought_length
    if args.step == "sft":
        rows_total, width = s.batch_size, s.seq_len
    elif args.step == "ppo":
        rows_total = config.rl.batch_size
        width = args.prompt_width + q.max_depth * per_thought + per_thought + 1
    else:  # the widest prefix a leaf can have (`StepFormat.max_prefix_length`)
        rows_total = config.rl.problems_per_iteration * q.leaves_per_tree
        width = args.prompt_width + q.max_depth * per_thought + args.step_tokens
    print(
        f"{args.config}: {args.step} step; {base.num_layers} layers, d_model {base.d_model}, "
        f"vocab {base.vocab_size}, {config.model.dtype} base, "
        f"{'LoRA r' + str(config.lora.rank) if use_lora else 'full fine-tune'}; batch "
        f"{rows_total} x {width} on mesh {dict(mesh.shape)} ({args.devices} devices): "
        f"{rows_total // shards} rows per device",
        flush=True,
    )
    key = jax.random.key(0)
    on_mesh = lambda tree: jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        tree,
        param_shardings(tree, mesh, heads=base),
    )
    row_struct = lambda shape, dt: jax.ShapeDtypeStruct(
        shape, dt, sharding=batch_sharding(mesh, len(shape))
    )
    step_struct = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))

    def sft_program(cfg, params, loss_chunk: int, micro: int):
        sft_config = dataclasses.replace(
            trainer_config(config), loss_chunk=loss_chunk, micro_batch_size=micro
        )
        optimizer = make_optimizer(sft_config)
        master_of = master_dtypes(params, use_lora)  # as SFTTrainer
        if use_lora:
            trainable = jax.eval_shape(lambda k: lora.init(cfg, k, lora_config(config)), key)
            frozen = on_mesh(params)
        else:  # a float32 master copy of params that are not all float32
            trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
            frozen = None
        opt_state = jax.eval_shape(optimizer.init, trainable)
        state = SFTState(on_mesh(trainable), on_mesh(opt_state), step_struct)
        batch = {
            k: row_struct((rows_total, width), dt)
            for k, dt in (
                ("tokens", jnp.int32),
                ("loss_mask", jnp.bool_),
                ("segment_ids", jnp.int32),
                ("positions", jnp.int32),
            )
        }
        step = compile_step(cfg, sft_config, optimizer, use_lora, master_of)
        return step.lower(state, frozen, batch)

    def ppo_program(cfg, params, loss_chunk: int, micro: int):
        from o1jax.rl.experience import Experience
        from o1jax.rl.ppo import TrainState, ppo_epochs
        from o1jax.rl.ppo import make_optimizer as ppo_optimizer
        from o1jax.train.run_context import ppo_config

        ppo = dataclasses.replace(ppo_config(config), loss_chunk=loss_chunk, micro_batch_size=micro)
        optimizer = ppo_optimizer(ppo)
        adapter = jax.eval_shape(lambda k: lora.init(cfg, k, lora_config(config)), key)
        opt_state = jax.eval_shape(optimizer.init, adapter)
        state = TrainState(on_mesh(adapter), on_mesh(opt_state), step_struct)
        m, thought = rows_total, config.search.thought_length
        batch = Experience(
            tokens=row_struct((m, width), jnp.int32),
            length=row_struct((m,), jnp.int32),
            action_start=row_struct((m,), jnp.int32),
            action_length=row_struct((m,), jnp.int32),
            behaviour_logprobs=row_struct((m, thought), jnp.float32),
            advantage=row_struct((m,), jnp.float32),
            value_target=row_struct((m,), jnp.float32),
            reward=row_struct((m,), jnp.float32),
            valid=row_struct((m,), jnp.bool_),
        )
        weights = row_struct((m,), jnp.float32)
        return ppo_epochs.lower(
            state,
            on_mesh(params),
            batch,
            weights,
            cfg=cfg,
            config=ppo,
            optimizer=optimizer,
            rating_tokens=(1, 2),
        )

    def sample_program(cfg, params):
        from o1jax.model.sampler import _generate

        adapter = jax.eval_shape(lambda k: lora.init(cfg, k, lora_config(config)), key)
        first_tokens = None  # the meta-action tags the search draws (`mcts.draw_meta_actions`)
        if q.meta_action_prob > 0:
            first_tokens = row_struct((rows_total * q.num_children,), jnp.int32)
        return _generate.lower(
            on_mesh(params),
            row_struct((rows_total, width), jnp.int32),
            row_struct((rows_total,), jnp.int32),
            key,
            on_mesh(adapter),
            first_tokens,
            cfg=cfg,
            max_new_tokens=q.thought_length,
            temperature=q.temperature,
            top_k=q.top_k,
            top_p=q.top_p,
            stop_tokens=(3,),
            num_samples=q.num_children,
            score_suffix=(4,),
            score_tokens=(5, 6),
            return_entropy=q.entropy_prior or q.varentropy_bonus > 0,
        )

    def measure(layers: int, remat: bool, loss_chunk: int, micro: int):
        cfg = base.replace(num_layers=layers, remat=remat)
        params = jax.eval_shape(lambda k: init_params(cfg, k, dtype), key)
        with jax.set_mesh(mesh):
            if args.step == "sft":
                lowered = sft_program(cfg, params, loss_chunk, micro)
            elif args.step == "ppo":
                lowered = ppo_program(cfg, params, loss_chunk, micro)
            else:
                lowered = sample_program(cfg, params)
            compiled = lowered.compile()
        a = compiled.memory_analysis()
        total = (
            a.temp_size_in_bytes
            + a.argument_size_in_bytes
            + a.output_size_in_bytes
            - a.alias_size_in_bytes
        )
        return a.temp_size_in_bytes, a.argument_size_in_bytes, total

    settings = {
        "before": (False, 0, 0),
        "after": (config.model.remat, s.loss_chunk, s.micro_batch_size),
    }
    if args.step == "ppo":
        settings["after"] = (config.model.remat, config.rl.loss_chunk, config.rl.micro_batch_size)
    elif args.step == "sample":
        settings = {"sampler": (False, 0, 0)}  # one program: nothing to turn on
    for name, (remat, chunk, micro) in settings.items():
        if args.only and name != args.only and args.step != "sample":
            continue
        knobs = f"remat {str(remat).lower()}, loss_chunk {chunk}, micro_batch_size {micro}"
        if args.step == "sample":
            knobs = f"{q.num_children} samples of {q.thought_length} tokens per prefix, rated"
        print(f"{name}: {knobs}", flush=True)
        measured = {}
        for layers in sorted(set(args.layers)):
            measured[layers] = measure(layers, remat, chunk, micro)
            temp, arg, total = measured[layers]
            print(
                f"  {layers:3d} layers:              temp {_gib(temp)}  args {_gib(arg)}  "
                f"total {_gib(total)} per device",
                flush=True,
            )
        if len(measured) >= 2 and base.num_layers not in measured:
            # XLA's heap packing is not exactly linear in the depth (a layer more can even
            # measure less): each column grows by its largest step per layer between
            # consecutive counts, from the deepest one measured.
            counts = sorted(measured)
            deepest = measured[counts[-1]]
            full = [
                deepest[i]
                + max(
                    max((measured[b][i] - measured[a][i]) / (b - a) for a, b in pairwise(counts)),
                    0.0,
                )
                * (base.num_layers - counts[-1])
                for i in range(3)
            ]
            print(
                f"  {base.num_layers:3d} layers (extrapolated): temp {_gib(full[0])}  args "
                f"{_gib(full[1])}  total {_gib(full[2])} per device",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
