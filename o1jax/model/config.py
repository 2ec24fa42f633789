"""Gemma2 hyper-parameters: presets, and a lossless round trip with Hugging Face's config.json."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

# config.json keys a Gemma2 must give, and those that must hold positive ints (checked before
# any arithmetic on them).
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_HF_POSITIVE_INTS = (*_HF_REQUIRED, "sliding_window", "max_position_embeddings")
_POSITIVE_INTS = (
    "vocab_size",
    "num_layers",
    "d_model",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "ffn_dim",
    "sliding_window",
    "max_position_embeddings",
)


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Architecture of a Gemma2 decoder (REFERENCE.md section 2).

    Layers with an even index use a sliding window of `sliding_window` keys (a query at position
    i sees keys j with i - W < j <= i); odd layers attend globally.
    """

    vocab_size: int = 256_000
    num_layers: int = 26
    d_model: int = 2304
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    ffn_dim: int = 9216
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 4096
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    # Which attention implementation the no-cache path uses: "xla" or "pallas" (see kernels/).
    attention_impl: str = "xla"
    # Recompute each decoder layer in the backward pass instead of keeping its activations
    # (`jax.checkpoint`): a training step then holds one layer's activations, not all of them.
    remat: bool = False

    def __post_init__(self):
        for name in _POSITIVE_INTS:  # before any arithmetic on them: a clear line, not a traceback
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Gemma2Config: {name} must be a positive int, got {value!r}")
        positive_reals = {
            "query_pre_attn_scalar": self.query_pre_attn_scalar,  # queries scale by its **-0.5
            "rope_theta": self.rope_theta,
            "attn_logit_softcapping": self.attn_logit_softcapping,  # None: no soft-cap
            "final_logit_softcapping": self.final_logit_softcapping,
        }
        for name, value in positive_reals.items():
            if value is None and name.endswith("softcapping"):
                continue
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Gemma2Config: {name} must be a finite number > 0, got {value!r}")
        if not _is_real(self.rms_norm_eps) or not 0 <= self.rms_norm_eps < math.inf:
            raise ValueError(
                f"Gemma2Config: rms_norm_eps must be a finite number >= 0, got "
                f"{self.rms_norm_eps!r}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"Gemma2Config: head_dim must be even (RoPE rotates pairs of dimensions), got "
                f"{self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Gemma2Config: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.attention_impl not in ("xla", "pallas"):
            raise ValueError(
                f"Gemma2Config: attention_impl must be 'xla' or 'pallas', got "
                f"{self.attention_impl!r}"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, vocab_size: int = 512, **overrides) -> Gemma2Config:
        """A small Gemma2 for tests and benchmarks (d_model 256, 4 layers; the benchmarks' model).

        `configs/tiny.yaml` builds the default run's model (d_model 128) from it. Queries are
        scaled by head_dim**-0.5 unless `query_pre_attn_scalar` is given.
        """
        base = dict(
            vocab_size=vocab_size,
            num_layers=4,
            d_model=256,
            num_heads=4,
            num_kv_heads=1,
            head_dim=64,
            ffn_dim=1024,
            sliding_window=128,
            max_position_embeddings=1024,
        )
        base.update(overrides)
        base.setdefault("query_pre_attn_scalar", float(base["head_dim"]))
        return cls(**base)

    @classmethod
    def gemma2_2b(cls, **overrides) -> Gemma2Config:
        return cls(**overrides)

    @classmethod
    def gemma2_9b(cls, **overrides) -> Gemma2Config:
        base = dict(
            num_layers=42,
            d_model=3584,
            num_heads=16,
            num_kv_heads=8,
            head_dim=256,
            ffn_dim=14336,
            query_pre_attn_scalar=256.0,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def gemma2_27b(cls, **overrides) -> Gemma2Config:
        base = dict(
            num_layers=46,
            d_model=4608,
            num_heads=32,
            num_kv_heads=16,
            head_dim=128,
            ffn_dim=36864,
            query_pre_attn_scalar=144.0,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **overrides) -> Gemma2Config:
        """A preset by name: "tiny", "gemma2_2b", "gemma2_9b", "gemma2_27b"."""
        factories = {
            "tiny": cls.tiny,
            "gemma2_2b": cls.gemma2_2b,
            "gemma2_9b": cls.gemma2_9b,
            "gemma2_27b": cls.gemma2_27b,
        }
        if name not in factories:
            raise ValueError(f"unknown Gemma2 preset {name!r}; choose one of {sorted(factories)}")
        return factories[name](**overrides)

    # ------------------------------------------------------------------ derived
    @property
    def num_groups(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for a global layer."""
        return self.sliding_window if layer % 2 == 0 else None

    def replace(self, **changes) -> Gemma2Config:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF round trip
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | Any, source: str = "config") -> Gemma2Config:
        """Builds a config from an HF `Gemma2Config` (object or its `to_dict()`/config.json dict).

        `source` names the file in error messages. Raises ValueError for a config that is not a
        Gemma2 or whose layer pattern this implementation does not reproduce. A null pad, eos or
        bos token id falls back to Gemma's (0, 1, 2).
        """
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        model_type = d.get("model_type")
        if model_type != "gemma2":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'gemma2'")
        missing = [k for k in _HF_REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        for k in _HF_POSITIVE_INTS:
            if k in d and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] <= 0):
                raise ValueError(f"{source}: {k} must be a positive int, got {d[k]!r}")
        # transformers' Gemma2 reads only hidden_activation (a stray hidden_act, e.g. "gelu", is
        # ignored there too).
        act = d.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{source}: hidden_activation {act!r} is not supported")
        if d.get("tie_word_embeddings", True) is False:
            raise ValueError(f"{source}: untied embeddings are not Gemma2")
        n = d["num_hidden_layers"]
        layer_types = d.get("layer_types")
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        if layer_types is not None and list(layer_types) != expected:
            raise ValueError(
                f"{source}: layer_types {layer_types} differ from Gemma2's alternation "
                "(sliding on even layers, full on odd)"
            )
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10_000.0))
        # An older config.json scales RoPE by `rope_scaling`, which transformers still applies.
        for key in ("rope_parameters", "rope_scaling"):
            scaling = d.get(key) or {}
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind != "default":
                raise ValueError(f"{source}: {key} of rope_type {kind!r} is not supported")
        return cls(
            vocab_size=d["vocab_size"],
            num_layers=n,
            d_model=d["hidden_size"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d["num_key_value_heads"],
            head_dim=d["head_dim"],
            ffn_dim=d["intermediate_size"],
            # Absent from the file: transformers' Gemma2Config default, 256 (not head_dim).
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256.0)),
            sliding_window=d.get("sliding_window", 4096),
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0),
            rope_theta=float(rope_theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            pad_token_id=_or(d.get("pad_token_id"), 0),
            eos_token_id=_or(_first(d.get("eos_token_id")), 1),
            bos_token_id=_or(d.get("bos_token_id"), 2),
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that `transformers.Gemma2Config(**d)` accepts."""
        qpas = self.query_pre_attn_scalar
        return {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
            "sliding_window": self.sliding_window,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_theta": self.rope_theta,  # where transformers 4.x and other readers look
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
            "layer_types": [
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(self.num_layers)
            ],
        }


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _first(x):
    """The first of a list of token ids (Gemma2-it lists two EOS ids); None for an empty one."""
    if isinstance(x, list | tuple):
        return x[0] if x else None
    return x


def _or(x, default):
    return default if x is None else x
