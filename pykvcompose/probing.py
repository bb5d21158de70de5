"""Probes of a prompt: measuring which cells the attention uses (window, lookahead and reconstruct probes,
``Llama.kv_probe``), the decoding helpers the probes of a full cache share (``pykvcompose.streaming``), and
the check that a probe saw the context in place (so the rewrite may read the cache tensors)."""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import llama_cpp
import numpy as np

from . import _native
from .presses.base_press import BasePress
from .probe import Probe, ProbeKind, ProbeSpec

if TYPE_CHECKING:
    from .engine import Engine


def probe_context(engine: Engine, context: Sequence[int], presses: Sequence[BasePress]) -> Probe:
    """Prefill ``context`` into an empty cache and run every probe the presses need, once (``Llama.kv_probe``)."""
    engine.check_supported()  # before the cache is touched
    engine.clear()
    shape = engine.shape
    context = list(context)
    n = len(context)
    specs = {ProbeSpec.of(p.probe()) for p in presses if p.probe() is not None}
    prompt_kinds = (ProbeKind.WINDOW, ProbeKind.LOOKAHEAD, ProbeKind.RECONSTRUCT)
    unknown = sorted(tuple(spec) for spec in specs if spec.kind not in prompt_kinds)
    if unknown:
        raise ValueError(f"probe {unknown} cannot score a prompt: expected a window, lookahead or reconstruct probe")
    windows = sorted({min(w, n) for kind, w in specs if kind is ProbeKind.WINDOW}, reverse=True)
    probe = Probe(shape.n_layer, shape.n_head, shape.n_head_kv, n)
    probe.norms = lambda part: (
        engine.capture.norms(part, shape.n_head_kv, n)
        if probe.in_place
        else _native.context_norms(engine.ctx_ptr, part, shape.n_layer, shape.n_head_kv, n)
    )
    queries = None  # positions [first, stop) of the last capture's queries
    t0 = time.perf_counter()
    info = np.zeros(n, dtype=np.float32) if any(p.reads_self_information() for p in presses) else None
    # Window probes: the last w tokens are prefilled in segments cut at every window's start;
    # a window's max / mean is the max / query-weighted mean of its segments'.
    cuts = [n - w for w in windows] + [n]
    engine.prefill(context[: cuts[0]], None if info is None else info[: cuts[0]])
    segments = []
    for start, stop in zip(cuts, cuts[1:]):
        if stop > start:
            part = None if info is None else info[start:stop]
            segments.append((start, stop) + engine.captured(lambda: engine.prefill(context[start:stop], part), n))
            queries = (start, stop)
    if info is not None:
        probe.self_information, probe.sentences = info, sentences(engine, context)
    t_prefill = time.perf_counter()
    for w in windows:
        mx, mean = pooled([(stop - start, mx, mean) for start, stop, mx, mean in segments if start >= n - w])
        probe.attention[ProbeSpec(ProbeKind.WINDOW, w)] = {"max": mx, "mean": mean}
    for kind, w in specs:
        if kind is ProbeKind.WINDOW and w > n:
            probe.attention[ProbeSpec(kind, w)] = probe.attention[ProbeSpec(kind, n)]
    descriptions = [f"window of {w}" for w in windows] + ["self-information"] * (info is not None)
    # lookaheads run first: the longest writes its drafts from the logits the prefill's last token left,
    # with the capture off (one forward pass per token); every lookahead then decodes its first drafts
    # again in one batch with the capture on
    drafts: Optional[List[int]] = None
    for k in sorted({w for kind, w in specs if kind is ProbeKind.LOOKAHEAD}, reverse=True):
        drafts = drafts or lookahead(engine, context, k)
        mx, mean = engine.captured(lambda: decode_removed(engine, drafts[:k], n), n)
        probe.attention[ProbeSpec(ProbeKind.LOOKAHEAD, k)] = {"max": mx, "mean": mean}
        descriptions.append(f"lookahead of {len(drafts[:k])}")
        queries = (n, n + len(drafts[:k]))
    if ProbeSpec(ProbeKind.RECONSTRUCT) in specs:
        info: Dict[str, Any] = {}
        mx, mean = engine.captured(lambda: info.update(_reconstruct(engine, context)), n)
        probe.attention[ProbeSpec(ProbeKind.RECONSTRUCT)] = {"max": mx, "mean": mean}
        descriptions.append(info["probe"])
        queries = (n, 2 * n)
    probe.in_place = queries is not None and context_in_place(engine, n, *queries)
    probe.prefill_seconds = t_prefill - t0
    probe.probe_seconds = time.perf_counter() - t_prefill
    probe.description = ", ".join(descriptions) or "none"
    return probe


#: Bytes that end a sentence (a lexical unit of the self-information prior) when a token's text holds one.
#: Not the colon: what follows "label:" is the label's value, and a value alone (a number's digits) carries
#: less self-information than its label, so it lost its cells (docs/quality.md, "A colon ends no sentence").
SENTENCE_ENDS = frozenset(b".!?\n")


def sentences(engine: Engine, tokens: Sequence[int]) -> np.ndarray:
    """int32 (tokens,): each token's sentence, counted from 0; a new one starts after a token whose text
    holds one of ``SENTENCE_ENDS``."""
    vocab = engine.ctx.model.vocab
    ends = [not SENTENCE_ENDS.isdisjoint(piece(vocab, t)) for t in tokens]
    return np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int32)


def piece(vocab, token: int) -> bytes:
    """The text of ``token`` (special tokens as written), however long."""
    buffer = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
    if n < 0:  # -n: the size it needs
        buffer = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
    return buffer.raw[: max(n, 0)]


def _reconstruct(engine: Engine, context: List[int]) -> Dict[str, Any]:
    """Decode the context again at positions n..2n-1 (the capture records its attention)."""
    n = len(context)
    free = engine.shape.n_ctx - n  # >= 2: only prompts that fit are compressed whole
    chunk = redecode(engine, context, n, free, "probe")
    return {"probe": "reconstruct" if free >= n else f"reconstruct, chunks of {chunk}", "probe_queries": n}


def lookahead(engine: Engine, context: List[int], k: int) -> List[int]:
    """Greedily decode up to ``k`` tokens after the context, at positions n.., right after its prefill, and
    remove them; returns the tokens decoded (the drafts a lookahead probe decodes again with the capture on).

    The model's own first answer tokens query the context the way the answer will, so their attention
    finds what the answer reads (a pass key, a number) where the context's attention to itself does not.
    Decoding stops after an end-of-generation token or when the cache has no free cell left."""
    n = len(context)
    k = min(k, engine.shape.n_ctx - n)
    if k < 1:
        raise RuntimeError(f"no room in the cache to look ahead of {n} tokens (n_ctx={engine.shape.n_ctx})")
    try:
        return greedy_drafts(engine, n, k)
    finally:
        engine.remove(n)  # the drafts' cells never stay


def decode_at(engine: Engine, tokens: List[int], base: int, predict_from: Optional[int] = None) -> List[int]:
    """Decode ``tokens`` at positions ``base``.. in batches of ``n_batch``, outside the history (probe queries).
    With ``predict_from``: returns the model's greedy next token after each of ``tokens[predict_from:]``."""
    predicted: List[int] = []
    n_vocab = engine.ctx.model.n_vocab()
    n = len(tokens)
    for start in range(0, len(tokens), engine.n_batch):
        piece = tokens[start : start + engine.n_batch]
        engine.batch.set_batch(batch=piece, n_past=base + start, logits_all=False)
        rows = [] if predict_from is None else range(max(0, predict_from - start), min(len(piece), n - start))
        for i in rows:
            engine.batch.batch.logits[i] = True
        engine.ctx.decode(engine.batch)
        for i in rows:
            logits = np.ctypeslib.as_array(engine.ctx.get_logits_ith(i), shape=(n_vocab,))
            predicted.append(int(np.argmax(logits)))
    return predicted


def decode_removed(engine: Engine, tokens: List[int], base: int, predict_from: Optional[int] = None) -> List[int]:
    """``decode_at``, then remove the tokens' cells (the queries of a capture)."""
    try:
        return decode_at(engine, tokens, base, predict_from)
    finally:
        engine.remove(base)


def greedy_drafts(engine: Engine, base: int, k: int) -> List[int]:
    """Decode up to ``k`` tokens greedily at positions ``base``.., each from the newest decode's last row
    of logits; stops after an end-of-generation token. The cells stay."""
    model = engine.ctx.model
    decoded: List[int] = []
    while len(decoded) < k:
        logits = np.ctypeslib.as_array(engine.ctx.get_logits_ith(-1), shape=(model.n_vocab(),))
        token = int(np.argmax(logits))
        engine.batch.set_batch(batch=[token], n_past=base + len(decoded), logits_all=False)
        engine.ctx.decode(engine.batch)
        decoded.append(token)
        if llama_cpp.llama_vocab_is_eog(model.vocab, token):
            break
    return decoded


def redecode(engine: Engine, tokens: List[int], base: int, free: int, stage: str = "") -> int:
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
            part = tokens[start : start + chunk]
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


def context_in_place(engine: Engine, n: int, first: int, stop: int) -> bool:
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


def question_probe(engine: Engine, probe: Probe, tail: int, lookahead: int) -> Optional[ProbeSpec]:
    """Score the cache's cells by the prompt's question, for a compression that makes room while the
    prompt streams in: the prompt's last ``tail`` tokens (``conv.question``; where the question usually
    is) and up to ``lookahead`` tokens the model writes greedily after them are decoded after everything
    the cache holds with the capture on, and removed; their attention is stored in ``probe`` under the
    returned spec. Cells are otherwise ranked by text that follows them (a chunk's own reconstruct probe),
    which does not ask for the fact a question needs. Returns None, changing nothing, without a question or
    room in the cache to decode it.

    Greedy drafts cost a forward pass per token, so a round decodes the question and the last round's drafts
    in one captured batch, checked as speculative decoding checks a draft: if the model still writes each of
    them greedily on this cache, that batch is the probe. Otherwise the drafts from the first wrong one on are
    written again (a fact the answer needs has come in or gone) with the capture off, one token at a time, and
    all of them decoded again in one captured batch; the question's rows, pooled apart in the first batch (the
    capture's head rows), stay valid whatever the drafts turn out to be (they are causal: they never see a
    draft). The probe is then the attention of one batch of the question and the drafts, bit for bit. One batch,
    not two: one graph fewer per round."""
    conv, shape = engine.conv, engine.shape
    question: List[int] = list(conv.question or [])[-tail:] if tail > 0 else []
    cells = conv.cells
    free = shape.n_ctx - cells
    if not question or engine.capture is None or free < 2:
        return None
    question = question[-(free - 1) :]  # at least one draft
    k = min(int(lookahead), free - len(question))
    if conv.holes:
        engine.compact()  # capture columns must be cells 0..cells-1
    base = conv.n_tokens
    at = base + len(question)  # the first draft's position
    is_eog = lambda token: llama_cpp.llama_vocab_is_eog(engine.ctx.model.vocab, token)  # noqa: E731
    drafts = conv.question_drafts
    if drafts is not None and not (len(drafts) >= k or is_eog(drafts[-1])):
        drafts = None  # fewer than this round's room holds: written again
    parts = []  # (query rows, max, mean) of each captured batch

    def captured_at(tokens: List[int], pos: int, predict_from: Optional[int] = None, head_rows: int = 0) -> List[int]:
        """``decode_at`` with the capture on (the cells stay until the round ends); its scores go to ``parts``."""
        predicted: List[int] = []
        run = lambda: predicted.extend(decode_at(engine, tokens, pos, predict_from))  # noqa: E731
        mx, mean = engine.captured(run, cells, head_rows)
        parts.append((len(tokens), mx, mean))
        return predicted

    try:
        kept = []  # the last round's drafts the model still writes greedily, up to the first it does not
        if drafts is not None:
            drafts = drafts[:k]
            # the model's greedy token after the question and after each draft
            predicted = captured_at(question + drafts, base, len(question) - 1, head_rows=len(question))
            wrong = next((i for i, (p, d) in enumerate(zip(predicted, drafts)) if p != d), None)
            if wrong is not None:
                parts[-1] = (len(question), *engine.capture_scores(head=True))  # the question's rows alone
                kept, first = drafts[:wrong], predicted[wrong]
                engine.remove(at + wrong)  # the checked drafts' cells stay
                drafts = None
        else:
            first = captured_at(question, base, len(question) - 1)[0]
        if drafts is None:
            # from the first wrong draft on, written one token at a time with the capture off (the checked ones
            # were verified as a pass's drafts are), then all decoded again in one captured batch
            n = len(kept)
            decode_at(engine, [first], at + n)
            more = [] if n + 1 >= k or is_eog(first) else greedy_drafts(engine, at + n + 1, k - n - 1)
            engine.remove(at)
            drafts = conv.question_drafts = kept + [first] + more
            captured_at(drafts, at)
    finally:
        engine.remove(base)  # the probe's cells never stay
    mx, mean = pooled(parts)
    attention = {"max": np.array(mx[..., :cells]), "mean": np.array(mean[..., :cells])}
    if conv.question_scores is not None and not conv.holes:
        # each round ranks by the most attention a cell ever got from the question: the drafts and the
        # cache change between rounds, and a fact's tokens ranked high once must not each be dropped by
        # one weaker round in some heads (the rounds split a multi-token fact across heads)
        held = min(cells, conv.question_scores["max"].shape[-1])
        for agg, values in attention.items():
            np.maximum(values[..., :held], conv.question_scores[agg][..., :held], out=values[..., :held])
    spec = ProbeSpec(ProbeKind.QUESTION, len(question))
    probe.attention[spec] = attention
    probe.description = f"the prompt's last {len(question)} tokens and a lookahead of {len(drafts)}"
    return spec


def question_skips(engine: Engine, keep: int) -> int:
    """How many of the newest cells a question-ranked compression keeps unranked because the question's
    probe skips it (``StreamPolicy.question_every``): those it has not ranked yet; 0 when it runs."""
    conv = engine.conv
    if conv.question_scores is None or conv.holes or conv.question_skipped + 1 >= engine.policy.question_every:
        return 0
    unranked = conv.cells - int(conv.question_scores["max"].shape[-1])
    return unranked if 0 < unranked < keep else 0


def ranked_before(engine: Engine, probe: Probe, unranked: int) -> ProbeSpec:
    """Stand the question's earlier attention in for its probe: the most each cell got from it, 0 for the
    newest ``unranked`` cells (which the compression keeps)."""
    conv = engine.conv
    held = probe.n_tokens - unranked
    attention = {}
    for agg, values in conv.question_scores.items():
        attention[agg] = np.zeros(values.shape[:-1] + (probe.n_tokens,), dtype=np.float32)
        attention[agg][..., :held] = values[..., :held]
    spec = ProbeSpec(ProbeKind.QUESTION, 0)  # (no query ran)
    probe.attention[spec] = attention
    probe.description = f"the question's attention of earlier rounds, the newest {unranked} cells kept"
    return spec


def pooled(parts: Sequence[Tuple[int, np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    """(max, mean) over the query rows of several captures of the same keys, from each one's
    ``(rows, max, mean)``: the max of the maxima and the row-weighted mean of the means."""
    total = sum(rows for rows, _, _ in parts)
    mx = np.maximum.reduce([m for _, m, _ in parts])
    mean = (sum(rows * m.astype(np.float64) for rows, _, m in parts) / total).astype(np.float32)
    return mx, mean
