"""HF checkpoint I/O on a tiny random Gemma2: overwriting a checkpoint, params that do not match
the config, and damaged index, shard and config files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from o1jax.data.tokenizer import resize_embeddings
from o1jax.model import CheckpointError, Gemma2Config, load_hf, save_hf
from o1jax.model.hf_io import expected_shape, hf_tensor_names

SHARD_BYTES = 20_000  # a few tensors per shard for the model below


@pytest.fixture(scope="module")
def model():
    cfg = Gemma2Config.tiny(
        vocab_size=64, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
        ffn_dim=64,
    )  # fmt: skip
    # Random arrays of the right shapes (`init_params` compiles a program per config).
    rng = np.random.default_rng(0)
    params = {}
    for _, path, _ in hf_tensor_names(cfg):
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(rng.normal(size=expected_shape(cfg, path)), jnp.float32)
    return cfg, params


def _weight_files(path):
    return sorted(f for f in os.listdir(path) if f.startswith("model"))


def _assert_loads_as(path, params):
    _, loaded = load_hf(str(path))
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_save_hf_over_a_checkpoint_leaves_only_the_new_layout(model, tmp_path):
    cfg, params = model
    halved = jax.tree.map(lambda x: 0.5 * x, params)
    (tmp_path / "tokenizer.json").write_text("{}")  # not a weight file: kept
    save_hf(str(tmp_path), cfg, params, max_shard_bytes=SHARD_BYTES)
    shards = [f for f in _weight_files(tmp_path) if f.startswith("model-")]
    assert len(shards) > 2
    save_hf(str(tmp_path), cfg, halved)  # sharded -> single file: the index must go
    assert _weight_files(tmp_path) == ["model.safetensors"]
    _assert_loads_as(tmp_path, halved)
    save_hf(str(tmp_path), cfg, params, max_shard_bytes=SHARD_BYTES)  # single -> sharded
    assert _weight_files(tmp_path) == sorted([*shards, "model.safetensors.index.json"])
    _assert_loads_as(tmp_path, params)
    save_hf(str(tmp_path), cfg, halved, max_shard_bytes=3 * SHARD_BYTES)  # fewer shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert _weight_files(tmp_path) == sorted(
        [*set(index["weight_map"].values()), "model.safetensors.index.json"]
    )
    assert len(set(index["weight_map"].values())) < len(shards)
    _assert_loads_as(tmp_path, halved)
    assert (tmp_path / "tokenizer.json").exists()


def test_save_hf_refuses_params_that_do_not_match_the_config(model, tmp_path):
    cfg, params = model
    grown = resize_embeddings(params, 80)  # saved with the old cfg's vocab_size
    with pytest.raises(
        CheckpointError,
        match=r"embedder/embedding \(tensor model\.embed_tokens\.weight\) has shape \[80, 32\], "
        r"but the config expects \[64, 32\]",
    ):
        save_hf(str(tmp_path / "out"), cfg, grown)
    assert not (tmp_path / "out").exists()  # nothing written


def test_damaged_index_shards_and_config_name_the_file(model, tmp_path):
    cfg, params = model
    save_hf(str(tmp_path), cfg, params, max_shard_bytes=SHARD_BYTES)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())

    weight_map = index["weight_map"]
    wrong = next(f for f in set(weight_map.values()) if f != weight_map["model.norm.weight"])
    index_file.write_text(json.dumps({"weight_map": {**weight_map, "model.norm.weight": wrong}}))
    with pytest.raises(CheckpointError, match=rf"{wrong}: cannot read tensor model\.norm\.weight"):
        load_hf(str(tmp_path))

    index_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        load_hf(str(tmp_path))

    index_file.write_text(json.dumps(index))
    shard = tmp_path / weight_map["model.norm.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: not a readable safetensors file"):
        load_hf(str(tmp_path))


def test_config_json_that_is_not_an_object_or_has_a_null_pad_id(model, tmp_path):
    cfg, params = model
    save_hf(str(tmp_path), cfg, params)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps([config]))
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object \(list\)"):
        load_hf(str(tmp_path))
    config_file.write_text(json.dumps({**config, "pad_token_id": None}))
    loaded_cfg, _ = load_hf(str(tmp_path))
    assert loaded_cfg.pad_token_id == 0 and loaded_cfg == cfg


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive int, got 0"),
        ({"head_dim": None}, "head_dim must be a positive int, got None"),
        ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive int, got '2'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive int, got 0"),
        ({"sliding_window": 0}, "sliding_window must be a positive int, got 0"),
        ({"num_key_value_heads": 3}, "is not a multiple of num_kv_heads=3"),
        # a bare ZeroDivisionError while tracing, or a model that silently computes nothing
        ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a finite number > 0"),
        ({"attn_logit_softcapping": -50.0}, "attn_logit_softcapping must be a finite number"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite number >= 0, got -1e-06"),
    ],
)
def test_config_json_with_a_bad_count_is_a_checkpoint_error_naming_file_and_key(
    model, tmp_path, bad, message
):
    cfg, params = model
    save_hf(str(tmp_path), cfg, params)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **bad}))
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{message}"):
        load_hf(str(tmp_path))


def test_an_empty_eos_list_and_null_soft_caps_read_as_transformers_reads_them(model, tmp_path):
    cfg, params = model
    save_hf(str(tmp_path), cfg, params)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    edited = {**config, "eos_token_id": [], "final_logit_softcapping": None}
    config_file.write_text(json.dumps(edited))  # the empty list was an IndexError
    loaded_cfg, _ = load_hf(str(tmp_path))
    assert loaded_cfg.eos_token_id == 1 and loaded_cfg.final_logit_softcapping is None


def test_a_directory_with_both_layouts_reads_the_single_file_as_transformers_does(model, tmp_path):
    """The index used to win here while transformers' from_pretrained reads model.safetensors:
    the same directory loaded two different models."""
    cfg, params = model
    halved = jax.tree.map(lambda x: 0.5 * x, params)
    save_hf(str(tmp_path / "sharded"), cfg, params, max_shard_bytes=SHARD_BYTES)
    save_hf(str(tmp_path), cfg, halved)
    for name in os.listdir(tmp_path / "sharded"):
        if name.startswith("model"):
            os.rename(tmp_path / "sharded" / name, tmp_path / name)
    assert "model.safetensors.index.json" in _weight_files(tmp_path)
    _assert_loads_as(tmp_path, halved)
    import transformers

    hf = transformers.Gemma2ForCausalLM.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(
        hf.model.embed_tokens.weight.detach().numpy(), params["embedder"]["embedding"] * 0.5
    )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_save_hf_names_the_dtype_its_weights_are_in(model, tmp_path, dtype):
    """transformers loads a checkpoint in its config.json's dtype: float16 weights labelled
    float32 came back as a float32 model of twice the size."""
    import transformers

    cfg, params = model
    save_hf(str(tmp_path), cfg, jax.tree.map(lambda x: x.astype(dtype), params))
    name = np.dtype(dtype).name
    written = json.loads((tmp_path / "config.json").read_text())
    # both names: "dtype" for transformers 5, "torch_dtype" for 4.x and other readers (vLLM)
    assert written["dtype"] == written["torch_dtype"] == name
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == cfg.rope_theta
    hf = transformers.Gemma2ForCausalLM.from_pretrained(str(tmp_path))
    assert str(hf.dtype) == f"torch.{name}"
