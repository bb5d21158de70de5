"""PyramidKV: SnapKV scores with a per-layer budget that shrinks with depth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base_press import check_int
from .snapkv_press import SnapKVPress


@dataclass
class PyramidKVPress(SnapKVPress):
    """
    PyramidKV: SnapKV's scores, and a pyramid of layer budgets (more tokens in lower layers).

    Based on PyramidKV (https://arxiv.org/abs/2406.02069), with the fields and the budget formula of
    NVIDIA kvpress's ``PyramidKVPress``. llama.cpp gives every layer the same number of cells, so on
    this backend the pyramid is reported (``Llama.kv_stats["layer_budgets"]``) and every layer keeps
    its top-C: the kept tokens are SnapKV's. The row stays in the benchmark to show that.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1).
    window_size : int, default=64
        Observation window (as SnapKV), also the pyramid's base.
    kernel_size : int, default=5
        Width of the average pooling applied to the scores.
    beta : int, default=20
        Steepness of the pyramid: the top layer's budget is 1/beta of the average.
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("beta", self.beta, 1)

    def layer_budgets(self, scores: np.ndarray) -> np.ndarray:
        """
        Tokens per layer in PyramidKV's allocation.

        Parameters
        ----------
        scores : np.ndarray, float32 (layers, kv_heads, tokens)

        Returns
        -------
        np.ndarray, int32 (layers,)
        """
        n_layer, _, n = scores.shape
        capacity = self.window_size + n * (1 - self.compression_ratio)
        min_num = (capacity - self.window_size) / self.beta
        max_num = (capacity - self.window_size) * 2 - min_num
        if max_num >= n - self.window_size:
            max_num = n - self.window_size
            min_num = (capacity - self.window_size) * 2 - max_num
        if not (n >= max_num >= min_num >= self.window_size):
            return np.full(n_layer, self.n_kept(n), dtype=np.int32)  # kvpress falls back to SnapKV's budget
        steps = (max_num - min_num) / (n_layer - 1) if n_layer > 1 else 0.0
        return np.array([round(max_num - layer * steps) for layer in range(n_layer)], dtype=np.int32)
