"""LoRA adapters as their own pytree, applied inside `forward` without touching the frozen base.

    lora = init(cfg, key, LoRAConfig(rank=32, alpha=16, targets=("q_proj", "v_proj")))
    logits = forward(params, cfg, tokens, lora=lora)      # base + (alpha / rank) * x @ A @ B
    merged = merge(params, lora)                           # same logits without the adapter

`LoRAParams.weights` mirrors the base's nesting: `layer_{i}/{attn|mlp}/{target}/{a: [in, r],
b: [r, out]}`. A starts random (normal, std 1/rank), B starts at zero, so a fresh adapter leaves
the model unchanged. Only `weights` is a pytree leaf set; `scale` is static metadata, so
`jax.grad` with respect to a `LoRAParams` differentiates the factors only.

No dropout: LLaMA-O1 used dropout 0.1 on its adapters, which makes the PPO ratio differ from 1 at
the first step of an epoch for no reason; we keep the adapter deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from o1jax.model.config import Gemma2Config

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (scale = alpha / r), and which projections get adapters."""

    rank: int = 32
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self):
        if isinstance(self.targets, str):  # its letters would be read as the targets
            raise ValueError(
                f"LoRAConfig.targets must be a tuple of projection names, got {self.targets!r}"
            )
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise ValueError(f"LoRAConfig.targets: unknown {unknown}; choose from {ALL_TARGETS}")
        rank = self.rank
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {rank!r}")
        alpha = self.alpha
        real = isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(
            alpha, bool
        )
        if not (real and np.isfinite(alpha) and alpha > 0):  # 0 leaves the adapter no gradient
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {alpha!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@struct.dataclass
class LoRAParams:
    weights: dict
    scale: float = struct.field(pytree_node=False, default=1.0)


def target_shapes(cfg: Gemma2Config, target: str) -> tuple[int, int]:
    """(in, out) of a projection's kernel."""
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (cfg.d_model, q_out),
        "k_proj": (cfg.d_model, kv_out),
        "v_proj": (cfg.d_model, kv_out),
        "o_proj": (q_out, cfg.d_model),
        "gate_proj": (cfg.d_model, cfg.ffn_dim),
        "up_proj": (cfg.d_model, cfg.ffn_dim),
        "down_proj": (cfg.ffn_dim, cfg.d_model),
    }[target]


def init(cfg: Gemma2Config, key: jax.Array, lcfg: LoRAConfig, dtype=jnp.float32) -> LoRAParams:
    """A fresh adapter: A ~ normal(0, 1/r), B = 0 (so it starts as the identity on the base)."""
    weights: dict = {}
    for i in range(cfg.num_layers):
        layer = {}
        for target in lcfg.targets:
            key, sub = jax.random.split(key)
            d_in, d_out = target_shapes(cfg, target)
            a = jax.random.normal(sub, (d_in, lcfg.rank), dtype) / lcfg.rank
            b = jnp.zeros((lcfg.rank, d_out), dtype)
            group = "attn" if target in ATTN_TARGETS else "mlp"
            layer.setdefault(group, {})[target] = {"a": a, "b": b}
        weights[f"layer_{i}"] = layer
    return LoRAParams(weights=weights, scale=lcfg.scale)


def check_fits(params: dict, lora: LoRAParams, what: str = "lora") -> None:
    """Raises a ValueError listing the adapter paths that have no kernel `[in, out]` in `params`,
    or whose factors are not `a: [in, r], b: [r, out]`. Static shapes only: free under jit."""
    bad, factors = [], {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(lora.weights)[0]:
        names = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
        if len(names) != 4 or names[-1] not in ("a", "b"):
            bad.append(f"{'/'.join(names)} (not layer_i/group/target/a|b)")
        else:
            factors.setdefault(names[:3], {})[names[3]] = tuple(np.shape(leaf))
    for path, shapes in factors.items():
        kernel = params
        for name in (*path, "kernel"):
            kernel = kernel.get(name) if isinstance(kernel, Mapping) else None
        if kernel is None:
            bad.append(f"{'/'.join(path)} (no such kernel in the params)")
            continue
        d_in, d_out = np.shape(kernel)
        a, b = shapes.get("a", ()), shapes.get("b", ())
        if len(a) != 2 or len(b) != 2 or (a[0], b[1], a[1]) != (d_in, d_out, b[0]):
            got = ", ".join(f"{k} {list(v)}" for k, v in sorted(shapes.items()))
            bad.append(f"{'/'.join(path)} ({got} against kernel [{d_in}, {d_out}])")
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ValueError(
            f"{what}: the LoRA adapter does not fit the params (expected "
            f"layer_i/{{attn|mlp}}/target/{{a: [in, r], b: [r, out]}}): "
            f"{'; '.join(bad[:8])}{more}"
        )


def merge(params: dict, lora: LoRAParams) -> dict:
    """Base params with `scale * A @ B` added to every adapted kernel (a new pytree).

    An adapter that does not fit `params` raises a ValueError (see `check_fits`)."""
    check_fits(params, lora, "merge")
    merged = jax.tree.map(lambda x: x, params)  # shallow structural copy; arrays are immutable
    for layer_name, groups in lora.weights.items():
        for group, targets in groups.items():
            for target, ab in targets.items():
                node = merged[layer_name][group][target]
                kernel = node["kernel"]
                delta = lora.scale * (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32))
                node["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return merged


def num_params(lora: LoRAParams) -> int:
    return sum(x.size for x in jax.tree.leaves(lora))
