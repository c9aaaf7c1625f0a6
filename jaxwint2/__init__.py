"""jaxwint2: 2-bit ERNIE-4.5 MoE inference in JAX."""

# ---- configuration and runtime layout ----
from .config import ErnieConfig as ErnieConfig
from .config import QuantConfig as QuantConfig
