"""Checkpoint readers and converters: FastDeploy/Paddle and HF ERNIE-4.5 checkpoints -> jaxwint2."""

# ---- Paddle weight_quantize layouts (WINT8 / WINT4) ----
from .weight_only import dequantize_weight_only as dequantize_weight_only
from .weight_only import pack_weight_only as pack_weight_only
from .weight_only import quantize_weight_only as quantize_weight_only
from .weight_only import unpack_weight_only as unpack_weight_only
