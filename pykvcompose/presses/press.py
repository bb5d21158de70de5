"""What ``kv_compress`` accepts: a press."""

from __future__ import annotations


class Press:
    """
    Base of everything ``Llama(kv_compress=...)`` accepts:
    :class:`~pykvcompose.presses.base_press.BasePress` (one scoring method: a prompt's cells scored and
    selected), :class:`~pykvcompose.presses.decoding_press.DecodingPress` (compress while generating) and
    :class:`~pykvcompose.presses.prefill_decoding_press.PrefillDecodingPress` (one of each).

    Presses score and select; when and how much a cache is compressed (prompts longer than the cache,
    long generations, a DecodingPress's interval) is decided by :mod:`pykvcompose.streaming`.
    """
