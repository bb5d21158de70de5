"""DecodingPress: keep compressing while tokens are generated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

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

    # ---- Press ----------------------------------------------------------------------------------
    def frees_cells(self) -> bool:
        return True

    def scorer(self) -> BasePress:
        return self.base_press

    def room_plan(self, cells: int) -> Tuple[BasePress, int, int]:
        """Back to ``target_size`` cells (at most ``cells - 1``), scored by ``base_press`` with the
        ratio that keeps that many, from the newest ``hidden_states_buffer_size`` tokens."""
        keep = min(self.target_size, cells - 1)
        scorer = self.base_press
        if keep >= 1:
            scorer = dataclasses.replace(scorer, compression_ratio=1.0 - keep / cells)
        return scorer, keep, self.hidden_states_buffer_size

    def decoding_due(self, phase: str, since_mark: int) -> Optional[int]:
        if phase != "decode":
            return None
        return max(0, self.compression_interval - since_mark)

    def room_to_free(self, cells: int) -> bool:
        return cells > self.target_size

    def check_cache(self, n_ctx: int) -> None:
        if self.target_size >= n_ctx - 1:
            raise ValueError(f"DecodingPress.target_size ({self.target_size}) must be below n_ctx - 1 "
                             f"({n_ctx - 1}) so that a compression frees cells")
