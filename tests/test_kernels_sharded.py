"""Pallas attention under a mesh (8 host devices, interpret mode): one kernel call per device on
its own rows and heads (kernels/sharded.py), equal to the unsharded reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import api, flash
from o1jax.model import Gemma2Config, forward, init_params
from o1jax.parallel.mesh import make_mesh, shard_batch, shard_params

T, D = 16, 16
# (mesh shape, B, H, K): rows over data; rows x heads (kv heads split too); rows x heads with
# fewer kv heads than tensor shards (k/v whole on every device, each picks its kv head: 0,0,1,1)
MESHES = {
    "data": ({"data": 8}, 8, 2, 1),
    "data_x_tensor": ({"data": 4, "tensor": 2}, 4, 4, 2),
    "data_x_tensor_shared_kv_heads": ({"fsdp": 2, "tensor": 4}, 2, 8, 2),
}
KW = dict(softcap=5.0, window=6)


def _inputs(b, h, kv_heads):
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, T, h, D))
    k = jax.random.normal(kk, (b, T, kv_heads, D))
    v = jax.random.normal(kv, (b, T, kv_heads, D))
    mask = jnp.ones((b, T), bool).at[0, :5].set(False).at[-1, :9].set(False)  # left padding
    cot = jax.random.normal(kc, (b, T, h, D))
    return q, k, v, mask, cot


def _pallas(q, k, v, mask):
    return kernels.attention(q, k, v, mask=mask, impl="pallas", interpret=True, **KW)


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_forward_and_grads_equal_reference(name):
    shape, b, h, kv_heads = MESHES[name]
    q, k, v, mask, cot = _inputs(b, h, kv_heads)

    def value_and_grads(attn, q, k, v, mask):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, mask), q, k, v)
        return out, vjp(cot)

    reference = lambda q, k, v, m: kernels.attention_reference(q, k, v, mask=m, **KW)
    ref = value_and_grads(reference, q, k, v, mask)
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        args = shard_batch((q, k, v, mask), mesh)
        got = jax.jit(functools.partial(value_and_grads, _pallas))(*args)
    leaves = zip(("out", "dq", "dk", "dv"), jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
    for what, r, g in leaves:
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5, err_msg=f"{name}: {what}")


def _segments(b):
    """Packed rows [B, T]: row r holds documents split at r % 5 + 3 and 11 - r % 3, then padding
    (id 0, like sft.pack)."""
    seg = np.zeros((b, T), np.int32)
    for r in range(b):
        cut1, cut2 = r % 5 + 3, 11 - r % 3
        seg[r, :cut1], seg[r, cut1:cut2], seg[r, cut2 : T - 2] = 1, 2, 3
    return jnp.asarray(seg)


@pytest.mark.parametrize("name", ["data", "data_x_tensor"])
def test_sharded_segment_ids_equal_reference(monkeypatch, name):
    """Segment ids are split over rows like the mask: out and dq/dk/dv equal the reference."""
    seen = []
    kernel = flash.flash_attention

    def spy(q, k, v, mask, **kw):  # the per-device call: its rows of the ids
        seen.append(kw["segment_ids"].shape)
        return kernel(q, k, v, mask, **kw)

    monkeypatch.setattr(flash, "flash_attention", spy)
    api._attention.clear_cache()
    shape, b, h, kv_heads = MESHES[name]
    q, k, v, mask, cot = _inputs(b, h, kv_heads)
    seg = _segments(b)
    mask = mask & (seg > 0)

    def value_and_grads(attn, q, k, v, mask, seg):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, mask, seg), q, k, v)
        return out, vjp(cot)

    reference = lambda q, k, v, m, s: kernels.attention_reference(
        q, k, v, mask=m, segment_ids=s, **KW
    )
    pallas = lambda q, k, v, m, s: kernels.attention(
        q, k, v, mask=m, segment_ids=s, impl="pallas", interpret=True, **KW
    )
    ref = value_and_grads(reference, q, k, v, mask, seg)
    unpacked = kernels.attention_reference(q, k, v, mask=mask, **KW)
    assert np.abs(np.asarray(unpacked) - np.asarray(ref[0])).max() > 0.1  # the ids matter
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        args = shard_batch((q, k, v, mask, seg), mesh)
        got = jax.jit(functools.partial(value_and_grads, pallas))(*args)
    api._attention.clear_cache()
    assert seen == [(b // mesh.shape["data"], T)]  # the kernel ran on each device's rows
    leaves = zip(("out", "dq", "dk", "dv"), jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
    for what, r, g in leaves:
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5, err_msg=f"{name}: {what}")


@pytest.mark.parametrize(
    "name, q_shape, kv_shape, mask_shape",
    [
        ("data", (1, T, 2, D), (1, T, 1, D), (1, T)),
        ("data_x_tensor", (1, T, 2, D), (1, T, 1, D), (1, T)),
        ("data_x_tensor_shared_kv_heads", (1, T, 2, D), (1, T, 1, D), (1, T)),
        ("one_device", (8, T, 2, D), (8, T, 1, D), (8, T)),  # the plain call
    ],
)
def test_kernel_runs_on_per_device_shapes(monkeypatch, name, q_shape, kv_shape, mask_shape):
    seen = []

    def spy(q, k, v, mask, **kw):
        seen.append((q.shape, k.shape, mask.shape))
        return jnp.zeros_like(q)

    monkeypatch.setattr(flash, "flash_attention", spy)
    api._attention.clear_cache()  # retrace with the spy (and again after: drop its traces)
    if name == "one_device":
        mesh, b, h, kv_heads = make_mesh({}, jax.devices()[:1]), 8, 2, 1
    else:
        shape, b, h, kv_heads = MESHES[name]
        mesh = make_mesh(shape)
    q, k, v, mask, _ = _inputs(b, h, kv_heads)
    with jax.set_mesh(mesh):
        jax.jit(_pallas)(q, k, v, mask)
    api._attention.clear_cache()
    assert seen == [(q_shape, kv_shape, mask_shape)]


def _all_gathers(compiled_text: str) -> list[str]:
    return [line.strip()[:120] for line in compiled_text.splitlines() if "all-gather(" in line]


def test_no_all_gather_of_attention_inputs_under_a_data_mesh():
    """Before shard_map, XLA all-gathered q, k, v and the mask ([8, T, ...] on every device)."""
    mesh = make_mesh({"data": 8})
    q, k, v, mask, _ = _inputs(8, 2, 1)
    with jax.set_mesh(mesh):
        args = shard_batch((q, k, v, mask), mesh)
        assert not _all_gathers(jax.jit(_pallas).lower(*args).compile().as_text())


def test_model_forward_under_a_data_mesh_gathers_nothing():
    """The gemma2 "pallas" branch: params replicated, rows split, so nothing needs gathering."""
    cfg = Gemma2Config.tiny(
        vocab_size=64,
        num_layers=1,
        d_model=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        ffn_dim=64,
        sliding_window=8,
    )
    params = init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (8, T), 0, 64)
    mask = jnp.ones((8, T), bool).at[1, :5].set(False)
    mesh = make_mesh({"data": 8})
    pallas = cfg.replace(attention_impl="pallas")
    with jax.set_mesh(mesh):
        p, (tk, m) = shard_params(params, mesh), shard_batch((tokens, mask), mesh)
        step = jax.jit(lambda p, t, m: forward(p, pallas, t, attention_mask=m))
        assert not _all_gathers(step.lower(p, tk, m).compile().as_text())
        logits = step(p, tk, m)
    ref = forward(params, cfg, tokens, attention_mask=mask)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref)[valid], atol=1e-5)
