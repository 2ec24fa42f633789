"""Gemma2: parity with transformers, cached decoding, LoRA, HF I/O, sharded loading, bad input."""

import dataclasses
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from hf_models import PARITY_CONFIGS, build_hf_model, hf_logits
from safetensors.numpy import load_file, save_file

from o1jax.model import (
    CheckpointError,
    Gemma2Config,
    PositionWarning,
    forward,
    gemma2,
    init_cache,
    load_hf,
    lora,
    save_hf,
    unembed,
)
from o1jax.model.gemma2 import with_shared_prefix
from o1jax.model.hf_io import expected_shape, hf_tensor_names
from o1jax.parallel.mesh import make_mesh

SEQ = 19  # longer than every test config's sliding window


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def hf_dir(request, tmp_path_factory):
    model = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path), model


def _batch(vocab, seed=0, batch=3, seq=SEQ):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, :11] = 0
    return tokens, mask


# ----------------------------------------------------------------------------- 1. parity
def test_logits_match_transformers(hf_dir):
    path, model = hf_dir
    cfg, params = load_hf(path)
    assert cfg.num_heads // cfg.num_kv_heads == model.config.num_attention_heads // (
        model.config.num_key_value_heads
    )
    tokens, mask = _batch(cfg.vocab_size)
    ref = hf_logits(model, tokens, mask)
    ours = np.asarray(forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ref - ours)[valid].max() <= 1e-4
    # Unpadded row without a mask equals HF too.
    ours0 = np.asarray(forward(params, cfg, jnp.asarray(tokens[:1])))
    assert np.abs(hf_logits(model, tokens[:1]) - ours0).max() <= 1e-4


def test_logits_match_transformers_where_the_soft_caps_bite(tmp_path):
    """The parity configs' small weights leave tanh nearly linear. Here the weights are large
    and the caps small (attention 1.5, final 2.0): logits sit against the cap, and a cap in the
    wrong place (after the mask, on the wrong tensor) would show. Left and right padding, a
    sequence past the window."""
    import torch

    torch.manual_seed(0)
    hf_cfg = transformers.Gemma2Config(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=9,
        sliding_window=4, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.6)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(str(tmp_path))
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (1.5, 2.0)
    tokens = np.random.default_rng(0).integers(0, 61, (2, 13))
    for padded in (np.s_[1, :3], np.s_[1, -4:]):  # left, then right padding
        mask = np.ones((2, 13), np.int64)
        mask[padded] = 0
        ref = hf_logits(model, tokens, mask)
        ours = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
        valid = mask.astype(bool)
        assert np.abs(ref)[valid].max() > 1.9  # against the final cap of 2
        assert np.abs(ref - np.asarray(ours))[valid].max() <= 1e-4


def test_forward_outside_jit_compiles_once_per_shape(hf_dir):
    path, _ = hf_dir
    cfg, params = load_hf(path)
    tokens = jnp.asarray(_batch(cfg.vocab_size)[0])
    jitted = gemma2._forward  # `forward` checks its arguments, then calls this
    jitted.clear_cache()  # other tests in this process may have compiled these shapes
    first = forward(params, cfg, tokens)
    size = jitted._cache_size()
    assert size == 1
    again = forward(params, cfg, tokens)
    assert jitted._cache_size() == size  # same shapes: the compiled program is reused
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    forward(params, cfg, tokens[:, :7])
    assert jitted._cache_size() == size + 1


def test_config_round_trips_through_transformers():
    for name in ("tiny", "gemma2_2b", "gemma2_9b", "gemma2_27b"):
        cfg = Gemma2Config.preset(name)
        hf = transformers.Gemma2Config(**cfg.to_hf())
        assert Gemma2Config.from_hf(hf) == cfg
        assert Gemma2Config.from_hf(hf.to_dict()) == cfg
    assert Gemma2Config.gemma2_9b().query_pre_attn_scalar == 256  # not 224 (a known bug)
    assert Gemma2Config.gemma2_27b().query_pre_attn_scalar == 144
    assert (Gemma2Config.gemma2_2b().num_layers, Gemma2Config.gemma2_27b().ffn_dim) == (26, 36864)


def test_a_config_json_without_optional_keys_reads_as_transformers_reads_it():
    """Keys a config.json may leave out take transformers' Gemma2Config defaults (e.g.
    query_pre_attn_scalar 256 whatever head_dim is), so the model is the one HF would build."""
    d = {
        "model_type": "gemma2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    }  # fmt: skip
    ours, theirs = Gemma2Config.from_hf(d), transformers.Gemma2Config(**d)
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar == 256
    assert ours.sliding_window == theirs.sliding_window
    assert ours.attn_logit_softcapping == theirs.attn_logit_softcapping
    assert ours.final_logit_softcapping == theirs.final_logit_softcapping
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.max_position_embeddings == theirs.max_position_embeddings


def test_a_stray_hidden_act_and_a_legacy_rope_scaling_read_as_transformers_reads_them():
    """transformers' Gemma2 builds its GELU from hidden_activation alone (a hidden_act "gelu"
    is ignored), and still applies an older config.json's `rope_scaling`: one is no reason to
    refuse a checkpoint, the other must not be dropped silently."""
    d = {
        "model_type": "gemma2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    }  # fmt: skip
    stray = {**d, "hidden_act": "gelu"}
    assert transformers.Gemma2Config(**stray).hidden_activation == "gelu_pytorch_tanh"
    assert Gemma2Config.from_hf(stray) == Gemma2Config.from_hf(d)
    with pytest.raises(ValueError, match="hidden_activation 'gelu' is not supported"):
        Gemma2Config.from_hf({**d, "hidden_activation": "gelu"})  # exact GELU: not ours
    for scaling in ({"rope_type": "linear", "factor": 2.0}, {"type": "linear", "factor": 2.0}):
        legacy = {**d, "rope_theta": 10_000.0, "rope_scaling": scaling}
        assert transformers.Gemma2Config(**legacy).rope_parameters["rope_type"] == "linear"
        with pytest.raises(ValueError, match="rope_scaling of rope_type 'linear' is not supported"):
            Gemma2Config.from_hf(legacy)
    assert Gemma2Config.from_hf({**d, "rope_scaling": None}) == Gemma2Config.from_hf(d)


def test_bf16_gated_gelu_rounds_once_as_transformers_does():
    """In bfloat16 torch computes HF's gelu(gate) in float32 and rounds it once; a GELU run in
    bfloat16 (constants and every step rounded) is a bf16 ulp off on a third of the values.
    Identity kernels make the MLP output gelu(x) * x, with no matmul rounding to hide it."""
    import torch

    d = 64
    cfg = Gemma2Config.tiny(vocab_size=8, num_layers=1, d_model=d, ffn_dim=d, num_heads=1,
                            num_kv_heads=1, head_dim=8)  # fmt: skip
    x = np.linspace(-6.0, 6.0, 64 * d, dtype=np.float32).reshape(64, d)
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # exact in bf16
    eye = jnp.eye(d, dtype=jnp.bfloat16)
    params = {name: {"kernel": eye} for name in ("gate_proj", "up_proj", "down_proj")}
    ours = gemma2.MLP(cfg).apply({"params": params}, jnp.asarray(x, jnp.bfloat16), None, 0.0)
    hf = transformers.models.gemma2.modeling_gemma2.Gemma2MLP(
        transformers.Gemma2Config(**cfg.to_hf())
    ).to(torch.bfloat16)
    with torch.no_grad():
        for proj in (hf.gate_proj, hf.up_proj, hf.down_proj):
            proj.weight.copy_(torch.eye(d))
        ref = hf(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    assert ours.dtype == jnp.bfloat16
    # float32 GELUs (torch's, XLA's) differ in their last float32 bits, which can flip a
    # rounding of a tiny product; a bf16 ulp at |gelu(x) * x| ~ 36 is 0.25.
    assert np.abs(np.asarray(ours.astype(jnp.float32)) - ref).max() <= 1e-3


def test_bf16_base_runs_and_stays_close(hf_dir):
    path, _ = hf_dir
    cfg, p32 = load_hf(path)
    _, p16 = load_hf(path, dtype=jnp.bfloat16)
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    tokens, mask = _batch(cfg.vocab_size)
    l32 = forward(p32, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    l16 = forward(p16, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert l16.dtype == jnp.float32
    valid = mask.astype(bool)
    # bf16 has 8 mantissa bits; logits (capped at 30) agree to a few hundredths.
    assert np.abs(np.asarray(l16) - np.asarray(l32))[valid].max() < 0.5


# ----------------------------------------------------------------------------- 2. cache
def test_cached_decoding_equals_full_forward(hf_dir):
    path, _ = hf_dir
    cfg, params = load_hf(path)
    tokens, mask = _batch(cfg.vocab_size, seed=1)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    full = forward(params, cfg, tokens, attention_mask=mask)
    prefill = 6
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = init_cache(cfg, tokens.shape[0], SEQ + 3)
    step = jax.jit(
        lambda c, t, p, m: forward(params, cfg, t, positions=p, attention_mask=m, cache=c)
    )
    logits, cache = step(cache, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill])
    outs = [logits]
    for i in range(prefill, SEQ):  # one token at a time, well past the window
        logits, cache = step(
            cache, tokens[:, i : i + 1], positions[:, i : i + 1], mask[:, i : i + 1]
        )
        outs.append(logits)
    cached = jnp.concatenate(outs, axis=1)
    valid = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(cached) - np.asarray(full))[valid].max() <= 1e-5
    assert int(cache["index"]) == SEQ


def _random_params(cfg, seed=0):
    """Random params of `cfg`'s shapes (`init_params` compiles a program per config)."""
    rng = np.random.default_rng(seed)
    params = {}
    for _, path, _ in hf_tensor_names(cfg):
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(0.3 * rng.normal(size=expected_shape(cfg, path)), jnp.float32)
    return params


def _small_model():
    """(cfg, params) of a 2-layer model with a window of 3, random norms included."""
    cfg = Gemma2Config.tiny(
        vocab_size=64, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
        ffn_dim=64, sliding_window=3,
    )  # fmt: skip
    return cfg, _random_params(cfg)


def test_cache_default_positions_follow_each_row_and_overflow_is_refused():
    cfg, params = _small_model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(8, 64, (2, 8)))
    mask = jnp.asarray([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])  # row 1 left-padded
    full = forward(params, cfg, tokens, attention_mask=mask)
    cache = init_cache(cfg, 2, 8)
    logits, cache = forward(params, cfg, tokens[:, :6], attention_mask=mask[:, :6], cache=cache)
    outs = [logits]
    for i in (6, 7):  # default positions: each row continues from its own last token
        logits, cache = forward(
            params, cfg, tokens[:, i : i + 1], attention_mask=mask[:, i : i + 1], cache=cache
        )
        outs.append(logits)
    cached = np.asarray(jnp.concatenate(outs, axis=1))
    valid = np.asarray(mask).astype(bool)
    assert np.abs(cached - np.asarray(full))[valid].max() <= 1e-5
    np.testing.assert_array_equal(cache["positions"][1], [-1, -1, -1, 0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"writing 1 tokens at cache index 8 overflows .* 8 slots"):
        forward(params, cfg, tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match="writing 8 tokens at cache index None overflows"):
        jax.jit(lambda c: forward(params, cfg, tokens, cache=c))(init_cache(cfg, 2, 4))


def test_token_ids_outside_the_vocabulary_are_refused():
    """The embedding gather would clamp them: id V + 3 and id -1 would both read row V - 1."""
    cfg, params = _small_model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(8, 64, (2, 5)))
    for bad in (64, 67, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, 64\)"):
            forward(params, cfg, tokens.at[1, 2].set(bad))
    with pytest.raises(ValueError, match="token id 64"):  # a cached decode step too
        forward(params, cfg, np.full((2, 1), 64), cache=init_cache(cfg, 2, 4))
    forward(params, cfg, np.asarray(tokens))  # in range: numpy input is fine
    jax.jit(lambda t: forward(params, cfg, t))(tokens)  # traced tokens are not checked


def test_jitted_init_draws_the_eager_normals_to_the_bit():
    """init_params is jitted; inside one program XLA folded the 0.02 into the normal sampler's
    own constants and moved about a quarter of the draws by an ulp. `scaled_normal`, the
    kernels' initializer, keeps the eager draws inside a jitted program."""
    key = jax.random.key(3)
    shape = (128, 512)
    eager = np.asarray(jax.random.normal(key, shape) * 0.02)
    jitted = jax.jit(gemma2.scaled_normal, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(np.asarray(jitted), eager)


def test_rows_past_max_position_embeddings_draw_one_warning_per_shape():
    """RoPE runs past the trained context silently: a row (a cache's slots, a shared prefix's
    included) longer than `max_position_embeddings` draws a PositionWarning naming both
    lengths, once per compilation under jit; rows that fit draw none."""
    cfg, params = _small_model()
    cfg = dataclasses.replace(cfg, max_position_embeddings=8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(8, 64, (2, 9)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PositionWarning)
        forward(params, cfg, tokens[:, :8])
        forward(params, cfg, tokens[:, :4], cache=init_cache(cfg, 2, 8))
    with pytest.warns(PositionWarning, match="up to 9 positions .* max_position_embeddings 8"):
        forward(params, cfg, tokens)
    with pytest.warns(PositionWarning, match="up to 10 positions"):
        forward(params, cfg, tokens[:, :1], cache=init_cache(cfg, 2, 10))
    _, prefix = forward(params, cfg, tokens[:, :5], cache=init_cache(cfg, 2, 5))
    with pytest.warns(PositionWarning, match="up to 9 positions"):  # 5 shared + 4 own slots
        forward(params, cfg, tokens[:, :1], cache=with_shared_prefix(init_cache(cfg, 2, 4), prefix))
    step = jax.jit(lambda t: forward(params, cfg, t))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            step(tokens)
    assert [type(w.message) for w in caught] == [PositionWarning]  # traced once


# ----------------------------------------------------------------------------- 3. LoRA
def _random_lora(cfg, seed=0):
    lcfg = lora.LoRAConfig(rank=4, alpha=8.0)
    adapter = lora.init(cfg, jax.random.key(seed), lcfg)
    # Non-zero B so the adapter really changes the model.
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def test_lora_with_zero_b_is_exactly_the_base(hf_dir):
    path, _ = hf_dir
    cfg, params = load_hf(path)
    adapter = lora.init(cfg, jax.random.key(0), lora.LoRAConfig(rank=4, alpha=16))
    tokens, mask = _batch(cfg.vocab_size)
    base = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    with_lora = forward(
        params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), lora=adapter
    )
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))
    else:
        # On an H200 (jax 0.11.2) one case differed by 1.7e-6: XLA:GPU compiles the base's
        # matmuls differently once an adapter's dots sit beside them, so only rounding agrees.
        np.testing.assert_allclose(np.asarray(base), np.asarray(with_lora), rtol=0, atol=1e-5)


def test_lora_equals_merged_and_saves_for_transformers(hf_dir, tmp_path):
    path, _ = hf_dir
    cfg, params = load_hf(path)
    adapter = _random_lora(cfg)
    tokens, mask = _batch(cfg.vocab_size)
    tokens_j, mask_j = jnp.asarray(tokens), jnp.asarray(mask)
    with_lora = np.asarray(forward(params, cfg, tokens_j, attention_mask=mask_j, lora=adapter))
    base = np.asarray(forward(params, cfg, tokens_j, attention_mask=mask_j))
    merged = np.asarray(forward(lora.merge(params, adapter), cfg, tokens_j, attention_mask=mask_j))
    valid = mask.astype(bool)
    assert np.abs(with_lora - base)[valid].max() > 1e-3  # the adapter does something
    assert np.abs(with_lora - merged)[valid].max() <= 1e-5

    save_hf(str(tmp_path), cfg, params, lora=adapter)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert np.abs(hf_logits(hf.eval(), tokens, mask) - with_lora)[valid].max() <= 1e-4


def test_gradients_reach_only_the_lora_pytree(hf_dir):
    path, _ = hf_dir
    cfg, params = load_hf(path)
    adapter = _random_lora(cfg)
    tokens, _ = _batch(cfg.vocab_size)
    tokens = jnp.asarray(tokens)

    @jax.jit
    def loss(adapter):
        logits = forward(params, cfg, tokens[:, :-1], lora=adapter)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    opt = optax.adam(1e-2)
    opt_state = opt.init(adapter)
    base_before = jax.tree.map(np.asarray, params)
    grads = jax.jit(jax.grad(loss))(adapter)
    assert isinstance(grads, lora.LoRAParams)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    updates, opt_state = opt.update(grads, opt_state, adapter)
    new_adapter = optax.apply_updates(adapter, updates)
    assert float(loss(new_adapter)) < float(loss(adapter))
    # The optimizer state holds only adapter-shaped leaves; the base is untouched.
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state))
    assert n_opt <= 2 * lora.num_params(adapter) + 8
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, params))


def test_an_adapter_that_does_not_fit_the_params_is_refused_by_forward_and_merge():
    """forward used to drop adapter paths the model lacks (and evaluate the bare base) while
    merge raised a KeyError: both now list the paths that do not fit."""
    cfg, params = _small_model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(8, 64, (2, 5)))
    good = _random_lora(cfg)
    q = good.weights["layer_0"]["attn"]["q_proj"]
    w = lambda weights: lora.LoRAParams(weights, good.scale)
    up = good.weights["layer_1"]["mlp"]["up_proj"]
    cases = [
        (_random_lora(cfg.replace(num_layers=3)), r"layer_2/attn/k_proj \(no such kernel"),
        (w({"layer_0": {"q_proj": q}}), r"layer_0/q_proj/a \(not layer_i/group/target/a\|b\)"),
        (w({"layer_0": {"mlp": {"q_proj": q}}}), r"layer_0/mlp/q_proj \(no such kernel"),
        (w({"layer_0": {"attn": {"q_proj": {"a": q["b"], "b": q["a"]}}}}), r"a \[4, 32\]"),
        (
            w({"layer_1": {"mlp": {"up_proj": {"a": up["a"], "b": up["b"][:, :10]}}}}),
            r"layer_1/mlp/up_proj \(a \[32, 4\], b \[4, 10\] against kernel \[32, 64\]\)",
        ),
        (w({"layer_0": {"attn": {"q_proj": {"a": q["a"]}}}}), r"layer_0/attn/q_proj \(a \[32, 4\]"),
    ]
    for adapter, match in cases:
        with pytest.raises(ValueError, match="forward: the LoRA adapter does not fit.*" + match):
            forward(params, cfg, tokens, lora=adapter)
        with pytest.raises(ValueError, match="merge: the LoRA adapter does not fit.*" + match):
            lora.merge(params, adapter)
    with pytest.raises(ValueError, match="no such kernel"):  # checked when traced, too
        jax.jit(lambda a: forward(params, cfg, tokens, lora=a))(cases[0][0])
    base = np.asarray(forward(params, cfg, tokens))
    assert np.abs(np.asarray(forward(params, cfg, tokens, lora=good)) - base).max() > 1e-3


# ----------------------------------------------------------------------------- 4. mesh
def test_load_on_a_mesh_of_8_devices_shards_and_matches(hf_dir):
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    path, _ = hf_dir
    cfg, params = load_hf(path)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    _, sharded = load_hf(path, mesh=mesh)
    emb = sharded["embedder"]["embedding"]
    assert len(emb.sharding.device_set) == 8
    q = sharded["layer_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec[0] == "fsdp" or q.sharding.spec[1] == "tensor"
    assert q.addressable_shards[0].data.size < q.size  # really split, not replicated
    tokens, mask = _batch(cfg.vocab_size)
    ref = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, t, m: forward(p, cfg, t, attention_mask=m))(
            sharded, jnp.asarray(tokens), jnp.asarray(mask)
        )
    valid = mask.astype(bool)
    assert np.abs(np.asarray(out) - np.asarray(ref))[valid].max() <= 1e-5


# ----------------------------------------------------------------------------- 5. bad input
@pytest.fixture()
def good_dir(tmp_path):
    model = build_hf_model("mha_window3")
    model.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_hf(str(tmp_path / "empty"))


def test_wrong_architecture(good_dir):
    cfg_file = good_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_type"] = "llama"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'llama'"):
        load_hf(str(good_dir))


def _rewrite(good_dir, fn):
    file = good_dir / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(good_dir):
    _rewrite(good_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj"):
        load_hf(str(good_dir))


def test_unexpected_tensor(good_dir):
    _rewrite(
        good_dir, lambda t: t.__setitem__("model.layers.9.extra.weight", np.zeros(3, np.float32))
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.9\.extra"):
        load_hf(str(good_dir))


def test_shape_mismatch_names_both_shapes(good_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :-1
        ]

    _rewrite(good_dir, shrink)
    with pytest.raises(
        CheckpointError, match=r"k_proj\.weight has shape \[63, 48\], expected \[64, 48\]"
    ):
        load_hf(str(good_dir))


def test_pickle_only_checkpoint_is_refused(good_dir):
    os.remove(good_dir / "model.safetensors")
    (good_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_hf(str(good_dir))


def test_sharded_index_layout_loads(good_dir, tmp_path):
    cfg, params = load_hf(str(good_dir))
    out = tmp_path / "sharded"
    save_hf(str(out), cfg, params, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    _, again = load_hf(str(out))
    jax.tree.map(np.testing.assert_array_equal, params, again)
    # An index naming a missing shard is reported.
    shard = sorted(p for p in os.listdir(out) if p.startswith("model-"))[0]
    os.remove(out / shard)
    with pytest.raises(CheckpointError, match=f"lists {shard}, which is missing"):
        load_hf(str(out))
    shutil.rmtree(out)


def test_a_base_model_checkpoint_without_the_model_prefix_loads(tmp_path):
    """`Gemma2Model.save_pretrained` names tensors "embed_tokens.weight", "layers.0...";
    transformers' Gemma2ForCausalLM loads such a directory, and so does load_hf."""
    model = build_hf_model("mha_window3")
    model.model.save_pretrained(tmp_path / "base")
    assert "embed_tokens.weight" in load_file(tmp_path / "base" / "model.safetensors")
    cfg, params = load_hf(str(tmp_path / "base"))
    tokens, mask = _batch(cfg.vocab_size)
    ours = forward(params, cfg, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    valid = mask.astype(bool)
    assert np.abs(hf_logits(model, tokens, mask) - np.asarray(ours))[valid].max() <= 1e-4
    _rewrite(tmp_path / "base", lambda t: t.pop("layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor layers\.1\.mlp\.up_proj\.weight"):
        load_hf(str(tmp_path / "base"))


def test_tiny_scales_queries_by_its_head_dim_unless_told_otherwise():
    # The README builds Gemma2Config.tiny(head_dim=32, ...): its queries are scaled by 32**-0.5.
    assert Gemma2Config.tiny(head_dim=32).query_pre_attn_scalar == 32.0
    assert Gemma2Config.tiny().query_pre_attn_scalar == 64.0
    assert Gemma2Config.tiny(head_dim=32, query_pre_attn_scalar=24).query_pre_attn_scalar == 24


def test_hidden_states_unembed_to_the_logits_and_remat_changes_no_number():
    cfg = Gemma2Config.tiny(vocab_size=97, num_layers=2, d_model=64, head_dim=16, ffn_dim=128)
    params = gemma2.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 97)
    logits = forward(params, cfg, tokens)  # [B, T, V]
    hidden = forward(params, cfg, tokens, return_hidden=True)
    assert hidden.shape == (2, 12, 64)
    np.testing.assert_allclose(unembed(params, cfg, hidden), logits, atol=1e-6)
    some = unembed(params, cfg, hidden[:, -1], (3, 90))  # [B, 2]: two tokens' logits only
    np.testing.assert_allclose(some, logits[:, -1, [3, 90]], atol=1e-6)

    def loss(p, c):
        return jnp.sum(jax.nn.log_softmax(forward(p, c, tokens))[..., 5])

    remat = cfg.replace(remat=True)
    np.testing.assert_array_equal(forward(params, remat, tokens), logits)
    grads = jax.grad(loss)(params, cfg)
    remat_grads = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(r, g, atol=1e-5, rtol=1e-5)


def test_a_shared_prefix_cache_equals_a_copy_of_the_prefix_per_row():
    """Rows continuing shared prompts (the sampler's K samples) read each prompt's keys once
    (`with_shared_prefix`) and get the logits of rows holding their own copy of it: GQA (2 query
    heads per kv head), prompts of unequal length, chunks of 3, 1 and 2 tokens with padding in
    them, past the window of 4, then default positions."""
    cfg = Gemma2Config.tiny(
        vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
        ffn_dim=64, sliding_window=4,
    )  # fmt: skip
    params = _random_params(cfg, seed=3)
    prompts_n, width, copies, own = 2, 7, 3, 7
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(1, 64, (prompts_n, width)))
    lengths = jnp.asarray([7, 4])
    mask = jnp.arange(width)[None] < lengths[:, None]
    pos = jnp.broadcast_to(jnp.arange(width), (prompts_n, width))
    copied = init_cache(cfg, prompts_n, width + own)
    _, copied = forward(params, cfg, prompts, positions=pos, attention_mask=mask, cache=copied)
    copied = jax.tree.map(lambda x: jnp.repeat(x, copies, 0) if x.ndim else x, copied)
    prefix = init_cache(cfg, prompts_n, width)
    _, prefix = forward(params, cfg, prompts, positions=pos, attention_mask=mask, cache=prefix)
    shared = with_shared_prefix(init_cache(cfg, prompts_n * copies, own), prefix)
    start = jnp.repeat(lengths, copies)[:, None]  # [R, 1]
    done = 0
    for t in (3, 1, 2):
        tokens = jnp.asarray(rng.integers(1, 64, (prompts_n * copies, t)))
        positions = start + done + jnp.arange(t)[None]
        keep = jnp.asarray(rng.random(tokens.shape) > 0.2)
        a, copied = forward(
            params, cfg, tokens, positions=positions, attention_mask=keep, cache=copied
        )
        b, shared = forward(
            params, cfg, tokens, positions=positions, attention_mask=keep, cache=shared
        )
        np.testing.assert_allclose(b, a, atol=1e-5)
        assert float(jnp.max(jnp.abs(a))) > 0.1
        done += t
    assert shared["prefix"]["layer_0"]["k"].shape[0] == prompts_n  # never copied
    tokens = jnp.asarray(rng.integers(1, 64, (prompts_n * copies, 1)))
    np.testing.assert_allclose(
        forward(params, cfg, tokens, cache=shared)[0],
        forward(params, cfg, tokens, cache=copied)[0],
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="5 cache rows do not split into 2 groups"):
        with_shared_prefix(init_cache(cfg, 5, own), prefix)
