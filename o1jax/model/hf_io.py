"""Hugging Face Gemma2 checkpoints (safetensors only) <-> our params pytree.

`load_hf` reads one tensor at a time through safetensors' lazy slices; with a mesh, every device
reads only its own shard (`jax.make_array_from_callback`), so a 27B model never has to fit on one
host device. Torch `Linear` weights are `[out, in]`; our kernels are `[in, out]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from o1jax.model.config import Gemma2Config
from o1jax.model.lora import LoRAParams, merge
from o1jax.parallel.mesh import param_shardings

_NORMS = {
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "pre_ffw_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_IGNORED_HF_TENSORS = ("lm_head.weight",)  # tied with the embedding; some exports include it
# The weight files of either layout (single file, or shards and their index).
_WEIGHT_FILES = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: an HF directory that is not a Gemma2, or a run's orbax
    checkpoint whose state does not match the run's. The message names the culprit."""


def hf_tensor_names(cfg: Gemma2Config) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """Yields (HF name, our param path, transposed?) for every tensor of a Gemma2."""
    yield "model.embed_tokens.weight", ("embedder", "embedding"), False
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        layer = f"layer_{i}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{pre}.self_attn.{p}.weight", (layer, "attn", p, "kernel"), True
        for p in ("gate_proj", "up_proj", "down_proj"):
            yield f"{pre}.mlp.{p}.weight", (layer, "mlp", p, "kernel"), True
        for hf_norm, ours in _NORMS.items():
            yield f"{pre}.{hf_norm}.weight", (layer, ours, "scale"), False
    yield "model.norm.weight", ("final_norm", "scale"), False


def expected_shape(cfg: Gemma2Config, path: tuple[str, ...]) -> tuple[int, ...]:
    """Our shape of the param at `path`."""
    d, hd = cfg.d_model, cfg.head_dim
    leaf_parent = path[-2]
    return {
        "embedder": (cfg.vocab_size, d),
        "q_proj": (d, cfg.num_heads * hd),
        "k_proj": (d, cfg.num_kv_heads * hd),
        "v_proj": (d, cfg.num_kv_heads * hd),
        "o_proj": (cfg.num_heads * hd, d),
        "gate_proj": (d, cfg.ffn_dim),
        "up_proj": (d, cfg.ffn_dim),
        "down_proj": (cfg.ffn_dim, d),
    }.get(leaf_parent, (d,))


def _read_json(file: str):
    """The JSON value of `file`; a file that is not valid JSON is a CheckpointError naming it."""
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def read_config(path: str) -> Gemma2Config:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: model directory does not exist")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{config_file}: missing (an HF model directory needs config.json)")
    raw = _read_json(config_file)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: not a JSON object ({type(raw).__name__})")
    try:
        return Gemma2Config.from_hf(raw, source=config_file)
    except (ValueError, TypeError) as e:
        message = str(e)
        if not message.startswith(config_file):
            message = f"{config_file}: {message}"
        raise CheckpointError(message) from None


def eos_token_ids(path: str) -> tuple[int, ...]:
    """Every end-of-sequence id a model directory names, as transformers' `generate` stops on
    them: `eos_token_id` (an int or a list; Gemma2-it lists `<eos>` and `<end_of_turn>`) of
    generation_config.json, else of config.json. () when neither names one; a file that is not
    valid JSON is a CheckpointError."""
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        raw = _read_json(file)
        ids = raw.get("eos_token_id") if isinstance(raw, dict) else None
        if ids is None:
            continue
        ids = ids if isinstance(ids, list) else [ids]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CheckpointError(f"{file}: eos_token_id must be token ids, got {ids!r}")
        return tuple(dict.fromkeys(ids))
    return ()


def _weight_map(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the single-file layout or the index.

    A directory with both reads `model.safetensors`, as transformers' `from_pretrained` does:
    the two would otherwise load different weights from the same directory."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    if os.path.isfile(index_file):
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: no 'weight_map' object")
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, file)):
                raise CheckpointError(f"{index_file}: lists {file}, which is missing")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in os.listdir(path)):
        raise CheckpointError(
            f"{path}: only pickle-based weights found; o1jax loads safetensors only "
            "(convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf(path: str, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None):
    """Reads an HF Gemma2 directory into `(cfg, params)`.

    dtype: the params' dtype (float32, or bfloat16 for a frozen base).
    mesh: when given, each param is created sharded by `o1jax.parallel.mesh` rules, every device
      reading only its slice of the file.
    """
    cfg = read_config(path)
    weight_map = _weight_map(path)
    wanted = list(hf_tensor_names(cfg))
    if "model.embed_tokens.weight" not in weight_map and "embed_tokens.weight" in weight_map:
        # A base model's checkpoint (`Gemma2Model.save_pretrained`) names its tensors without
        # the "model." prefix; transformers' Gemma2ForCausalLM loads it as well.
        wanted = [(name.removeprefix("model."), *rest) for name, *rest in wanted]
    wanted_names = {name for name, _, _ in wanted}
    unexpected = sorted(set(weight_map) - wanted_names - set(_IGNORED_HF_TENSORS))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"{path}: unexpected tensors for a Gemma2 of {cfg.num_layers} layers: {shown}"
        )
    missing = [name for name in wanted_names if name not in weight_map]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor {sorted(missing)[0]} ({len(missing)} missing in all)"
        )

    np_dtype = np.dtype(dtype)
    params: dict = {}
    shapes = {}
    for _, ours, _ in wanted:
        _set(shapes, ours, jax.ShapeDtypeStruct(expected_shape(cfg, ours), np_dtype))
    shardings = param_shardings(shapes, mesh, heads=cfg) if mesh is not None else None

    with contextlib.ExitStack() as stack:
        handles = {
            file: stack.enter_context(_open_safetensors(file))
            for file in sorted(set(weight_map[n] for n in wanted_names))
        }
        for name, ours, transposed in wanted:
            file = weight_map[name]
            try:
                tensor = handles[file].get_slice(name)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None
            hf_shape = tuple(tensor.get_shape())
            want = expected_shape(cfg, ours)
            want_hf = tuple(reversed(want)) if transposed else want
            if hf_shape != want_hf:
                raise CheckpointError(
                    f"{file}: tensor {name} has shape {list(hf_shape)}, expected {list(want_hf)}"
                )

            def read(index, tensor=tensor, transposed=transposed):
                index = tuple(index)
                if transposed:
                    return np.asarray(tensor[index[::-1]]).T.astype(np_dtype)
                return np.asarray(tensor[index]).astype(np_dtype)

            if shardings is None:
                value = jnp.asarray(read((slice(None),) * len(want)))
            else:
                value = jax.make_array_from_callback(want, _get(shardings, ours), read)
            _set(params, ours, value)
    return cfg, params


def save_hf(
    path: str,
    cfg: Gemma2Config,
    params,
    lora: LoRAParams | None = None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Writes an HF Gemma2 directory (config.json + safetensors) that transformers loads.

    A LoRA adapter is merged first. Files larger than `max_shard_bytes` are split with an index.
    Each param's shape must match `cfg` (CheckpointError otherwise, before anything is written);
    weight files of an earlier checkpoint in `path` that this one does not overwrite are removed.
    """
    if lora is not None:
        params = merge(params, lora)
    # transformers loads the weights in this dtype ("auto"): the one they are saved in
    # (transformers 4.x and other readers look for it as "torch_dtype").
    dtype_name = np.dtype(jax.tree.leaves(params)[0].dtype).name
    config = cfg.to_hf() | {"dtype": dtype_name, "torch_dtype": dtype_name}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, ours, transposed in hf_tensor_names(cfg):
        value = _get(params, ours)
        want = expected_shape(cfg, ours)
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"{path}: param {'/'.join(ours)} (tensor {name}) has shape {list(value.shape)}, "
                f"but the config expects {list(want)}"
            )
        array = np.asarray(jax.device_get(value))
        array = np.ascontiguousarray(array.T if transposed else array)
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    os.makedirs(path, exist_ok=True)
    if len(shards) == 1:
        written = {"model.safetensors"}
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        written = {"model.safetensors.index.json"}
        weight_map = {}
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            written.add(file)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    for file in os.listdir(path):  # a stale index or shard would shadow the new weights
        if _WEIGHT_FILES.fullmatch(file) and file not in written:
            os.remove(os.path.join(path, file))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


@contextlib.contextmanager
def _open_safetensors(file: str):
    """`safe_open(file)`, raising CheckpointError naming the file when it cannot be read."""
    try:
        handle = safe_open(file, framework="np")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    with handle as f:
        yield f


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree
