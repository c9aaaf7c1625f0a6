"""Pallas GPU kernels for weight-only quantized (WINT2/WINT4/WINT8) matmuls and paged decode
attention, and the bit formats.

Imports only jax and numpy: no Flax and nothing from ``jaxwint2`` (checked by a test).
"""

# ---- WINT2 bit format (exact spec) ----
# ---- weight-only quantized matmuls (runtime layout: jaxwint2/layout.py) ----
from .api import quant_expert_ffn as quant_expert_ffn
from .api import quant_grouped_matmul as quant_grouped_matmul
from .api import quant_matmul as quant_matmul
from .kernel_mosaic import available as fragments_available  # noqa: F401
from .kernel_mosaic import from_fragments as from_fragments
from .kernel_mosaic import supports as fragments_support  # noqa: F401
from .kernel_mosaic import to_fragments as to_fragments

# ---- decode attention over the paged KV cache (layout: jaxwint2/kv_cache.py) ----
from .paged_attention import paged_attention as paged_attention
from .reference import dequantize as dequantize
from .wint2 import GROUP_SIZE as GROUP_SIZE
from .wint2 import count_unfused_mismatches as count_unfused_mismatches
from .wint2 import decode_wint2 as decode_wint2
from .wint2 import dequantize_wint2 as dequantize_wint2
from .wint2 import shuffle_k as shuffle_k
from .wint2 import shuffled_k_index as shuffled_k_index
from .wint2 import unshuffle_k as unshuffle_k
