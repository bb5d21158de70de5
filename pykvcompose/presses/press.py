"""What the Llama asks of anything given as ``kv_compress``: the policy of when and with what to compress."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    from .base_press import BasePress

#: The generation phase a compression happens in: while the prompt is read, or while tokens are generated.
PHASES = ("prefill", "decode")


class Press:
    """
    The interface every press offers the Llama, so that the Llama decides nothing by press type.

    :class:`~pykvcompose.presses.base_press.BasePress` (one scoring method),
    :class:`~pykvcompose.presses.decoding_press.DecodingPress` (compress while generating) and
    :class:`~pykvcompose.presses.prefill_decoding_press.PrefillDecodingPress` (one of each) implement it.
    """

    def frees_cells(self) -> bool:
        """Whether compressing a full cache with this press frees cells (so prompts and generations
        may run past ``n_ctx``)."""
        raise NotImplementedError

    def prompt_press(self) -> Optional["BasePress"]:
        """The press applied to a whole prompt that fits into the cache (None: prompts stay as they are)."""
        return None

    def room_press(self, phase: str) -> Optional["Press"]:
        """The press that frees cells in ``phase`` ("prefill" or "decode"), None if none does."""
        return self if self.frees_cells() else None

    def scorer(self) -> "BasePress":
        """The press whose scores rank the cells when this press makes room."""
        raise NotImplementedError

    def room_plan(self, cells: int) -> Tuple["BasePress", int, int]:
        """How a compression of a full cache of ``cells`` cells goes: ``(scorer, kept cells, window)``,
        where ``window`` is how many of the newest tokens are decoded again to score the cells when no
        chunk capture saw them."""
        raise NotImplementedError

    def fills_cache(self) -> bool:
        """Whether a full cache is compressed only by as much as the next chunk needs (the Llama's
        ``kv_room="fill"``), rather than by a size of the press's own (DecodingPress: ``target_size``)."""
        return False

    def scores_chunks(self) -> bool:
        """Whether cells keep the score their chunk's reconstruct probe gave them, so a full cache is
        ranked by those persisted scores instead of re-scored by the newest tokens."""
        return False

    def decoding_due(self, phase: str, since_mark: int) -> Optional[int]:
        """Tokens until the next scheduled compression, ``since_mark`` tokens after the last one
        (None: this press compresses only when the cache is full)."""
        return None

    def room_to_free(self, cells: int) -> bool:
        """Whether a scheduled compression of ``cells`` cells would drop any."""
        return True

    def check_cache(self, n_ctx: int) -> None:
        """Refuse (ValueError) a press that cannot work with a cache of ``n_ctx`` cells."""
