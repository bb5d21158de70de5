"""Independent numpy re-implementations of what the native core and the presses compute: the oracles
the tests compare against (written from the papers' and kvpress's definitions, not from our C++)."""

import numpy as np


def np_scores(head_scores, n_head_kv, agg_group, value_norms, add_mean):
    L, H, n = head_scores.shape
    g = head_scores.reshape(L, n_head_kv, H // n_head_kv, n).astype(np.float64)
    s = (g.max(axis=2) if agg_group == "max" else g.sum(axis=2) / (H // n_head_kv)).astype(np.float32)
    if value_norms is not None:
        s = (s * value_norms).astype(np.float32)
    if add_mean:
        mean = s.astype(np.float64).sum(axis=1, keepdims=True) / n_head_kv
        s = (s.astype(np.float64) + mean).astype(np.float32)
    return s


def np_layer_budgets(scores, ratio, agg_head, lower_bound):
    L, Hkv, n = scores.shape
    srt = -np.sort(-scores, axis=-1).astype(np.float64)
    comp = (srt.max(axis=1) if agg_head == "max" else srt.sum(axis=1) / Hkv).astype(np.float32)
    comp[:, :lower_bound] += np.float32(1e9)
    comp[0] = comp.max(axis=0)
    n_total = max(1, int(L * n * (1 - ratio)))
    flat = comp.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))  # value descending, then index ascending
    kept = order[:n_total] // n
    return np.maximum(np.bincount(kept, minlength=L), min(n, max(1, lower_bound)))


def np_consensus(scores, weight):
    s = scores.astype(np.float64)
    mean = s.mean(axis=-1, keepdims=True)
    z = np.where(mean > 0, s / np.where(mean > 0, mean, 1), s)
    return ((1 - weight) * z + weight * z.mean(axis=(0, 1), keepdims=True)).astype(np.float32)


def np_select(scores, n_keep, forced):
    n = scores.shape[-1]
    rows = scores.reshape(-1, n)
    out = []
    for r in rows:
        bonus = np.zeros(n, dtype=bool)
        bonus[list(forced)] = True
        order = np.lexsort((np.arange(n), -r.astype(np.float64), ~bonus))  # forced first, then score, then index
        out.append(np.sort(order[:n_keep]))
    return np.array(out, dtype=np.int32).reshape(scores.shape[:-1] + (n_keep,))


def np_pyramid_budgets(n_layer, n, ratio, window, beta):
    """PyramidKV's layer budgets as kvpress computes them: an arithmetic sequence from ``max_num`` in
    layer 0 down to ``min_num`` in the last layer around the average capacity; SnapKV's uniform
    ``n_kept`` when the context is too short for a pyramid."""
    capacity = window + n * (1 - ratio)
    lo = (capacity - window) / beta
    hi = (capacity - window) * 2 - lo
    if hi >= n - window:
        hi = n - window
        lo = (capacity - window) * 2 - hi
    if not (n >= hi >= lo >= window):
        return np.full(n_layer, max(1, int(n * (1 - ratio))), dtype=np.int32)
    return np.rint(np.linspace(hi, lo, n_layer) if n_layer > 1 else np.array([hi])).astype(np.int32)
