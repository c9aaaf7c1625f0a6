"""Checkpoint readers and converters: FastDeploy/Paddle and HF ERNIE-4.5 checkpoints -> jaxwint2."""

# ---- conversion to jaxwint2's runtime layout (jaxwint2/layout.py) ----
from .convert import Summary as Summary
from .convert import convert_checkpoint as convert_checkpoint

# ---- WINT2 (CCQ) encoder ----
from .encode_wint2 import encode_wint2 as encode_wint2

# ---- errors: bad input, with a one-line reason naming file and tensor ----
from .errors import CheckpointError as CheckpointError

# ---- loading the runtime tree (converted or source checkpoints) ----
from .loader import iter_checkpoint as iter_checkpoint
from .loader import load_checkpoint as load_checkpoint

# ---- writing Paddle-layout checkpoints (fixtures, demo, quantizer) ----
from .paddle_writer import write_paddle_checkpoint as write_paddle_checkpoint

# ---- bf16 -> w4w2 checkpoint quantizer (python -m jaxwint2.quantize) ----
from .quantizer import quantize_checkpoint as quantize_checkpoint

# ---- reading source checkpoints ----
from .reader import SourceCheckpoint as SourceCheckpoint
from .reader import open_checkpoint as open_checkpoint

# ---- tensor parallelism (FastDeploy's split of the runtime tree) ----
from .tp import merge_tp as merge_tp
from .tp import rank_shapes as rank_shapes
from .tp import split_tp as split_tp

# ---- Paddle weight_quantize layouts (WINT8 / WINT4) ----
from .weight_only import dequantize_weight_only as dequantize_weight_only
from .weight_only import pack_weight_only as pack_weight_only
from .weight_only import quantize_weight_only as quantize_weight_only
from .weight_only import unpack_weight_only as unpack_weight_only
