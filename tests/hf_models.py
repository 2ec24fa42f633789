"""Random tiny Gemma2 models built in Hugging Face transformers (PyTorch, CPU) for parity tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Gemma2Config as HFGemma2Config
from transformers import Gemma2ForCausalLM

# Three configs that exercise what differs between Gemma2 sizes: GQA groups 1/2/4,
# query_pre_attn_scalar != head_dim, windows shorter than the test sequences.
PARITY_CONFIGS = {
    "gqa2_qpas24": dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=5,
    ),
    "gqa4_qpas144": dict(
        vocab_size=131,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=12,
        query_pre_attn_scalar=144,
        sliding_window=7,
    ),
    "mha_window3": dict(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=16,
        sliding_window=3,
    ),
}


def build_hf_model(name: str, seed: int = 0) -> Gemma2ForCausalLM:
    """A random HF Gemma2 (norm weights randomised too, so (1 + w) is really exercised)."""
    torch.manual_seed(seed)
    cfg = HFGemma2Config(
        **PARITY_CONFIGS[name], max_position_embeddings=256, attn_implementation="eager"
    )
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()
