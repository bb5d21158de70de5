"""Streaming past ``n_ctx``: the one make-room loop, its schedule and its probes.

A prompt longer than the cache, a long generation or a DecodingPress's interval compresses a cache that
already holds composite cells; :class:`StreamPolicy` (``Llama(kv_stream=...)``) says how. The functions
below it decide, per kind of press, what it frees and when: presses themselves only score and select."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np

from . import _native, compression, rewrite
from .presses.base_press import BasePress, check_int, check_number
from .presses.decoding_press import DecodingPress
from .presses.prefill_decoding_press import PrefillDecodingPress
from .presses.press import Press
from .probe import QUESTION_TOKENS_KEPT, Probe, ProbeKind, ProbeSpec
from .probing import question_probe, question_skips, ranked_before, redecode

if TYPE_CHECKING:
    from .engine import Engine

ROOMS = ("fill", "ratio")
#: ``compress_context``'s default press adds the self-information prior from this ratio on (measured: 0.5-0.875, more
#: facts than the reconstruct probe alone: completion 143 vs 104, 102 vs 48, 40 vs 21 of 180).
PRIOR_MIN_RATIO = 0.5
#: Newest tokens decoded again to score a full cache when the press has no window of its own.
ROOM_WINDOW = 64


@dataclass
class StreamPolicy:
    """
    How a full cache makes room while a prompt or a generation streams past ``n_ctx``.

    Parameters
    ----------
    room : {"fill", "ratio"}, default="fill"
        "fill": a full cache frees only what the next chunk needs, so it stays full; presses with a
        reconstruct or lookahead probe (KVCompose) probe each chunk of a prompt once, right after it is
        in (unless the prompt's question ranks the cells, ``question_tail``), and every cell keeps that
        score through later compressions. "ratio": the cache keeps the press's ratio of its cells,
        re-scored by the newest tokens (fewer, larger compressions that forget facts outside the last chunk).
    chunk : int, optional
        Tokens per streamed chunk ("fill"); default ``min(256, n_batch, n_ctx // 8)``. A full cache keeps
        ``n_ctx - 2 * chunk`` cells: room for the next chunk and its probe.
    question_tail : int, default=48
        "fill" with a lookahead press: at every compression that makes room for the rest of a prompt,
        the prompt's last ``question_tail`` tokens (where its question usually is) and up to
        ``question_drafts`` greedy drafts after them are decoded after the cache, and their attention ranks
        the cells (then removed; a cell keeps the most attention the question ever gave it); the chunks are
        then not probed (their scores would rank nothing). 0: the chunks' persisted scores rank.
    question_drafts : int, default=16
        The most drafts decoded after the question (and at most the press's ``lookahead``, which scores
        prompts that fit): 16 found the same pass keys as 32 in less time (docs/streaming.md).
    question_consensus : float, default=1.0
        The ``consensus`` of those question-ranked selections (``BasePress.select``): 1 makes every head
        keep the same cells, so a multi-token fact (a number's digit tokens) is kept or dropped whole.
    question_every : int, default=2
        The question's probe runs at every ``question_every``-th of those compressions; in between, the
        cells that came in since it last ran are kept, the others ranked by the most attention it gave
        them. 2 found more pass keys than 1 (85 against 82 of 138) in 0.8x the time (docs/streaming.md).
    """

    room: str = "fill"
    chunk: Optional[int] = None
    question_tail: int = 48
    question_drafts: int = 16
    question_consensus: float = 1.0
    question_every: int = 2

    def __post_init__(self) -> None:
        if self.room not in ROOMS:
            raise ValueError(f"kv_room must be 'fill' or 'ratio', got {self.room!r}")
        if self.chunk is not None:
            check_int("kv_chunk", self.chunk, 1)
        check_int("question_tail", self.question_tail, 0)
        if self.question_tail > QUESTION_TOKENS_KEPT:
            raise ValueError(f"question_tail must be at most {QUESTION_TOKENS_KEPT}, got {self.question_tail}")
        check_int("question_drafts", self.question_drafts, 1)
        check_number("question_consensus", self.question_consensus, 0.0, 1.0, high_inclusive=True)
        check_int("question_every", self.question_every, 1)

    def chunk_for(self, n_ctx: int, n_batch: int) -> int:
        """Tokens per streamed chunk in a cache of ``n_ctx`` cells; ValueError when a chunk cannot fit twice."""
        if self.chunk is None:
            return max(1, min(256, n_batch, n_ctx // 8))
        if 2 * self.chunk >= n_ctx:
            raise ValueError(
                f"kv_chunk ({self.chunk}) must be below n_ctx / 2 ({n_ctx / 2:g}): a full cache "
                "keeps n_ctx - 2 * kv_chunk cells"
            )
        return self.chunk


# ---- what each kind of press frees, and when ---------------------------------------------------
def frees_cells(press: Optional[Press]) -> bool:
    """Whether compressing a full cache with ``press`` frees cells (so prompts and generations may run past
    ``n_ctx``)."""
    if isinstance(press, BasePress):
        return press.compression_ratio > 0
    if isinstance(press, PrefillDecodingPress):
        return any(frees_cells(p) for p in (press.prefilling_press, press.decoding_press))
    return isinstance(press, DecodingPress)


def prompt_press(press: Optional[Press]) -> Optional[BasePress]:
    """The press applied to a whole prompt that fits into the cache (None: prompts stay as they are)."""
    if isinstance(press, PrefillDecodingPress):
        return press.prefilling_press
    return press if isinstance(press, BasePress) else None


def phase_press(press: Optional[Press], phase: str) -> Optional[Press]:
    """The press that frees cells in ``phase`` ("prefill" or "decode"), None if none does: a
    PrefillDecodingPress's own press for the phase if it frees cells, else its other one."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if not isinstance(press, PrefillDecodingPress):
        return press if frees_cells(press) else None
    order = (
        (press.decoding_press, press.prefilling_press)
        if phase == "decode"
        else (press.prefilling_press, press.decoding_press)
    )
    return next((p for p in order if frees_cells(p)), None)


def room_press(engine: Engine) -> Optional[Press]:
    """The press that frees cells now (None: the cache is never compressed to make room)."""
    return phase_press(engine.room_override or engine.press, engine.conv.phase)


def room_plan(press: Press, cells: int) -> Tuple[BasePress, int, int]:
    """How a compression of a full cache of ``cells`` cells goes: ``(scorer, kept cells, window)``, where
    ``window`` is how many of the newest tokens are decoded again to score the cells when no chunk capture
    saw them. A DecodingPress goes back to ``target_size`` cells, scored by its ``base_press`` from its
    ``hidden_states_buffer_size`` newest tokens."""
    if isinstance(press, DecodingPress):
        keep = min(press.target_size, cells - 1)
        scorer = press.base_press
        if keep >= 1:
            scorer = dataclasses.replace(scorer, compression_ratio=1.0 - keep / cells)
        return scorer, keep, press.hidden_states_buffer_size
    spec = press.probe()
    window = spec.size if spec is not None and spec.kind is ProbeKind.WINDOW else getattr(press, "window", ROOM_WINDOW)
    return press, press.n_kept(cells), int(window)


def decoding_due(press: Optional[Press], phase: str, since_mark: int) -> Optional[int]:
    """Tokens until a DecodingPress's next compression, ``since_mark`` tokens after the last one (None:
    the press compresses only when the cache is full)."""
    if not isinstance(press, DecodingPress) or phase != "decode":
        return None
    return max(0, press.compression_interval - since_mark)


def check_cache(press: Optional[Press], n_ctx: int) -> None:
    """Refuse (ValueError) a press whose schedule cannot work with a cache of ``n_ctx`` cells."""
    if isinstance(press, PrefillDecodingPress):
        for part in (press.prefilling_press, press.decoding_press):
            check_cache(part, n_ctx)
    elif isinstance(press, DecodingPress) and press.target_size >= n_ctx - 1:
        raise ValueError(
            f"DecodingPress.target_size ({press.target_size}) must be below n_ctx - 1 "
            f"({n_ctx - 1}) so that a compression frees cells"
        )


def scores_chunks(press: Press) -> bool:
    """Whether a press's cells keep the score their chunk's reconstruct probe gave them ("fill"): presses
    with a reconstruct probe, and lookahead presses (a chunk has no answer to look ahead to)."""
    spec = press.probe() if isinstance(press, BasePress) else None
    return spec is not None and spec.kind in (ProbeKind.RECONSTRUCT, ProbeKind.LOOKAHEAD)


def question_ranks(engine: Engine, press: Optional[Press]) -> bool:
    """Whether the compressions that make room now rank the cells by a streamed prompt's question alone
    (``question_probe``): a lookahead press with "fill" while a prompt with a question streams in. Its
    chunks' reconstruct probes would then rank nothing, so they are not run: a cell ranked by a question
    has no persisted score (a later compression without one probes the cells it then needs)."""
    conv, policy = engine.conv, engine.policy
    spec = press.probe() if isinstance(press, BasePress) else None
    return (
        spec is not None
        and spec.kind is ProbeKind.LOOKAHEAD
        and policy.room == "fill"
        and policy.question_tail > 0
        and conv.phase == "prefill"
        and bool(conv.question)
        and engine.capture is not None
    )


def question_agnostic(press: BasePress) -> BasePress:
    """The press ``compress_context`` applies to a context no question follows yet: KVCompose's
    ``scoring="auto"`` becomes the reconstruct probe (a lookahead there continues the document), with the
    sentence self-information prior from ``PRIOR_MIN_RATIO`` on (docs/quality.md)."""
    if getattr(press, "scoring", None) == "auto":
        prior = press.self_information or press.compression_ratio >= PRIOR_MIN_RATIO
        return dataclasses.replace(press, scoring="reconstruct", self_information=prior)
    return press


# ---- the make-room loop ------------------------------------------------------------------------
def stream(engine: Engine, tokens: Sequence[int]) -> None:
    """Decode ``tokens`` after the history, compressing the cache whenever it is full (or a DecodingPress
    is due).

    With "fill" and a press that scores chunks, chunks of ``engine.chunk`` tokens go in while the cache
    has room for them and for the probe of every cell not yet scored; each chunk of a prompt is probed once
    it is complete, generated tokens a chunk at a time once the cache nears full. Otherwise the cache is
    filled to ``n_ctx`` and compressed then ("ratio" captures the chunk's attention as it streams in).
    A prompt that fits is decoded as without a press: it is compressed whole once it is in."""
    conv, policy = engine.conv, engine.policy
    tokens = list(tokens)
    engine.ctx.kv_cache_seq_rm(-1, conv.n_tokens, -1)
    press = room_press(engine)
    fits = conv.phase == "prefill" and conv.cells + len(tokens) <= engine.shape.n_ctx
    scored = press is not None and policy.room == "fill" and scores_chunks(press) and not fits
    limit = engine.shape.n_ctx
    done = 0
    try:
        while done < len(tokens):
            remaining = len(tokens) - done
            press = room_press(engine)
            probed = scored and not question_ranks(engine, press)  # (the question ranks: no chunk probes)
            if probed and conv.phase == "prefill" and conv.cells - conv.scored_cells >= engine.chunk:
                # a complete chunk is probed before more tokens go in, never after the last one: a probe
                # decodes after the cache, and the logits llama.cpp holds must stay the newest token's
                _timed(conv, "probe", lambda: score_cells(engine))
            cells = conv.cells
            due = decoding_due(press, conv.phase, conv.n_tokens - conv.mark)
            if scored:
                n = min(engine.chunk, remaining)
                # (while the question ranks, the free chunk holds its probe, as it would a chunk's)
                unscored = cells - conv.scored_cells if probed else 0
                # after decoding n tokens, no room to probe the unscored ones (a chunk at a time)
                full = cells + n + min(unscored + n, engine.chunk) > limit
                if full and unscored > 0 and _timed(conv, "probe", lambda: score_cells(engine)):
                    continue
            else:
                n = min(engine.n_batch, limit - cells, remaining)
                full = cells >= limit
            if full or due == 0:
                if press is None:
                    raise ValueError(f"Requested tokens ({conv.n_tokens + remaining}) exceed context window of {limit}")
                if not full and cells <= press.target_size:  # (due only for a DecodingPress)
                    conv.mark = conv.n_tokens  # nothing to drop yet: count the next interval
                else:
                    make_room(engine, press, "cache full" if full else "interval")
                continue
            if not scored and cells + remaining > limit and policy.room == "ratio":
                begin_chunk(engine, press)
            if due is not None:
                n = min(n, due)  # compress exactly every compression_interval tokens
            piece = tokens[done : done + n]

            def decode() -> None:
                for start in range(0, len(piece), engine.n_batch):
                    engine.decode(piece[start : start + engine.n_batch])

            if scored:
                _timed(conv, "prefill", decode)
            else:
                decode()
            done += n
            if engine.progress is not None:
                engine.progress(done, len(tokens), "prefill")
    finally:
        end_chunk(engine)  # a chunk not followed by a compression is not scored


def _timed(conv, stage: str, run):
    """``run()``, its seconds added to ``conv.stream_seconds[stage]``."""
    t0 = time.perf_counter()
    try:
        return run()
    finally:
        conv.stream_seconds[stage] += time.perf_counter() - t0


def make_room(engine: Engine, press: Press, trigger: str) -> None:
    """Compress the cache, whatever it holds (composite cells and newer tokens), to free cells.

    With "fill" a full cache frees only what the next chunk needs (and, for presses that score chunks, its
    probe); with "ratio" it keeps the press's ratio of the cells. The cells are ranked by their persisted
    chunk scores (and a streamed prompt's question), or by the attention of the tokens since the last
    compression (captured while they were prefilled) or of the newest tokens, decoded once more with the
    capture on; then rewritten into the kept number of composite cells, which start the cache again.
    """
    engine.check_cache_layers()
    conv, policy = engine.conv, engine.policy
    cells = conv.cells
    scorer, keep, window = room_plan(press, cells)
    persisted = policy.room == "fill" and scores_chunks(press)
    if policy.room == "fill" and not isinstance(press, DecodingPress) and trigger == "cache full":
        keep = engine.shape.n_ctx - engine.chunk * (2 if persisted else 1)
    if keep >= cells or keep < 1 or (trigger == "cache full" and keep >= engine.shape.n_ctx):
        raise ValueError(
            f"Requested tokens ({conv.n_tokens + 1}) exceed context window of {engine.shape.n_ctx}: "
            f"{type(press).__name__} keeps {keep} of {cells} cells"
        )
    t0 = time.perf_counter()
    consensus = 0.0
    asked = None
    unranked = 0  # the newest cells, kept because the question has not ranked them yet
    if question_ranks(engine, scorer):
        # a prompt streaming in: its question ranks the cells
        end_chunk(engine)
        probe = cells_probe(engine, cells)
        unranked = question_skips(engine, keep)
        if unranked:
            asked = ranked_before(engine, probe, unranked)
        else:
            asked = question_probe(
                engine, probe, policy.question_tail, min(policy.question_drafts, scorer.probe().size)
            )
            conv.question_skipped = 0
    if asked is not None:
        measured, consensus = asked, policy.question_consensus
    elif persisted and score_cells(engine):
        end_chunk(engine)
        probe = persisted_probe(engine)
        measured = ProbeSpec(ProbeKind.PERSISTED)
    elif conv.chunk_start is not None and conv.chunk_start >= conv.compressed_len:
        probe, measured = chunk_probe(engine, cells)
    else:
        end_chunk(engine)
        if conv.holes:
            engine.compact()
        probe, measured = recent_probe(engine, scorer, window, cells)
    if measured is not None:
        probe.stand_in(scorer.probe(), measured)  # a full cache cannot run the press's own probe again

    def write(selection: np.ndarray):
        result, origin = rewrite.rewrite_cells(engine, selection, cells)
        return result, origin, False

    compression.compress(
        engine,
        scorer,
        probe,
        keep,
        write,
        name=type(press).__name__,
        ratio=1.0 - keep / cells,
        trigger=trigger,
        probe_queries=measured.size if measured is not None else 0,
        prefill_seconds=0.0,
        probe_seconds=time.perf_counter() - t0,
        consensus=consensus,
        forced=range(cells - unranked, cells - 1),
    )
    if unranked:
        # the kept unranked cells are the newest, last in every head: the question ranks them next time
        conv.question_scores = {agg: v[..., : keep - unranked] for agg, v in conv.question_scores.items()}
        conv.question_skipped += 1


# ---- probes of a full cache ----------------------------------------------------------------------
def cells_probe(engine: Engine, cells: int) -> Probe:
    """A probe of the cache's first ``cells`` cells with no attention yet; norms read on demand."""
    shape = engine.shape
    return Probe(
        shape.n_layer,
        shape.n_head,
        shape.n_head_kv,
        cells,
        norms=lambda part: _native.context_norms(engine.ctx_ptr, part, shape.n_layer, shape.n_head_kv, cells),
        description="none",
    )


def recent_probe(engine: Engine, press: BasePress, window: int, cells: int) -> Tuple[Probe, Optional[ProbeSpec]]:
    """A probe of the cache's ``cells`` cells from the attention of its newest ``window`` tokens, and its spec
    (None for presses without a probe, which score from the cache alone).

    Those tokens are removed and decoded again at the same positions with the capture on (they are the
    newest, so every cell is visible to them); if that fails they are decoded again without it, so the
    cache is as before, and the error propagates.
    """
    probe = cells_probe(engine, cells)
    if press.probe() is None:
        return probe, None
    conv = engine.conv
    w = max(1, min(window, conv.n_tokens - conv.compressed_len, engine.n_batch))
    start = conv.n_tokens - w
    recent = conv.input_ids[start : conv.n_tokens].tolist()
    engine.remove(start)
    conv.n_tokens = start
    try:
        mx, mean = engine.captured(lambda: engine.decode(recent), cells)
    except BaseException:
        engine.remove(start)
        conv.n_tokens = start
        engine.decode(recent)
        raise
    spec = ProbeSpec(ProbeKind.RECENT, w)
    probe.attention[spec] = {"max": mx, "mean": mean}
    probe.description = f"newest {w} tokens"
    return probe, spec


def begin_chunk(engine: Engine, press: Press) -> None:
    """Capture the attention of every token prefilled until the next compression ("ratio"), for presses
    that score streamed chunks: the chunk's tokens are the queries that stand in for the press's probe.
    Other presses keep their window."""
    if engine.conv.chunk_start is not None or engine.capture is None:
        return
    if not scores_chunks(press.base_press if isinstance(press, DecodingPress) else press):
        return
    if engine.conv.holes:
        engine.compact()  # capture columns must be cells 0..cells-1
    engine.capture_begin(engine.shape.n_ctx)
    engine.conv.chunk_start = engine.conv.n_tokens


def end_chunk(engine: Engine):
    """End a chunk capture; its (max, mean) scores over the cache's columns, or None if none ran."""
    if engine.conv.chunk_start is None:
        return None
    engine.conv.chunk_start = None
    engine.capture.end()
    return engine.capture_scores()


def chunk_probe(engine: Engine, cells: int) -> Tuple[Probe, ProbeSpec]:
    """A probe of the cache's ``cells`` cells from the chunk capture (see ``begin_chunk``), and its spec."""
    queries = engine.conv.n_tokens - engine.conv.chunk_start
    mx, mean = end_chunk(engine)
    probe = cells_probe(engine, cells)
    spec = ProbeSpec(ProbeKind.CHUNK, queries)
    probe.attention[spec] = {
        "max": np.ascontiguousarray(mx[..., :cells]),
        "mean": np.ascontiguousarray(mean[..., :cells]),
    }
    probe.description = f"the {queries} tokens since the last compression"
    return probe, spec


def score_cells(engine: Engine) -> bool:
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


def _score_chunk(engine: Engine) -> bool:
    """``score_cells`` for the oldest unscored chunk (False, changing nothing: no room for its probe)."""
    conv, shape = engine.conv, engine.shape
    cells = conv.cells
    first = conv.scored_cells
    single = max(first, conv.compressed_cells)  # the first unscored cell that holds one token
    if single < cells:
        start = conv.n_tokens - (cells - single)
        queries = conv.input_ids[start : start + min(cells - single, engine.chunk)].tolist()
        scored = single + len(queries)  # (composite cells without scores before them are scored too)
    else:  # composite cells without scores (a restored session or state) are scored by the newest tokens
        queries = conv.input_ids[max(0, conv.n_tokens - engine.chunk) : conv.n_tokens].tolist()
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


def persisted_probe(engine: Engine) -> Probe:
    """A probe of every cell from its persisted score (see ``score_cells``)."""
    cells = engine.conv.cells
    probe = cells_probe(engine, cells)
    scores = engine.conv.cell_scores
    probe.attention[ProbeSpec(ProbeKind.PERSISTED)] = {
        "max": scores["max"][..., :cells],
        "mean": scores["mean"][..., :cells],
    }
    probe.description = "each chunk's reconstruct probe, persisted"
    return probe
