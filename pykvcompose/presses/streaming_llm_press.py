"""StreamingLLM: keep the first tokens (attention sinks) and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..probe import Probe
from .base_press import SINK_TOKENS, BasePress, check_int


@dataclass
class StreamingLLMPress(BasePress):
    """
    StreamingLLM: keep ``n_sink`` initial tokens and the most recent ones, drop the middle.

    Based on StreamingLLM (https://arxiv.org/abs/2309.17453), as NVIDIA kvpress's ``StreamingLLMPress``
    (kept tokens keep their original positions; no re-rotation). Needs no probe.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1).
    n_sink : int, default=4
        Initial tokens always kept.
    """

    n_sink: int = SINK_TOKENS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_sink", self.n_sink, 0)

    def score(self, probe: Probe) -> np.ndarray:
        """
        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens)
            1 for the sinks and the last ``n_kept - n_sink`` tokens, 0 for the pruned middle.
        """
        n = probe.n_tokens
        n_pruned = n - self.n_kept(n)
        scores = np.ones((probe.n_layer, probe.n_head_kv, n), dtype=np.float32)
        scores[..., self.n_sink : self.n_sink + n_pruned] = 0
        return scores
