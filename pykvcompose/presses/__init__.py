"""Presses: one compression method per dataclass."""

from .base_press import BasePress
from .decoding_press import DecodingPress
from .knorm_press import KnormPress
from .kvcompose_press import KVComposePress
from .prefill_decoding_press import PrefillDecodingPress
from .press import Press
from .pyramidkv_press import PyramidKVPress
from .random_press import RandomPress
from .snapkv_press import SnapKVPress
from .streaming_llm_press import StreamingLLMPress
from .tova_press import TOVAPress

#: Command-line names of the presses (``NAME:RATIO[,key=value...]``).
PRESSES = {
    "kvcompose": KVComposePress,
    "snapkv": SnapKVPress,
    "pyramidkv": PyramidKVPress,
    "tova": TOVAPress,
    "knorm": KnormPress,
    "streaming_llm": StreamingLLMPress,
    "random": RandomPress,
}

from .spec import parse_press_spec  # noqa: E402  (uses PRESSES)

__all__ = [
    "parse_press_spec",
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
]
