"""SnapKV: keep what the prompt's last tokens attend to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..probe import Probe, ProbeKind, ProbeSpec
from .base_press import BasePress, check_int


def pool_1d(scores: np.ndarray, kernel_size: int) -> np.ndarray:
    """Average pooling along the last axis, stride 1, zero padding ``kernel_size // 2`` on both sides, the
    padded zeros counted (torch's ``avg_pool1d`` defaults); an even kernel yields one column more, which is cut."""
    pad = kernel_size // 2
    n = scores.shape[-1]
    padded = np.zeros(scores.shape[:-1] + (n + 2 * pad + 1,), dtype=np.float64)
    padded[..., pad + 1 : pad + 1 + n] = scores
    csum = np.cumsum(padded, axis=-1)
    return ((csum[..., kernel_size : kernel_size + n] - csum[..., :n]) / kernel_size).astype(np.float32)


def keep_window(scores: np.ndarray, window: int) -> np.ndarray:
    """Append ``window`` columns scored above every other score of their layer, so the window is always kept."""
    top = scores.max(axis=(1, 2), keepdims=True) + 1 if scores.shape[-1] else np.ones(scores.shape[:1] + (1, 1))
    pad = np.broadcast_to(top, scores.shape[:2] + (window,)).astype(np.float32)
    return np.concatenate([scores.astype(np.float32), pad], axis=-1)


@dataclass
class SnapKVPress(BasePress):
    """
    SnapKV: the mean attention of the prompt's last ``window_size`` tokens over the earlier ones,
    smoothed by average pooling and averaged over each GQA group; the window itself is always kept.

    Based on SnapKV (https://arxiv.org/abs/2404.14469), with the fields of NVIDIA kvpress's ``SnapKVPress``.
    The window's attention is read while the prompt is prefilled: no extra pass.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1).
    window_size : int, default=64
        Observation window: the last prompt tokens whose attention scores the others.
    kernel_size : int, default=5
        Width of the average pooling applied to the scores.
    """

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window_size", self.window_size, 1)
        check_int("kernel_size", self.kernel_size, 1)

    def probe(self) -> ProbeSpec:
        return ProbeSpec(ProbeKind.WINDOW, self.window_size)

    def head_scores(self, probe: Probe) -> np.ndarray:
        """Mean attention of the window's queries, float32 (layers, heads, tokens)."""
        return probe.head_scores(self.probe(), "mean")

    def score(self, probe: Probe) -> np.ndarray:
        """
        Parameters
        ----------
        probe : Probe
            Holds the window probe's mean attention (layers, heads, tokens).

        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens)
        """
        attention = self.head_scores(probe)
        n_layer, n_head, n = attention.shape
        window = min(self.window_size, n)
        scores = pool_1d(attention[..., : n - window], self.kernel_size)
        scores = scores.reshape(n_layer, probe.n_head_kv, n_head // probe.n_head_kv, n - window).mean(axis=2)
        return keep_window(scores, window)
