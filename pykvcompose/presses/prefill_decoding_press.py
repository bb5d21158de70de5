"""PrefillDecodingPress: one press for the prompt, another for generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base_press import BasePress
from .decoding_press import DecodingPress
from .press import Press


@dataclass
class PrefillDecodingPress(Press):
    """
    Compress the prompt with ``prefilling_press`` and the generated tokens with ``decoding_press``.

    Based on NVIDIA kvpress's ``PrefillDecodingPress`` (same fields).

    Parameters
    ----------
    prefilling_press : BasePress, optional
        Applied to prompts (and to prompts longer than the cache, chunk by chunk).
    decoding_press : DecodingPress, optional
        Applied while tokens are generated.
    """

    prefilling_press: Optional[BasePress] = None
    decoding_press: Optional[DecodingPress] = None

    def __post_init__(self) -> None:
        if self.prefilling_press is not None and not isinstance(self.prefilling_press, BasePress):
            raise ValueError(
                f"prefilling_press must be a press such as KVComposePress(...), got {self.prefilling_press!r}"
            )
        if self.decoding_press is not None and not isinstance(self.decoding_press, DecodingPress):
            raise ValueError(f"decoding_press must be a DecodingPress, got {self.decoding_press!r}")
        if self.prefilling_press is None and self.decoding_press is None:
            raise ValueError("PrefillDecodingPress needs a prefilling_press, a decoding_press or both")
