"""jaxwint2: 2-bit ERNIE-4.5 MoE inference in JAX."""
# ruff: noqa: I001  (imports are grouped under banners, not sorted as one block)

# ---- configuration and runtime layout ----
from .config import ErnieConfig as ErnieConfig
from .config import QuantConfig as QuantConfig

# ---- the model ----
from .formats import WeightFormat as WeightFormat
from .kv_cache import KVCache as KVCache
from .load import load as load
from .model import ErnieForCausalLM as ErnieForCausalLM

# ---- generation ----
from .generate import generate as generate
from .llm import LLM as LLM
from .llm import CompletionOutput as CompletionOutput
from .llm import RequestOutput as RequestOutput
from .sampling import SamplingParams as SamplingParams
from .tokenizer import Tokenizer as Tokenizer
