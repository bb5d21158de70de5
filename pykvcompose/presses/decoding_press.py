"""DecodingPress: keep compressing while tokens are generated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base_press import BasePress, check_int
from .press import Press


@dataclass
class DecodingPress(Press):
    """
    Compress the cache during generation: every ``compression_interval`` generated tokens the
    cache goes back to ``target_size`` cells, scored by ``base_press`` from the attention of the
    last ``hidden_states_buffer_size`` tokens. Generation therefore never stops at ``n_ctx``.

    Based on NVIDIA kvpress's ``DecodingPress`` (same fields). On llama.cpp the "buffer" is the
    newest tokens of the cache, decoded once more with the attention capture on right before a
    compression, instead of hidden states kept on the side.

    Parameters
    ----------
    base_press : BasePress
        Scores the cells; its ``compression_ratio`` is replaced by the one reaching ``target_size``.
    compression_interval : int, default=512
        Generated tokens between two compressions.
    target_size : int, default=2048
        Cells kept by a compression; must be below the context's ``n_ctx``.
    hidden_states_buffer_size : int, default=256
        Newest tokens whose attention scores the cache (presses that read attention).

    Notes
    -----
    The prompt itself is compressed only if it does not fit into the cache (to ``target_size``);
    combine with a prompt press through ``PrefillDecodingPress``.
    """

    base_press: Optional[BasePress] = None
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.base_press, BasePress):
            raise ValueError(f"DecodingPress needs a base_press such as SnapKVPress(), got {self.base_press!r}")
        check_int("compression_interval", self.compression_interval, 1)
        check_int("target_size", self.target_size, 1)
        check_int("hidden_states_buffer_size", self.hidden_states_buffer_size, 1)
