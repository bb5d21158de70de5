"""Knorm: keep the keys with the smallest norm."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..probe import Probe
from .base_press import BasePress


@dataclass
class KnormPress(BasePress):
    """
    Knorm: score every cached key by minus its L2 norm (low-norm keys draw attention).

    Based on "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
    (https://arxiv.org/abs/2406.11430), as NVIDIA kvpress's ``KnormPress``. Needs no probe.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1).
    """

    def score(self, probe: Probe) -> np.ndarray:
        """
        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens)
            Minus the norms of the cached keys (computed in double from the cache's own type).
        """
        return -probe.key_norms()
