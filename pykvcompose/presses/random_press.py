"""Random: the baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..probe import Probe
from .base_press import BasePress, check_int


@dataclass
class RandomPress(BasePress):
    """
    Random scores: a baseline. Needs no probe.

    As NVIDIA kvpress's ``RandomPress``.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1).
    seed : int, optional
        Seed of the scores; the same seed keeps the same tokens. None: fresh randomness each time.
    """

    seed: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is not None:
            check_int("seed", self.seed, 0)

    def score(self, probe: Probe) -> np.ndarray:
        """
        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens), uniform in [0, 1).
        """
        rng = np.random.default_rng(self.seed)
        return rng.random((probe.n_layer, probe.n_head_kv, probe.n_tokens), dtype=np.float32)
