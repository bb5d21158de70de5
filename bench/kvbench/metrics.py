"""Summary metrics of score-vs-ratio curves, as in the KVCompose paper."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def auc(ratios: Sequence[float], scores: Sequence[float]) -> float:
    """
    Area under a score-vs-compression-ratio curve (trapezoids), divided by the ratio span, so a
    method that keeps the full-cache score everywhere has AUC = that score.

    Parameters
    ----------
    ratios : sequence of float, strictly increasing (e.g. 0, 0.25, 0.5, 0.75, 0.875)
    scores : sequence of float, one per ratio (NaN not allowed)
    """
    r = np.asarray(ratios, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if r.shape != s.shape or r.ndim != 1 or r.size < 2:
        raise ValueError("auc needs at least two (ratio, score) points of equal count")
    if np.any(np.diff(r) <= 0):
        raise ValueError("ratios must be strictly increasing")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    area = float(np.sum((r[1:] - r[:-1]) * (s[1:] + s[:-1]) / 2))
    return area / float(r[-1] - r[0])


def max_ratio_within(
    ratios: Sequence[float],
    scores: Sequence[float],
    full: float,
    tolerance: float = 0.10,
    higher_is_better: bool = True,
) -> Optional[float]:
    """
    The largest ratio whose score stays within ``tolerance`` (relative) of the full cache's, such
    that every smaller ratio does too; None if even the smallest ratio does not.

    ``higher_is_better=False`` for losses such as perplexity: within means ``score <= full * (1 + tol)``.
    """
    best = None
    for ratio, score in sorted(zip(ratios, scores)):
        ok = score >= full * (1 - tolerance) if higher_is_better else score <= full * (1 + tolerance)
        if not ok:
            break
        best = float(ratio)
    return best


def perplexity(logits: np.ndarray, targets: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of ``targets[i]`` under row ``logits[i]`` (float64 log-softmax)."""
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != t.size or t.size == 0:
        raise ValueError("logits must be (tokens, vocab) with one target per row")
    nll = -log_softmax(x)[np.arange(t.size), t]
    return float(np.exp(nll.mean()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (tokens, vocab) logits, float64, shifted by each row's maximum."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per row: KL(P || Q) of the softmax distributions of ``reference`` (P, the full cache) and ``logits`` (Q),
    in nats, and whether both put their maximum on the same token (``llama-perplexity --kl-divergence``'s
    "same top p"). Both (tokens, vocab); computed in float64."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(logits, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"logits must be two (tokens, vocab) arrays of one shape, got {p.shape} and {q.shape}")
    log_p, log_q = log_softmax(p), log_softmax(q)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return np.maximum(kl, 0.0), p.argmax(axis=1) == q.argmax(axis=1)
