"""pykvcompose: KVCompose KV-cache compression for llama.cpp through llama-cpp-python.

>>> from pykvcompose import Llama, KVComposePress
>>> llm = Llama(n_ctx=8192, kv_compress=KVComposePress(compression_ratio=0.75))
"""

from .llama import Llama
from .models import default_model_path
from .presses import BasePress, KVComposePress

__version__ = "0.1.0"

__all__ = ["Llama", "KVComposePress", "BasePress", "default_model_path", "__version__"]
