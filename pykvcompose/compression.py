"""Compression: the one path from a probe to a rewritten cache (score, allocate, select, rewrite,
record ``kv_stats``), taken by prompts, ``kv_apply``, ``compress_context`` and the compressions that
make room while a prompt or a generation streams past ``n_ctx``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import probing, rewrite
from .engine import gather_heads
from .presses.base_press import BasePress
from .presses.press import Press
from .probe import Probe

if TYPE_CHECKING:
    from .engine import Engine

#: ``write(selection) -> (result, positions the new cells hold, whether cells were left with holes)``
Writer = Callable[[np.ndarray], Tuple[Dict[str, Any], np.ndarray, bool]]


def compress(engine: "Engine", press: BasePress, probe: Probe, n_keep: int, write: Writer, *, name: str,
             ratio: float, trigger: str, probe_queries: int, prefill_seconds: float,
             probe_seconds: float) -> Dict[str, Any]:
    """Score ``probe`` with ``press``, keep ``n_keep`` cells per head (the newest cell in every head:
    positions must end at it), rewrite the cache with ``write`` and record the compression in the
    conversation (its ``stats`` become ``Llama.kv_stats``)."""
    conv = engine.conv
    t0 = time.perf_counter()
    scores, budgets, selection = press.compress(probe, n_keep, forced=[probe.n_tokens - 1])
    t_select = time.perf_counter()
    result, origin, holes = write(selection)
    t_rewrite = time.perf_counter()
    conv.compressed_len = conv.mark = conv.n_tokens
    conv.compressed_cells = int(result["cells_after"])
    conv.holes = holes
    conv.origin = conv.selection = origin
    reconstruct = probe.attention.get(("reconstruct", 0))
    if reconstruct is not None and not holes:
        # the probe saw every token once: its attention stays with the cells (persisted chunk scores)
        conv.cell_scores = {agg: gather_heads(reconstruct[agg], selection) for agg in ("max", "mean")}
    else:
        conv.cell_scores = None
    asked = probe.attention.get(probe.question) if probe.question else None
    conv.question_scores = None if asked is None or holes else {
        agg: gather_heads(asked[agg], selection) for agg in ("max", "mean")}
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
        "probe_queries": probe_queries,
        "trigger": trigger,
        "compressions": conv.compressions,
    }
    return conv.stats


# ---- a context held in the cache as plain prefill ------------------------------------------------
def apply(engine: "Engine", press: BasePress, probe: Probe) -> Dict[str, Any]:
    """Compress the context that ``probe`` measured, which the cache holds as plain prefill (``Llama.kv_apply``).

    Composite cells (``press.per_head``) are written by the native core; token-level presses are
    applied with llama.cpp's own ``llama_memory_seq_rm``, except on iSWA models, whose
    sliding-window cache that would cut."""
    engine.check_cache_layers()
    n = probe.n_tokens
    composite = press.per_head or engine.shape.iswa

    def write(selection: np.ndarray):
        result = (rewrite.rewrite_context(engine, selection, probe) if composite
                  else rewrite.evict(engine, selection[0, 0], n))
        return result, selection, not composite

    engine.conv.n_tokens = n  # the logical length: the next token goes to position n
    return compress(engine, press, probe, press.n_kept(n), write, name=type(press).__name__,
                    ratio=press.compression_ratio, trigger="prompt", probe_queries=press.probe_queries(n),
                    prefill_seconds=probe.prefill_seconds, probe_seconds=probe.probe_seconds)


def compress_context(engine: "Engine", press: BasePress, context: List[int]) -> Dict[str, Any]:
    """Prefill ``context`` from an empty cache, score it with the press's probe, rewrite it. On failure
    the cache holds the plain prefill of the context (as if compression had been off)."""
    try:
        return apply(engine, press, probing.probe_context(engine, context, [press]))
    except BaseException:
        keep_uncompressed(engine)
        raise


def keep_uncompressed(engine: "Engine") -> None:
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


# ---- compressions that make room -----------------------------------------------------------------
def make_room(engine: "Engine", press: Press, trigger: str) -> None:
    """Compress the cache, whatever it holds (composite cells and newer tokens), to free cells.

    With ``engine.room == "fill"`` a full cache frees only what the next chunk needs (and, for presses
    that score chunks, its probe); with ``"ratio"`` it keeps the press's ratio of the cells. The cells
    are ranked by their persisted chunk scores (reconstruct-probe presses, ``kv_room="fill"``), or by
    the attention of the tokens since the last compression (captured while they were prefilled) or of
    the newest tokens, decoded once more with the capture on; then rewritten into the kept number of
    composite cells, which start the cache again.
    """
    engine.check_cache_layers()
    conv = engine.conv
    cells = conv.cells
    scorer, keep, window = press.room_plan(cells)
    persisted = engine.room == "fill" and press.scores_chunks()
    if engine.room == "fill" and press.fills_cache() and trigger == "cache full":
        keep = engine.shape.n_ctx - engine.chunk * (2 if persisted else 1)
    if keep >= cells or keep < 1 or (trigger == "cache full" and keep >= engine.shape.n_ctx):
        raise ValueError(f"Requested tokens ({conv.n_tokens + 1}) exceed context window of {engine.shape.n_ctx}: "
                         f"{type(press).__name__} keeps {keep} of {cells} cells")
    t0 = time.perf_counter()
    if persisted and probing.score_cells(engine):
        probing.end_chunk(engine)
        probe = probing.persisted_probe(engine)
        tail = scorer.question_tail_tokens()
        if conv.phase == "prefill" and tail > 0 and probing.question_probe(engine, probe, tail, scorer.probe()):
            # a prompt streaming in: its question ranks the cells (the persisted scores stay with them)
            scorer = scorer.question_ranked()
    elif conv.chunk_start is not None and conv.chunk_start >= conv.compressed_len:
        probe = probing.chunk_probe(engine, cells)
    else:
        probing.end_chunk(engine)
        if conv.holes:
            engine.compact()
        probe = probing.recent_probe(engine, scorer, window, cells)

    def write(selection: np.ndarray):
        result, origin = rewrite.rewrite_cells(engine, selection, cells)
        return result, origin, False

    compress(engine, scorer, probe, keep, write, name=type(press).__name__, ratio=1.0 - keep / cells,
             trigger=trigger, probe_queries=probe.substitute[1] if probe.substitute else 0,
             prefill_seconds=0.0, probe_seconds=time.perf_counter() - t0)


def room_press(engine: "Engine") -> Optional[Press]:
    """The press that frees cells now (None: the cache is never compressed to make room)."""
    press = engine.room_override or engine.press
    return None if press is None else press.room_press(engine.conv.phase)


def stream(engine: "Engine", tokens: Sequence[int]) -> None:
    """Decode ``tokens`` after the history, compressing the cache whenever it is full (or a
    DecodingPress is due). Reconstruct-probe presses with ``kv_room="fill"`` score every chunk once,
    right after it is in (``_stream_scored``); otherwise KVCompose's chunk capture scores what streams in."""
    conv = engine.conv
    tokens = list(tokens)
    engine.ctx.kv_cache_seq_rm(-1, conv.n_tokens, -1)
    press = room_press(engine)
    # a prompt that fits is compressed whole once it is in, by its own probe, or not at all: probing its
    # chunks would cost a second prefill for scores nothing reads, so it is decoded as without a press
    fits = conv.phase == "prefill" and conv.cells + len(tokens) <= engine.shape.n_ctx
    if press is not None and engine.room == "fill" and press.scores_chunks() and not fits:
        return _stream_scored(engine, tokens)
    limit = engine.shape.n_ctx
    done = 0
    try:
        while done < len(tokens):
            press = room_press(engine)
            cells = conv.cells
            due = None if press is None else press.decoding_due(conv.phase, conv.n_tokens - conv.mark)
            if cells >= limit and press is None:
                raise ValueError(f"Requested tokens ({conv.n_tokens + len(tokens) - done}) exceed context "
                                 f"window of {limit}")
            if cells >= limit or due == 0:
                if cells < limit and not press.room_to_free(cells):
                    conv.mark = conv.n_tokens  # nothing to drop yet: count the next interval
                else:
                    make_room(engine, press, "cache full" if cells >= limit else "interval")
                continue
            if cells + len(tokens) - done > limit and engine.room == "ratio":
                probing.begin_chunk(engine, press)
            n = min(engine.n_batch, limit - cells, len(tokens) - done)
            if due is not None:
                n = min(n, due)  # compress exactly every compression_interval tokens
            engine.decode(tokens[done: done + n])
            done += n
            if engine.progress is not None:
                engine.progress(done, len(tokens), "prefill")
    finally:
        probing.end_chunk(engine)  # a chunk not followed by a compression is not scored


def _stream_scored(engine: "Engine", tokens: List[int]) -> None:
    """``stream`` for presses that score chunks: chunks of ``engine.chunk`` tokens go in while the cache
    has room for them and for the probe of every cell not yet scored; each chunk of a prompt is probed
    once it is complete, before the next tokens go in (``probing.score_cells``), generated tokens a chunk
    at a time once the cache nears full; a full cache is ranked by those persisted scores and keeps
    ``n_ctx - 2 * chunk`` cells: room for the next chunk and its probe."""
    conv = engine.conv
    limit = engine.shape.n_ctx
    done = 0
    while done < len(tokens):
        if conv.phase == "prefill" and conv.cells - conv.scored_cells >= engine.chunk:
            # a complete chunk is probed before more tokens go in, never after the last one: a probe
            # decodes after the cache, and the logits llama.cpp holds must stay the newest token's.
            # Generated tokens are probed only when the cache nears full (below): most answers end first
            t0 = time.perf_counter()
            probing.score_cells(engine)
            conv.stream_seconds["probe"] += time.perf_counter() - t0
        press = room_press(engine)
        cells = conv.cells
        unscored = cells - conv.scored_cells
        n = min(engine.chunk, len(tokens) - done)
        # after decoding n tokens, no room to probe the unscored ones (a chunk at a time)
        if cells + n + min(unscored + n, engine.chunk) > limit:
            t0 = time.perf_counter()
            scored = unscored > 0 and probing.score_cells(engine)
            conv.stream_seconds["probe"] += time.perf_counter() - t0
            if scored:
                continue
            if press is None:
                raise ValueError(f"Requested tokens ({conv.n_tokens + len(tokens) - done}) exceed context "
                                 f"window of {limit}")
            make_room(engine, press, "cache full")
            continue
        t0 = time.perf_counter()
        for start in range(done, done + n, engine.n_batch):
            engine.decode(tokens[start: min(done + n, start + engine.n_batch)])
        conv.stream_seconds["prefill"] += time.perf_counter() - t0
        done += n
        if engine.progress is not None:
            engine.progress(done, len(tokens), "prefill")
