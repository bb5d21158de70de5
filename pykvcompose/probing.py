"""Probes: measuring which cells the attention uses. The probe of a prompt (window, lookahead and
reconstruct probes, ``Llama.kv_probe``), the probes of a full cache (the newest tokens decoded again, or the
chunk of tokens streamed in since the last compression), and the check that a probe saw the
context in place (so the rewrite may read the cache tensors)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import llama_cpp
import numpy as np

from . import _native
from .presses.base_press import BasePress
from .presses.press import Press
from .probe import Probe, ProbeSpec

if TYPE_CHECKING:
    from .engine import Engine


def probe_context(engine: "Engine", context: Sequence[int], presses: Sequence[BasePress]) -> Probe:
    """Prefill ``context`` into an empty cache and run every probe the presses need, once (``Llama.kv_probe``)."""
    engine.check_supported()  # before the cache is touched
    engine.clear()
    shape = engine.shape
    context = list(context)
    n = len(context)
    specs = {tuple(p.probe()) for p in presses if p.probe() is not None}
    unknown = {spec for spec in specs if spec[0] not in ("window", "lookahead", "reconstruct")}
    if unknown:
        raise ValueError(f"unknown probe {sorted(unknown)}: expected ('window', w), ('lookahead', k) "
                         "or ('reconstruct', 0)")
    windows = sorted({min(int(w), n) for kind, w in specs if kind == "window"}, reverse=True)
    probe = Probe(shape.n_layer, shape.n_head, shape.n_head_kv, n)
    probe.norms = lambda part: (
        engine.capture.norms(part, shape.n_head_kv, n) if probe.in_place
        else _native.context_norms(engine.ctx_ptr, part, shape.n_layer, shape.n_head_kv, n))
    queries = None  # positions [first, stop) of the last capture's queries
    t0 = time.perf_counter()
    # Window probes: the last w tokens are prefilled in segments cut at every window's start;
    # a window's max / mean is the max / query-weighted mean of its segments'.
    cuts = [n - w for w in windows] + [n]
    engine.prefill(context[: cuts[0]])
    segments = []
    for start, stop in zip(cuts, cuts[1:]):
        if stop > start:
            segments.append((start, stop) + engine.captured(lambda: engine.prefill(context[start:stop]), n))
            queries = (start, stop)
    t_prefill = time.perf_counter()
    for w in windows:
        parts = [(stop - start, mx, mean) for start, stop, mx, mean in segments if start >= n - w]
        total = sum(q for q, _, _ in parts)
        probe.attention[("window", w)] = {
            "max": np.maximum.reduce([mx for _, mx, _ in parts]),
            "mean": (sum(q * mean.astype(np.float64) for q, _, mean in parts) / total).astype(np.float32),
        }
    for kind, w in specs:
        if kind == "window" and w > n:
            probe.attention[(kind, w)] = probe.attention[(kind, n)]
    descriptions = [f"window of {w}" for w in windows]
    # lookaheads run first: the longest continues from the logits the prefill's last token left, and
    # shorter ones replay its first drafts
    drafts: Optional[List[int]] = None
    for k in sorted({int(w) for kind, w in specs if kind == "lookahead"}, reverse=True):
        info: Dict[str, Any] = {}
        mx, mean = engine.captured(lambda: info.update(decoded=lookahead(engine, context, k, drafts)), n)
        drafts = drafts or info["decoded"]
        probe.attention[("lookahead", k)] = {"max": mx, "mean": mean}
        descriptions.append(f"lookahead of {len(info['decoded'])}")
        queries = (n, n + len(info["decoded"]))
    if ("reconstruct", 0) in specs:
        info: Dict[str, Any] = {}
        mx, mean = engine.captured(lambda: info.update(_reconstruct(engine, context)), n)
        probe.attention[("reconstruct", 0)] = {"max": mx, "mean": mean}
        descriptions.append(info["probe"])
        queries = (n, 2 * n)
    probe.in_place = queries is not None and context_in_place(engine, n, *queries)
    probe.prefill_seconds = t_prefill - t0
    probe.probe_seconds = time.perf_counter() - t_prefill
    probe.description = ", ".join(descriptions) or "none"
    return probe


def _reconstruct(engine: "Engine", context: List[int]) -> Dict[str, Any]:
    """Decode the context again at positions n..2n-1 (the capture records its attention)."""
    n = len(context)
    free = engine.shape.n_ctx - n  # >= 2: only prompts that fit are compressed whole
    chunk = redecode(engine, context, n, free, "probe")
    return {"probe": "reconstruct" if free >= n else f"reconstruct, chunks of {chunk}", "probe_queries": n}


def lookahead(engine: "Engine", context: List[int], k: int, drafts: Optional[List[int]] = None) -> List[int]:
    """Greedily decode up to ``k`` tokens after the context, at positions n.., right after its prefill (the
    capture records their attention), and remove them; returns the tokens decoded. ``drafts``: decode
    these instead (an earlier lookahead's, whose logits the cache no longer holds).

    The model's own first answer tokens query the context the way the answer will, so their attention
    finds what the answer reads (a pass key, a number) where the context's attention to itself does not.
    Decoding stops after an end-of-generation token or when the cache has no free cell left."""
    n = len(context)
    k = min(k, engine.shape.n_ctx - n)
    if k < 1:
        raise RuntimeError(f"no room in the cache to look ahead of {n} tokens (n_ctx={engine.shape.n_ctx})")
    try:
        return greedy_drafts(engine, n, k, drafts)
    finally:
        engine.remove(n)  # the drafts' cells never stay


def greedy_drafts(engine: "Engine", base: int, k: int, drafts: Optional[List[int]] = None) -> List[int]:
    """Decode up to ``k`` tokens greedily at positions ``base``.., each from the newest decode's last row
    of logits (``drafts``: these tokens instead); stops after an end-of-generation token. The cells stay."""
    model = engine.ctx.model
    decoded: List[int] = []
    while len(decoded) < k:
        if drafts is None:
            logits = np.ctypeslib.as_array(engine.ctx.get_logits_ith(-1), shape=(model.n_vocab(),))
            token = int(np.argmax(logits))
        elif len(decoded) < len(drafts):
            token = drafts[len(decoded)]
        else:
            break
        engine.batch.set_batch(batch=[token], n_past=base + len(decoded), logits_all=False)
        engine.ctx.decode(engine.batch)
        decoded.append(token)
        if llama_cpp.llama_vocab_is_eog(model.vocab, token):
            break
    return decoded


def redecode(engine: "Engine", tokens: List[int], base: int, free: int, stage: str = "") -> int:
    """Decode ``tokens`` again at positions ``base``.. as probe queries, within ``free`` free cells, and
    remove them afterwards; returns the piece size used.

    When the free cells cannot hold them all, they run in pieces and a piece's cells are dropped
    before the next one, except the newest (llama.cpp needs each batch to start right after the
    sequence's newest position). A piece's queries then see the cache, that one earlier probe token
    and their own piece, where a full probe sees all earlier probe tokens; the softmax mass those
    would take goes to the cache's columns instead.
    """
    n = len(tokens)
    if free < min(n, 2):
        raise RuntimeError(f"no room in the cache to probe {n} tokens ({free} free cells)")
    # a dropped piece leaves its newest cell between two free runs of together free - 1 cells;
    # llama.cpp needs a batch's cells in one run, so a piece must fit into the smaller half
    chunk = engine.n_batch if free >= n else max(1, min(engine.n_batch, (free - 1) // 2))
    held = 0
    try:
        for start in range(0, n, chunk):
            part = tokens[start: start + chunk]
            if held + len(part) > free:
                engine.remove(base, base + start - 1)
                held = 1
            engine.batch.set_batch(batch=part, n_past=base + start, logits_all=False)
            engine.ctx.decode(engine.batch)
            held += len(part)
            if stage and engine.progress is not None:
                engine.progress(start + len(part), n, stage)
    finally:
        engine.remove(base)  # the probe's own cells never stay
    return chunk


def context_in_place(engine: "Engine", n: int, first: int, stop: int) -> bool:
    """Whether the last capture saw the context's ``n`` tokens in cache cells ``0..n-1``, token j in
    cell j: its queries, at positions ``[first, stop)``, must have seen cell j exactly as often as
    a causal mask shows position j to them (llama.cpp's mask hides empty cells, other sequences
    and later positions). iSWA models keep a second cache in their state: never in place."""
    if engine.shape.iswa:
        return False
    seen = engine.capture.visibility()
    if seen.size < n:
        return False
    j = np.arange(n)
    expected = np.clip(stop - np.maximum(j, first), 0, stop - first)
    return bool(np.array_equal(seen[:n], expected))


# ---- probes of a full cache (compressions that make room) -------------------------------------
def cells_probe(engine: "Engine", cells: int) -> Probe:
    """A probe of the cache's first ``cells`` cells with no attention yet; norms read on demand."""
    shape = engine.shape
    return Probe(shape.n_layer, shape.n_head, shape.n_head_kv, cells,
                 norms=lambda part: _native.context_norms(engine.ctx_ptr, part, shape.n_layer, shape.n_head_kv, cells),
                 description="none")


def recent_probe(engine: "Engine", press: BasePress, window: int, cells: int) -> Probe:
    """A probe of the cache's ``cells`` cells from the attention of its newest ``window`` tokens.

    Those tokens are removed and decoded again at the same positions with the capture on (they
    are the newest, so every cell is visible to them); if that fails they are decoded again
    without it, so the cache is as before, and the error propagates.
    """
    probe = cells_probe(engine, cells)
    if press.probe() is None:
        return probe
    conv = engine.conv
    w = max(1, min(window, conv.n_tokens - conv.compressed_len, engine.n_batch))
    start = conv.n_tokens - w
    recent = conv.input_ids[start: conv.n_tokens].tolist()
    engine.remove(start)
    conv.n_tokens = start
    try:
        mx, mean = engine.captured(lambda: engine.decode(recent), cells)
    except BaseException:
        engine.remove(start)
        conv.n_tokens = start
        engine.decode(recent)
        raise
    probe.attention[("window", w)] = {"max": mx, "mean": mean}
    probe.substitute = ("window", w)
    probe.description = f"newest {w} tokens"
    return probe


def begin_chunk(engine: "Engine", press: Press) -> None:
    """Capture the attention of every token prefilled until the next compression, for presses
    that score streamed chunks by the context attending to itself (KVCompose's reconstruct probe,
    which a lookahead press falls back to: a chunk has no answer to look ahead to): the chunk's
    tokens are the queries that stand in for it. Other presses keep their window."""
    if engine.conv.chunk_start is not None or engine.capture is None:
        return
    if not press.scorer().scores_chunks():
        return
    if engine.conv.holes:
        engine.compact()  # capture columns must be cells 0..cells-1
    engine.capture_begin(engine.shape.n_ctx)
    engine.conv.chunk_start = engine.conv.n_tokens


def end_chunk(engine: "Engine"):
    """End a chunk capture; its (max, mean) scores over the cache's columns, or None if none ran."""
    if engine.conv.chunk_start is None:
        return None
    engine.conv.chunk_start = None
    engine.capture.end()
    return engine.capture_scores()


def chunk_probe(engine: "Engine", cells: int) -> Probe:
    """A probe of the cache's ``cells`` cells from the chunk capture (see ``begin_chunk``)."""
    queries = engine.conv.n_tokens - engine.conv.chunk_start
    mx, mean = end_chunk(engine)
    probe = cells_probe(engine, cells)
    probe.attention[("window", queries)] = {"max": np.ascontiguousarray(mx[..., :cells]),
                                            "mean": np.ascontiguousarray(mean[..., :cells])}
    probe.substitute = ("window", queries)
    probe.description = f"the {queries} tokens since the last compression"
    return probe


# ---- persisted chunk scores (reconstruct-probe presses streaming past n_ctx) ----------------------
def score_cells(engine: "Engine") -> bool:
    """Give every cell without a persisted score one: the cells' own tokens (the unscored tail) are
    decoded once more after everything the cache holds with the capture on, one chunk at a time, the
    oldest first (KVzip's chunked reconstruction: each token is scored once, by a probe that sees the
    whole cache; a probe needs free cells for one chunk only), and each unscored cell keeps the
    attention it got. Returns False when the cache has no room for the next probe (the chunks scored
    until then keep their scores)."""
    while engine.conv.scored_cells < engine.conv.cells:
        if not _score_chunk(engine):
            return False
    return True


def _score_chunk(engine: "Engine") -> bool:
    """``score_cells`` for the oldest unscored chunk (False, changing nothing: no room for its probe)."""
    conv, shape = engine.conv, engine.shape
    cells = conv.cells
    first = conv.scored_cells
    single = max(first, conv.compressed_cells)  # the first unscored cell that holds one token
    if single < cells:
        start = conv.n_tokens - (cells - single)
        queries = conv.input_ids[start: start + min(cells - single, engine.chunk)].tolist()
        scored = single + len(queries)  # (composite cells without scores before them are scored too)
    else:  # composite cells without scores (a restored session or state) are scored by the newest tokens
        queries = conv.input_ids[max(0, conv.n_tokens - engine.chunk): conv.n_tokens].tolist()
        scored = cells
    free = shape.n_ctx - cells
    if engine.capture is None or not queries or free < min(len(queries), 2):
        return False
    if conv.holes:
        engine.compact()  # capture columns must be cells 0..cells-1
    mx, mean = engine.captured(lambda: redecode(engine, queries, conv.n_tokens, free), cells)
    if not shape.iswa:  # (an iSWA model's layer 0, whose mask this counts, slides)
        seen = engine.capture.visibility()
        if not (seen[:cells] == seen[0]).all() or seen[0] <= 0:
            raise RuntimeError("the probe did not see the conversation in cache cells 0..cells-1")
    new = {"max": mx[..., first:scored], "mean": mean[..., first:scored]}
    if conv.cell_scores is None:
        conv.cell_scores = {agg: np.ascontiguousarray(v) for agg, v in new.items()}
    else:
        conv.cell_scores = {agg: np.concatenate([conv.cell_scores[agg], new[agg]], axis=-1) for agg in new}
    return True


def question_probe(engine: "Engine", probe: Probe, tail: int, spec: ProbeSpec) -> bool:
    """Score the cache's cells by the prompt's question, for a compression that makes room while the
    prompt streams in: the prompt's last ``tail`` tokens (``conv.question``; where the question usually
    is) are decoded after everything the cache holds, then up to ``k`` tokens the model writes greedily
    after them (``spec`` = ``("lookahead", k)``, the press's probe), all with the capture on and removed
    afterwards; their attention is stored in ``probe`` under ``spec``. Cells are otherwise ranked by text
    that follows them (a chunk's own reconstruct probe), which does not ask for the fact a question
    needs. Returns False, changing nothing, without a question or room in the cache to decode it."""
    conv, shape = engine.conv, engine.shape
    question = list(conv.question or [])[-tail:] if tail > 0 else []
    cells = conv.cells
    free = shape.n_ctx - cells
    if not question or engine.capture is None or free < 2:
        return False
    question = question[-(free - 1):]  # at least one draft
    k = min(int(spec[1]), free - len(question))
    if conv.holes:
        engine.compact()  # capture columns must be cells 0..cells-1
    base = conv.n_tokens

    def decode() -> None:
        for start in range(0, len(question), engine.n_batch):
            engine.batch.set_batch(batch=question[start: start + engine.n_batch], n_past=base + start, logits_all=False)
            engine.ctx.decode(engine.batch)
        greedy_drafts(engine, base + len(question), k)

    try:
        mx, mean = engine.captured(decode, cells)
    finally:
        engine.remove(base)  # the question's and the drafts' cells never stay
    attention = {"max": np.array(mx[..., :cells]), "mean": np.array(mean[..., :cells])}
    if conv.question_scores is not None and not conv.holes:
        # each round ranks by the most attention a cell ever got from the question: the drafts and the
        # cache change between rounds, and a fact's tokens ranked high once must not each be dropped by
        # one weaker round in some heads (the rounds split a multi-token fact across heads)
        held = min(cells, conv.question_scores["max"].shape[-1])
        for agg, values in attention.items():
            np.maximum(values[..., :held], conv.question_scores[agg][..., :held], out=values[..., :held])
    probe.attention[tuple(spec)] = attention
    probe.question = tuple(spec)
    probe.description = f"the prompt's last {len(question)} tokens and a lookahead of up to {k}"
    return True


def persisted_probe(engine: "Engine") -> Probe:
    """A probe of every cell from its persisted score (see ``score_cells``)."""
    cells = engine.conv.cells
    probe = cells_probe(engine, cells)
    scores = engine.conv.cell_scores
    probe.attention[("reconstruct", 0)] = {"max": scores["max"][..., :cells], "mean": scores["mean"][..., :cells]}
    probe.substitute = ("reconstruct", 0)  # also for presses that score prompts by a lookahead
    probe.description = "each chunk's reconstruct probe, persisted"
    return probe
