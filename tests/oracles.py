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


def np_state_kv(data):
    """(n_cells, v_trans, K, V) of a single-sequence llama.cpp state with f16/f32 K and V: K[l], V[l] float64
    [n_cells, n_embd] (V un-transposed), read from the documented layout (native/src/state.h)."""
    dtypes = {0: np.float32, 1: np.float16}
    off = 12
    n_cells = int(np.frombuffer(data, np.uint32, 1, off)[0])
    off += 4
    for _ in range(n_cells):
        off += 8 + 4 * int(np.frombuffer(data, np.uint32, 1, off + 4)[0])
    v_trans, n_layer = (int(x) for x in np.frombuffer(data, np.uint32, 2, off))
    off += 8

    def rows():
        nonlocal off
        t, size = int(np.frombuffer(data, np.int32, 1, off)[0]), int(np.frombuffer(data, np.uint64, 1, off + 4)[0])
        dt = dtypes[t]
        n_embd = size // np.dtype(dt).itemsize
        a = np.frombuffer(data, dt, n_embd * n_cells, off + 12).reshape(n_cells, n_embd).astype(np.float64)
        off += 12 + size * n_cells
        return a

    K = [rows() for _ in range(n_layer)]
    V = []
    for _ in range(n_layer):
        if not v_trans:
            V.append(rows())
            continue
        t, el, n_embd = (int(x) for x in np.frombuffer(data, np.uint32, 3, off))
        V.append(
            np.frombuffer(data, dtypes[t], n_embd * n_cells, off + 12).reshape(n_embd, n_cells).T.astype(np.float64)
        )
        off += 12 + el * n_embd * n_cells
    assert off == len(data), "trailing bytes: not a single-sequence, single-cache state"
    return n_cells, bool(v_trans), K, V


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _refit_heads(K, V, selection, queries, scale):
    """Per (layer, kv head): layer, column slice, the stacked queries of the group's query heads, the kept indices,
    the attention output over all keys and the attention over the kept keys (A)."""
    L, Hkv, C = selection.shape
    for l in range(L):
        q = queries[l].astype(np.float64)
        n_q, H, D = q.shape
        group = H // Hkv
        for g in range(Hkv):
            cols = slice(g * D, (g + 1) * D)
            Q = q[:, g * group : (g + 1) * group].transpose(1, 0, 2).reshape(-1, D)
            k, v = K[l][:, cols], V[l][:, cols]
            s = selection[l, g]
            yield l, cols, s, _softmax(scale[l] * Q @ k.T) @ v, _softmax(scale[l] * Q @ k[s].T)


def np_refit_values(K, V, selection, queries, scale, ridge):
    """Attention Matching's least squares on V, per (layer, kv head): kept values [L][C, n_embd] minimising
    ||softmax(s Q K_S^T) V' - softmax(s Q K^T) V||^2 + lam ||V' - V_S||^2, lam = ridge * tr(A^T A) / C, over the
    queries of every query head of the kv head's group. K, V: [L][n, n_embd]; selection (L, Hkv, C); queries[l]:
    (n_q, H, D); scale[l]: the KQ scale."""
    C = selection.shape[-1]
    out = [np.zeros((C, K[l].shape[1])) for l in range(len(K))]
    for l, cols, s, target, A in _refit_heads(K, V, selection, queries, scale):
        G = A.T @ A
        lam = ridge * np.trace(G) / C
        out[l][:, cols] = np.linalg.solve(G + lam * np.eye(C), A.T @ target + lam * V[l][s, cols])
    return out


def np_attention_error(K, V, values, selection, queries, scale):
    """Mean squared difference, over the reference queries, between attention over all keys and attention
    over the selected keys with ``values`` [L][C, n_embd] (what the refit minimises, without the ridge)."""
    err, count = 0.0, 0
    for l, cols, _, target, A in _refit_heads(K, V, selection, queries, scale):
        got = A @ values[l][:, cols]
        err += ((got - target) ** 2).sum()
        count += got.size
    return err / count
