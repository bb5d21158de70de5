"""What every press shares: the compression ratio and how many cells it leaves."""

from __future__ import annotations

import numbers
from dataclasses import dataclass


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, low: float, high: float, high_inclusive: bool) -> None:
    """A real number (not a bool) in [low, high] or [low, high)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    ok = ok and low <= float(value) and (float(value) <= high if high_inclusive else float(value) < high)
    if not ok:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}{']' if high_inclusive else ')'}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass
class BasePress:
    """
    Base class of the presses: a press scores every (layer, kv head, token) of a prompt and the
    cache keeps, per (layer, kv head), its top-C tokens as C composite cells.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1) (kvpress convention: 0.75 keeps a quarter).
    """

    compression_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_number("compression_ratio", self.compression_ratio, 0.0, 1.0, high_inclusive=False)

    def selection_scores(self, scores):
        """The scores each (layer, kv head) ranks its tokens by (by default: ``scores``)."""
        return scores

    def select(self, scores, n_keep: int, forced=(), budgets=None):
        """
        The tokens each (layer, kv head) keeps.

        Parameters
        ----------
        scores : np.ndarray, float32 (layers, kv_heads, tokens)
        n_keep : int
            Cells per head (C).
        forced : sequence of int
            Tokens every head keeps.
        budgets : np.ndarray, int (layers,), optional
            The press's layer budgets when the caller has them already (presses that use them).

        Returns
        -------
        np.ndarray, int32 (layers, kv_heads, n_keep), ascending per head.
        """
        from .. import _native

        return _native.select_top(self.selection_scores(scores), n_keep, forced)

    def n_kept(self, n_tokens: int) -> int:
        """Cells kept for a context of ``n_tokens``: ``max(1, int(n_tokens * (1 - compression_ratio)))``."""
        return max(1, int(n_tokens * (1 - self.compression_ratio)))
