"""TOVA: keep what the last token attends to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..probe import Probe, ProbeKind, ProbeSpec
from .base_press import BasePress
from .snapkv_press import keep_window


@dataclass
class TOVAPress(BasePress):
    """
    TOVA: the attention of the prompt's last token, averaged over all heads of a layer (so every kv
    head of a layer ranks alike); the last token is always kept.

    Based on TOVA (https://arxiv.org/abs/2401.06104), as NVIDIA kvpress's ``TOVAPress``.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1).
    """

    def probe(self) -> ProbeSpec:
        return ProbeSpec(ProbeKind.WINDOW, 1)

    def head_scores(self, probe: Probe) -> np.ndarray:
        """Attention of the last token, float32 (layers, heads, tokens)."""
        return probe.head_scores(self.probe(), "mean")

    def score(self, probe: Probe) -> np.ndarray:
        """
        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens)
        """
        attention = self.head_scores(probe)[..., :-1]
        scores = np.repeat(attention.mean(axis=1, keepdims=True), probe.n_head_kv, axis=1)
        return keep_window(scores, 1)
