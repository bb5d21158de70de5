"""What every press shares: the compression ratio and how many cells it leaves."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from ..probe import Probe, ProbeKind, ProbeSpec
from .press import Press

#: Initial tokens most heads attend to whatever they hold (StreamingLLM's attention sinks, arXiv 2309.17453):
#: StreamingLLMPress keeps this many by default, KVComposePress(self_information=True) in every head.
SINK_TOKENS = 4


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
        raise ValueError(
            f"{name} must be a number in [{low:g}, {high:g}{']' if high_inclusive else ')'}, got {value!r}"
        )


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass
class BasePress(Press):
    """
    Base class of the presses: a press scores every (layer, kv head, token) of a prompt and the
    cache keeps, per (layer, kv head), its top-C tokens as C composite cells.

    A subclass names the probe it needs (``probe``) and turns a :class:`~pykvcompose.probe.Probe`
    into scores (``score``); selection and the cache rewrite are shared.

    Parameters
    ----------
    compression_ratio : float, default=0.0
        Fraction of the prompt's KV cells removed, in [0, 1) (kvpress convention: 0.75 keeps a quarter).
    per_head : bool, default=True (keyword only)
        True: every (layer, kv head) keeps its own top-C tokens as C composite cells. False
        (token-level mode): every layer and head keeps the same C tokens, ranked by the consensus
        of the press's scores over layers and heads, and the others are removed with llama.cpp's
        own ``llama_memory_seq_rm`` - what stock llama.cpp can do without composite cells.
    """

    compression_ratio: float = 0.0
    per_head: bool = field(default=True, kw_only=True)

    #: Prompts shorter than this are not compressed (a field of presses that let users set it).
    min_tokens = 2

    def __post_init__(self) -> None:
        check_number("compression_ratio", self.compression_ratio, 0.0, 1.0, high_inclusive=False)
        check_bool("per_head", self.per_head)

    def probe(self) -> Optional[ProbeSpec]:
        """The probe this press reads attention from: None, or a window, lookahead or reconstruct
        :class:`~pykvcompose.probe.ProbeSpec`."""
        return None

    def reads_self_information(self) -> bool:
        """Whether ``score`` reads the context's self-information (``Probe.self_information``), which the
        prefill then measures from the logits of every row."""
        return False

    def probe_queries(self, n_tokens: int) -> int:
        """How many probe queries score a context of ``n_tokens`` tokens."""
        spec = self.probe()
        if spec is None:
            return 0
        return n_tokens if spec.kind is ProbeKind.RECONSTRUCT else min(spec.size, n_tokens)

    def head_scores(self, probe: Probe) -> Optional[np.ndarray]:
        """The probe attention this press scores from, float32 (layers, heads, tokens), or None."""
        return None

    def score(self, probe: Probe) -> np.ndarray:
        """
        Token scores: higher is kept first.

        Parameters
        ----------
        probe : Probe
            The context's probe attention, key and value norms.

        Returns
        -------
        np.ndarray, float32 (layers, kv_heads, tokens)
        """
        raise NotImplementedError

    def layer_budgets(self, scores: np.ndarray) -> Optional[np.ndarray]:
        """
        The press's allocation of kept tokens across layers, or None if it has none.

        llama.cpp keeps one cell count for all layers, so budgets are reported in ``kv_stats`` and
        used by presses that fill a layer's cells differently below and above its budget.

        Parameters
        ----------
        scores : np.ndarray, float32 (layers, kv_heads, tokens)

        Returns
        -------
        np.ndarray, int32 (layers,), or None
        """
        return None

    def compress(
        self, probe: Probe, n_keep: int, forced: Sequence[int] = (), consensus: float = 0.0
    ) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        """
        Score, allocate and select: everything a compression asks of the press.

        Parameters
        ----------
        probe : Probe
        n_keep : int
            Cells per head (C).
        forced : sequence of int
            Tokens every head keeps.
        consensus : float
            See ``select``.

        Returns
        -------
        scores : np.ndarray, float32 (layers, kv_heads, tokens)
        budgets : np.ndarray, int32 (layers,), or None
        selection : np.ndarray, int32 (layers, kv_heads, n_keep), ascending per head
        """
        scores = self.score(probe)
        budgets = self.layer_budgets(scores)
        return scores, budgets, self.select(scores, n_keep, forced=forced, consensus=consensus)

    def select(self, scores: np.ndarray, n_keep: int, forced: Sequence[int] = (), consensus: float = 0.0) -> np.ndarray:
        """
        The tokens each (layer, kv head) keeps.

        Parameters
        ----------
        scores : np.ndarray, float32 (layers, kv_heads, tokens)
        n_keep : int
            Cells per head (C).
        forced : sequence of int
            Tokens every head keeps.
        consensus : float, in [0, 1]
            0 (KVCompose as published) ranks by each head's own scores; 1 makes every head of every layer
            keep the same tokens, ranked by the mean of the mean-normalised head scores; in between blends
            the two. Token-level presses (``per_head=False``) always rank by the consensus.

        Returns
        -------
        np.ndarray, int32 (layers, kv_heads, n_keep), ascending per head.
        """
        from .. import _native

        weight = 1.0 if not self.per_head else float(consensus)
        if weight > 0:
            scores = _native.scores_consensus(scores, weight)
        return _native.select_top(scores, n_keep, forced)

    def n_kept(self, n_tokens: int) -> int:
        """Cells kept for a context of ``n_tokens``: ``max(1, int(n_tokens * (1 - compression_ratio)))``."""
        return max(1, int(n_tokens * (1 - self.compression_ratio)))
