"""Compression: the one path from a probe to a rewritten cache (score, allocate, select, rewrite,
record ``kv_stats``), taken by prompts, ``kv_apply``, ``compress_context`` and the compressions that
make room while a prompt or a generation streams past ``n_ctx`` (:mod:`pykvcompose.streaming`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from . import probing, rewrite
from .presses.base_press import BasePress
from .probe import Probe, ProbeKind

if TYPE_CHECKING:
    from .engine import Engine

#: ``write(selection) -> (result, positions the new cells hold, whether cells were left with holes)``
Writer = Callable[[np.ndarray], Tuple[Dict[str, Any], np.ndarray, bool]]


def compress(
    engine: Engine,
    press: BasePress,
    probe: Probe,
    n_keep: int,
    write: Writer,
    *,
    name: str,
    ratio: float,
    trigger: str,
    probe_queries: int,
    prefill_seconds: float,
    probe_seconds: float,
    consensus: float = 0.0,
    forced: Sequence[int] = (),
) -> Dict[str, Any]:
    """Score ``probe`` with ``press``, keep ``n_keep`` cells per head (``forced`` ones and the newest cell in
    every head: positions must end at it; ``consensus`` as in ``BasePress.select``), rewrite the cache with
    ``write`` and record the compression in the conversation (its ``stats`` become ``Llama.kv_stats``)."""
    conv = engine.conv
    t0 = time.perf_counter()
    forced = sorted(set(forced) | {probe.n_tokens - 1})
    scores, budgets, selection = press.compress(probe, n_keep, forced=forced, consensus=consensus)
    t_select = time.perf_counter()
    result, origin, holes = write(selection)
    t_rewrite = time.perf_counter()
    conv.compressed_len = conv.mark = conv.n_tokens
    conv.compressed_cells = int(result["cells_after"])
    conv.holes = holes
    conv.origin = conv.selection = origin

    def kept(found):  # the measured attention of the cells kept, per query head (None: nothing to carry)
        return (
            None if found is None or holes else {agg: gather_heads(found[1][agg], selection) for agg in ("max", "mean")}
        )

    # a reconstruct probe saw every token once: its attention stays with the cells (persisted chunk scores),
    # as does the most attention a streamed prompt's question gave them
    conv.cell_scores = kept(probe.measured(ProbeKind.RECONSTRUCT) or probe.measured(ProbeKind.PERSISTED))
    conv.question_scores = kept(probe.measured(ProbeKind.QUESTION))
    conv.requires_eval = True
    conv.scores = scores
    conv.head_scores = press.head_scores(probe)
    if trigger != "prompt":
        conv.compressions += 1
    conv.stats = {
        "press": name,
        "compression_ratio": float(ratio),
        "per_head": bool(press.per_head),
        "tokens": conv.n_tokens,
        "context_tokens": conv.n_tokens,
        "cells_before": int(result["cells_before"]),
        "cells_after": int(result["cells_after"]),
        "kv_bytes_before": int(result["kv_bytes_before"]),
        "kv_bytes_after": int(result["kv_bytes_after"]),
        "prefill_seconds": prefill_seconds,
        "probe_seconds": probe_seconds,
        "select_seconds": t_select - t0,
        "rewrite_seconds": t_rewrite - t_select,
        "rewrite": result["rewrite"],
        "compress_seconds": probe_seconds + (t_rewrite - t0),
        "layer_budgets": None if budgets is None else [int(b) for b in budgets],
        "probe": probe.description,
        # the press's own probe, when what was measured stood in for it (compressions that make room)
        "probe_stood_in_for": ", ".join(asked.kind.value for asked in probe.stand_ins) or None,
        "probe_queries": probe_queries,
        "trigger": trigger,
        "compressions": conv.compressions,
    }
    return conv.stats


def gather_heads(head_values: np.ndarray, selection: np.ndarray) -> np.ndarray:
    """Per-query-head values (layers, heads, cells) of the cells each kv head's ``selection``
    (layers, kv_heads, C) keeps: query head h follows kv head h // (heads // kv_heads)."""
    group = head_values.shape[1] // selection.shape[1]
    return np.ascontiguousarray(np.take_along_axis(head_values, np.repeat(selection, group, axis=1), axis=-1))


# ---- a context held in the cache as plain prefill ------------------------------------------------
def apply(engine: Engine, press: BasePress, probe: Probe) -> Dict[str, Any]:
    """Compress the context that ``probe`` measured, which the cache holds as plain prefill (``Llama.kv_apply``).

    Composite cells (``press.per_head``) are written by the native core; token-level presses are
    applied with llama.cpp's own ``llama_memory_seq_rm``, except on iSWA models, whose
    sliding-window cache that would cut."""
    engine.check_cache_layers()
    n = probe.n_tokens
    composite = press.per_head or engine.shape.iswa

    def write(selection: np.ndarray):
        result = (
            rewrite.rewrite_context(engine, selection, probe)
            if composite
            else rewrite.evict(engine, selection[0, 0], n)
        )
        return result, selection, not composite

    engine.conv.n_tokens = n  # the logical length: the next token goes to position n
    return compress(
        engine,
        press,
        probe,
        press.n_kept(n),
        write,
        name=type(press).__name__,
        ratio=press.compression_ratio,
        trigger="prompt",
        probe_queries=press.probe_queries(n),
        prefill_seconds=probe.prefill_seconds,
        probe_seconds=probe.probe_seconds,
    )


def compress_prompt(engine: Engine, press: BasePress, context: List[int]) -> Dict[str, Any]:
    """Prefill ``context`` (a prompt that fits, or ``Llama.compress_context``'s context) from an empty
    cache, score it with the press's probe, rewrite it. On failure the cache holds the plain prefill of
    the context (as if compression had been off)."""
    try:
        return apply(engine, press, probing.probe_context(engine, context, [press]))
    except BaseException:
        keep_uncompressed(engine)
        raise


def keep_uncompressed(engine: Engine) -> None:
    """After a failed compression: end the capture, drop probe cells, keep the prefilled context.

    The cache then holds exactly what a plain prefill of the first ``n_tokens`` tokens holds, so
    the conversation continues as if compression had been off.
    """
    conv = engine.conv
    engine.end_capture_quietly()
    engine.remove(conv.n_tokens)
    if conv.n_tokens > 0 and engine.pos_max() != conv.n_tokens - 1:
        # the rewrite through the cache tensors removed the sequence before llama.cpp refused it:
        # prefill the context again (same tokens, same batches: the same cache as before)
        context = conv.history()
        engine.clear()
        engine.prefill(context)
    conv.forget_compression()
    conv.requires_eval = True
