"""Rewriting the cache to a selection: composite cells (through the cache tensors or a host copy of
the sequence state), llama.cpp's own token eviction, and which logical position each cell holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Tuple

import numpy as np

from . import _native
from .probe import Probe

if TYPE_CHECKING:
    from .engine import Engine


def rewrite_context(engine: Engine, selection: np.ndarray, probe: Probe) -> Dict[str, Any]:
    """Rewrite the cache's ``probe.n_tokens`` context cells into the selection's composite cells:
    from the cache tensors when the probe saw where the cells are, else through a host copy of
    the sequence state (which is also the fallback for layouts the tensor path does not read)."""
    n = probe.n_tokens
    if probe.in_place:
        try:
            result = _native.context_compose_tensors(
                engine.ctx_ptr, engine.capture, np.arange(n, dtype=np.int32), selection
            )
            return dict(result, rewrite="tensors")
        except _native.UnsupportedCacheError:
            pass  # checked before anything was written: the cache is as it was
    # restores the sequence exactly if llama.cpp refuses the rewrite
    return dict(_native.context_compose(engine.ctx_ptr, selection, expected_cells=n), rewrite="state")


def evict(engine: Engine, keep: np.ndarray, n: int) -> Dict[str, Any]:
    """Token-level eviction with llama.cpp's ``llama_memory_seq_rm``: drop every position not in ``keep``."""
    info = engine.state_info()
    if info["n_cells"] != n:
        raise RuntimeError(f"the cache holds {info['n_cells']} cells, expected the {n} of the context")
    per_cell = info["kv_bytes"] // n
    kept = np.zeros(n, dtype=bool)
    kept[keep] = True
    edges = np.flatnonzero(np.diff(np.concatenate([[1], kept.astype(np.int8), [1]])))
    for start, stop in zip(edges[::2], edges[1::2]):  # runs of dropped positions [start, stop)
        if not engine.remove(int(start), int(stop)):
            # part of the context is gone: empty the cache so the next prompt is prefilled again
            engine.remove(0)
            engine.conv.n_tokens = 0
            raise RuntimeError(f"llama_memory_seq_rm refused to remove positions [{start}, {stop})")
    return {
        "cells_before": n,
        "cells_after": int(kept.sum()),
        "kv_bytes_before": per_cell * n,
        "kv_bytes_after": per_cell * int(kept.sum()),
        "rewrite": "eviction",
    }


def rewrite_cells(engine: Engine, selection: np.ndarray, cells: int) -> Tuple[Dict[str, Any], np.ndarray]:
    """Rewrite a full cache of ``cells`` cells (composite cells and newer tokens) into the selection's
    composite cells; returns the result and the logical positions the new cells hold.

    Every press goes through composite cells here (token-level selections are the same in every
    head): eviction would leave holes that the next capture cannot map to cells."""
    result = _native.context_compose(engine.ctx_ptr, selection)
    if result["cells_before"] != cells:
        raise RuntimeError(f"the cache held {result['cells_before']} cells where {cells} were expected")
    origin = np.take_along_axis(cell_positions(engine, cells), selection, axis=-1)
    return dict(result, rewrite="state"), origin


def cell_positions(engine: Engine, cells: int) -> np.ndarray:
    """int32 (layers, kv_heads, cells): the logical position each cell holds, per head."""
    conv = engine.conv
    shape = (engine.shape.n_layer, engine.shape.n_head_kv)
    tail = np.arange(conv.compressed_len, conv.n_tokens, dtype=np.int32)
    if conv.compressed_cells == 0:
        head = np.zeros(0, dtype=np.int32)
    elif conv.origin is None:
        head = np.full(conv.compressed_cells, -1, dtype=np.int32)  # restored from a state: unknown
    else:
        head = conv.origin
    head = np.broadcast_to(head, shape + head.shape[-1:])
    positions = np.concatenate([head, np.broadcast_to(tail, shape + tail.shape)], axis=-1)
    if positions.shape[-1] != cells:
        raise RuntimeError(f"the cache holds {cells} cells, the conversation's bookkeeping {positions.shape[-1]}")
    return positions
