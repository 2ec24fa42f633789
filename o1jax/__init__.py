"""o1jax: LLaMA-O1 and LLaMA-Berry in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# On a CPU, XLA's YNNPACK dot emitter runs the small matmuls of a tiny model's decode and SFT
# steps 1.3-2.6x faster than its default (bench/RESULTS.md). XLA reads XLA_FLAGS when the first
# backend starts, so this takes effect when o1jax is imported before any JAX computation ran.
# The flag only concerns the CPU backend. Opt out with O1JAX_CPU_YNN_DOT=0.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
if _os.environ.get("O1JAX_CPU_YNN_DOT", "1") != "0" and "ynn_fusion_type" not in _os.environ.get(
    "XLA_FLAGS", ""
):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}".strip()
