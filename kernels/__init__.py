"""Pallas attention kernels for Gemma2: logit soft-cap, sliding windows, GQA, key mask.

    attention(q, k, v, *, causal, softcap, window, scale, mask, impl, interpret)   # [B,T,H,D]
    decode_attention(q, k, v, lengths, *, softcap, window, scale, mask, impl, interpret)

Modules: `reference` (pure JAX, the semantics), `flash` (Pallas forward + backward, Triton
style), `decode` (Pallas split-K decode), `splash` (TPU via JAX's splash attention), `tiles`
(in-kernel pieces shared by the kernels), `sharded` (the kernels under a device mesh, one
shard_map per call), `api` (validation and dispatch).
"""

from kernels.api import attention, decode_attention
from kernels.flash import BlockSizes, default_block_sizes
from kernels.reference import attention_reference, decode_attention_reference

__all__ = [
    "BlockSizes",
    "attention",
    "attention_reference",
    "decode_attention",
    "decode_attention_reference",
    "default_block_sizes",
]
