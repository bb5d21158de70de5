"""pykvcompose: KVCompose KV-cache compression for llama.cpp through llama-cpp-python.

>>> from pykvcompose import Llama, KVComposePress
>>> llm = Llama(n_ctx=8192, kv_compress=KVComposePress(compression_ratio=0.75))
"""

from .errors import (
    CorruptStateError,
    InvalidArgumentError,
    LlamaRefusedError,
    NativeError,
    NativeMemoryError,
    SessionError,
    UnsupportedCacheError,
)
from .llama import Llama
from .models import default_model_path
from .presses import (
    PRESSES,
    BasePress,
    DecodingPress,
    KnormPress,
    KVComposePress,
    PrefillDecodingPress,
    Press,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
    parse_press_spec,
)
from .probe import Probe, ProbeKind, ProbeSpec
from .streaming import StreamPolicy

__version__ = "0.1.0"

__all__ = [
    "Llama",
    "Press",
    "BasePress",
    "KVComposePress",
    "SnapKVPress",
    "PyramidKVPress",
    "TOVAPress",
    "KnormPress",
    "StreamingLLMPress",
    "RandomPress",
    "DecodingPress",
    "PrefillDecodingPress",
    "PRESSES",
    "parse_press_spec",
    "Probe",
    "ProbeKind",
    "ProbeSpec",
    "StreamPolicy",
    "SessionError",
    "NativeError",
    "CorruptStateError",
    "UnsupportedCacheError",
    "InvalidArgumentError",
    "NativeMemoryError",
    "LlamaRefusedError",
    "default_model_path",
    "__version__",
]
