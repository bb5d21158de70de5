"""The engine: the llama.cpp context and batch a Llama decodes with, its attention capture, the model's
shape and the conversation's bookkeeping. Probing, rewriting, compression and sessions work on it, never
on the ``Llama`` itself."""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import llama_cpp
import numpy as np

from . import _capture, _native
from .presses.press import Press
from .streaming import StreamPolicy, check_cache, frees_cells
from .support import ModelShape, check_cache_layers, window_fits

SEQ = 0  # llama-cpp-python keeps every token in sequence 0


@dataclass
class Conversation:
    """
    The logical token history and how the cache holds it, and what the last compression measured.

    ``Llama.n_tokens``, ``input_ids`` and ``_requires_eval`` (llama-cpp-python's own bookkeeping) are
    this object's fields, so llama-cpp-python's code and ours keep one history.
    """

    input_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intc))
    n_tokens: int = 0
    requires_eval: bool = True
    limit: int = 0  # logical length a conversation may reach (llama-cpp-python's _n_ctx)
    compressed_len: int = 0  # logical tokens [0, compressed_len) are held by composite cells ...
    compressed_cells: int = 0  # ... this many; every later token has one cell of its own
    holes: bool = False  # token-level eviction left free cells between kept ones
    origin: Optional[np.ndarray] = None  # positions the composite cells hold (layers, kv_heads, C)
    phase: str = "prefill"  # "decode" once generate has produced its first token
    mark: int = 0  # logical length at the last compression or at the start of decoding
    chunk_start: Optional[int] = None  # logical position where a chunk capture began
    # per-cell scores that persist through rewrites (reconstruct-probe presses): {"max", "mean"} each
    # float32 (layers, heads, scored_cells), the probe attention each cell got when its chunk was probed
    cell_scores: Optional[Dict[str, np.ndarray]] = None
    # what the last compression measured and kept (Llama.kv_stats, kv_selection, kv_scores, kv_head_scores)
    stats: Dict[str, Any] = field(default_factory=dict)
    selection: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None
    head_scores: Optional[np.ndarray] = None
    compressions: int = 0  # compressions made to free cells since the conversation began
    # the newest prompt's last tokens (where a question usually is), which rank the cells at compressions
    # that make room while that prompt streams in (lookahead presses, kv_room="fill"; see probing.question_probe)
    question: Optional[List[int]] = None
    # the highest attention each cell got from that question at the compressions made so far, as cell_scores
    # (see probing.question_probe): a cell ranked high once is not dropped by a later round's weaker probe
    question_scores: Optional[Dict[str, np.ndarray]] = None
    # the tokens the model last wrote greedily after that question, which the next round checks and reuses
    # (see probing.question_probe)
    question_drafts: Optional[List[int]] = None
    question_skipped: int = 0  # compressions since that question's probe last ran (StreamPolicy.question_every)
    # seconds spent since the conversation began decoding streamed chunks, and probing them (kv_room="fill")
    stream_seconds: Dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "probe": 0.0})

    @property
    def cells(self) -> int:
        """Cells the conversation occupies in the cache."""
        return self.compressed_cells + self.n_tokens - self.compressed_len

    @property
    def scored_cells(self) -> int:
        """Cells [0, scored_cells) have persisted scores; the later ones have not been probed yet."""
        return 0 if self.cell_scores is None else int(self.cell_scores["max"].shape[-1])

    def history(self) -> List[int]:
        return self.input_ids[: self.n_tokens].tolist()

    def resize(self, limit: int) -> None:
        """Room for ``limit`` tokens of history (never less than the history held)."""
        limit = max(limit, self.n_tokens)
        if len(self.input_ids) != limit:
            history = np.zeros(limit, dtype=np.intc)
            history[: self.n_tokens] = self.input_ids[: self.n_tokens]
            self.input_ids = history

    def restart(self) -> None:
        """An empty conversation (the cache was cleared)."""
        self.n_tokens = 0
        self.requires_eval = True
        self.forget_compression()
        self.mark = self.compressions = 0
        self.phase = "prefill"  # what goes in next is a prompt until generate samples from it
        # (the question stays: llama-cpp-python's generate resets the cache after our prompt hook set it)
        self.stream_seconds = {"prefill": 0.0, "probe": 0.0}

    def forget_compression(self) -> None:
        """The cache holds one cell per token again."""
        self.compressed_len = self.compressed_cells = 0
        self.holes = False
        self.origin = None
        self.cell_scores = None
        self.question_scores = None
        self.question_drafts = None

    def ask(self, question: Optional[List[int]]) -> None:
        """``question`` ranks the cells at compressions from now on (None: nothing does); the attention
        an earlier question gave them is forgotten."""
        self.question = question
        self.question_scores = None
        self.question_drafts = None
        self.question_skipped = 0

    def restored(
        self,
        tokens: Sequence[int],
        compressed_len: int,
        compressed_cells: int,
        origin: Optional[np.ndarray],
        cell_scores: Optional[Dict[str, np.ndarray]] = None,
    ) -> None:
        """Bookkeeping for cells just restored: the token history and what of it is composite."""
        self.ask(None)
        if len(tokens) > len(self.input_ids):
            self.input_ids = np.zeros(len(tokens), dtype=np.intc)
        self.input_ids[: len(tokens)] = tokens
        self.n_tokens = len(tokens)
        self.compressed_len = self.mark = int(compressed_len)
        self.compressed_cells = int(compressed_cells)
        self.origin = origin  # None for a session file: kv_selection reports -1 for its composite cells
        self.cell_scores = cell_scores
        self.requires_eval = True


class Engine:
    """
    Owns what compression works on: a Llama's llama.cpp context and batch (owned, for freeing, by
    llama-cpp-python's ``Llama``), the attention capture installed as the context's eval callback,
    the model's shape and the :class:`Conversation`.

    Parameters
    ----------
    ctx : llama_cpp._internals.LlamaContext
    batch : llama_cpp._internals.LlamaBatch
    capture : _capture.Capture or None
        None for models whose cache cannot be compressed.
    shape : ModelShape
    conversation : Conversation
    n_batch : int
        Tokens per ``llama_decode`` call.
    n_ubatch : int
        Tokens per micro-batch (iSWA models need a window and one of them in the sliding-window cache).
    max_tokens : int
        Logical length a conversation may reach when the press can make room (``kv_max_tokens``).
    policy : StreamPolicy
        How a full cache makes room (``Llama(kv_stream=...)``).
    unsupported : str, optional
        Why the model's cache cannot be compressed (None: it can).
    logits_rows : np.ndarray, optional
        llama-cpp-python's ``scores`` array when every token's logits are kept (``logits_all``).
    """

    def __init__(
        self,
        ctx,
        batch,
        capture: Optional[_capture.Capture],
        shape: ModelShape,
        conversation: Conversation,
        n_batch: int,
        n_ubatch: int,
        max_tokens: int,
        policy: StreamPolicy,
        unsupported: Optional[str] = None,
        logits_rows: Optional[np.ndarray] = None,
    ) -> None:
        self.ctx = ctx
        self.batch = batch
        self.capture = capture
        self.shape = shape
        self.conv = conversation
        self.n_batch = n_batch
        self.n_ubatch = n_ubatch
        self.max_tokens = max_tokens
        self.unsupported = unsupported
        self.logits_rows = logits_rows
        self.press: Optional[Press] = None  # Llama.kv_compress
        self.set_policy(policy)
        self.room_override: Optional[Press] = None  # compress_context's press while it streams a context
        self.progress: Optional[Callable[[int, int, str], None]] = None
        self._layers_checked = False

    # ---- configuration --------------------------------------------------------------------------
    def check_supported(self) -> None:
        """NotImplementedError naming the architecture when this model's cache cannot be compressed."""
        if self.unsupported is not None:
            raise NotImplementedError(self.unsupported)

    def set_press(self, press: Optional[Press]) -> None:
        """Compress with ``press`` from now on (None: never); refuses presses this model or cache cannot use."""
        if press is not None:
            if not isinstance(press, Press):
                raise TypeError(f"kv_compress must be a press such as KVComposePress(...) or None, got {press!r}")
            self.check_supported()
            check_cache(press, self.shape.n_ctx)
        self.press = press
        self.configure_window()

    def set_policy(self, policy: StreamPolicy) -> None:
        """Stream with ``policy`` from now on; ValueError (nothing changed) when its chunk cannot fit twice."""
        # tokens per streamed chunk: a full cache keeps n_ctx - 2 chunks, so 3/4 of it with n_ctx // 8
        self.chunk = policy.chunk_for(self.shape.n_ctx, self.n_batch)
        self.policy = policy

    def configure_window(self, press: Optional[Press] = None) -> None:
        """Size the token history and the logical limit for ``press`` (default: ``self.press``).

        llama-cpp-python refuses prompts and stops generations at the limit; with a press that can
        free cells it is ``max_tokens`` instead of the cache size. ``logits_all`` keeps one row of
        logits per cell of ``n_ctx``, so it keeps the cache size as the limit. The limit never drops
        below the conversation held now: nothing is lost by changing the press.
        """
        press = self.press if press is None else press
        limit = self.shape.n_ctx
        if frees_cells(press) and self.logits_rows is None and window_fits(self.shape, self.n_ubatch):
            limit = max(limit, self.max_tokens)
        limit = max(limit, self.conv.n_tokens)
        self.conv.resize(limit)
        self.conv.limit = limit

    # ---- the cache ------------------------------------------------------------------------------
    @property
    def ctx_ptr(self):
        return self.ctx.ctx

    def memory(self):
        return llama_cpp.llama_get_memory(self.ctx.ctx)

    def remove(self, start: int, stop: int = -1) -> bool:
        """Remove the conversation's cells at positions [start, stop) (stop -1: to the end)."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory(), SEQ, int(start), int(stop)))

    def pos_max(self) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.memory(), SEQ))

    def state_info(self) -> Dict[str, Any]:
        return _native.context_state_info(self.ctx.ctx)

    def clear(self) -> None:
        """Empty the cache and start a new conversation."""
        llama_cpp.llama_memory_clear(self.memory(), False)
        self.conv.restart()

    def check_cache_layers(self) -> None:
        """Once: the cache has the layers compression expects (only iSWA models can differ)."""
        if self._layers_checked or self.conv.n_tokens == 0 or not self.shape.iswa:
            return  # without sliding-window layers, the compressed layers are every layer by construction
        check_cache_layers(self.shape, self.state_info())
        self._layers_checked = True

    def compact(self) -> None:
        """Move the cells left by token-level eviction together (same contents, same positions)."""
        cells = self.conv.cells
        identity = np.broadcast_to(np.arange(cells, dtype=np.int32), (self.shape.n_layer, self.shape.n_head_kv, cells))
        _native.context_compose(self.ctx.ctx, np.ascontiguousarray(identity))
        self.conv.holes = False

    def seq_bytes(self) -> bytes:
        """The conversation's cells as ``llama_state_seq_get_data`` writes them (b"" when empty)."""
        if self.conv.cells == 0:
            return b""
        if self.conv.holes:
            self.compact()  # what llama.cpp restores has no holes either
        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, SEQ)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx.ctx, buf, size, SEQ) != size:
            raise RuntimeError("llama_state_seq_get_data did not write the whole sequence state")
        return bytes(buf)

    def set_seq_bytes(self, data: bytes) -> bool:
        """Replace the conversation's cells by ``data`` (``seq_bytes`` output); False if llama.cpp refuses."""
        self.remove(-1, -1)
        self.conv.holes = False
        if not data:
            return True
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self.ctx.ctx, buf, len(data), SEQ) == len(data)

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, batch: List[int], all_logits: bool = False) -> None:
        """Decode ``batch`` at the next logical positions and record it in the history (``all_logits``:
        every row's logits, not only the last one's)."""
        conv = self.conv
        n_past = conv.n_tokens
        self.batch.set_batch(batch=batch, n_past=n_past, logits_all=all_logits or self.logits_rows is not None)
        status = llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if status == 1 and conv.holes:
            # 1: no run of free cells is long enough; token-level eviction scattered them
            self.compact()
            status = llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        if self.logits_rows is not None:
            n_vocab = self.logits_rows.shape[1]
            logits = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(batch) * n_vocab,))
            self.logits_rows[n_past : n_past + len(batch), :].reshape(-1)[::] = logits
        conv.input_ids[n_past : n_past + len(batch)] = batch
        conv.n_tokens = n_past + len(batch)
        conv.requires_eval = False

    def prefill(self, tokens: Sequence[int], information: Optional[np.ndarray] = None) -> None:
        """Decode ``tokens`` after the history in batches of ``n_batch``, reporting progress.

        ``information`` (float32, one per token): filled with each token's self-information
        ``-log p(token | the tokens before it)`` in nats, from the logits of every row. The first
        token's comes from the newest decode's last row (the caller's history must have left it), and
        is 0 at the start of the sequence, which nothing predicts."""
        tokens = list(tokens)
        self.ctx.kv_cache_seq_rm(-1, self.conv.n_tokens, -1)
        if information is not None and tokens:
            n_vocab = self.ctx.model.n_vocab()
            information[0] = 0.0
            if self.conv.n_tokens:
                last = np.ctypeslib.as_array(self.ctx.get_logits_ith(-1), shape=(1, n_vocab))
                information[0] = surprisal(last, tokens[:1])[0]
        # every row's logits: llama.cpp keeps a buffer of batch x vocabulary floats for them, so a measuring
        # prefill goes 128 rows at a time (Gemma 3's vocabulary: 134 MB, where n_batch=512 would hold 0.5 GB)
        step = self.n_batch if information is None else min(self.n_batch, INFORMATION_ROWS)
        for start in range(0, len(tokens), step):
            batch = tokens[start : start + step]
            self.decode(batch, all_logits=information is not None)
            if information is not None:
                # row i predicts token start + i + 1; the last token's row predicts nothing
                follow = tokens[start + 1 : start + len(batch) + 1]
                logits = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(batch), n_vocab))
                information[start + 1 : start + 1 + len(follow)] = surprisal(logits[: len(follow)], follow)
            if self.progress is not None:
                self.progress(min(start + step, len(tokens)), len(tokens), "prefill")

    # ---- attention capture ----------------------------------------------------------------------
    def capture_begin(self, n_keys: int, head_rows: int = 0, pooled_rows: int = 0) -> None:
        """Start capturing the attention of every model layer over ``n_keys`` cache columns; the first
        ``head_rows`` query rows are pooled apart as well (``capture_scores(head=True)``); with ``pooled_rows``,
        the query rows after the first ``pooled_rows`` are not pooled (a batch's padding)."""
        self.capture.begin(self.shape.n_model_layers, self.shape.n_head, n_keys, head_rows, pooled_rows)

    def capture_scores(self, head: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The capture's (max, mean) head scores of the compressed layers, ``[n_layer, n_head, n_keys]``;
        ``head``: of its head rows alone.

        Sliding-window layers attend to their own cache, whose columns are other cells: dropped."""
        mx, mean = self.capture.scores("max", head), self.capture.scores("mean", head)
        if self.shape.n_layer == self.shape.n_model_layers:
            return mx, mean
        layers = self.shape.layers
        return np.ascontiguousarray(mx[layers]), np.ascontiguousarray(mean[layers])

    def captured(
        self, run: Callable[[], Any], n_keys: int, head_rows: int = 0, pooled_rows: int = 0
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Run ``run()`` with the attention capture on; return its (max, mean) head scores (and keep those of
        the first ``head_rows`` query rows for ``capture_scores(head=True)``; ``pooled_rows``: of the first
        ``pooled_rows`` query rows alone)."""
        self.capture_begin(n_keys, head_rows, pooled_rows)
        try:
            run()
        finally:
            if self.capture.active:
                self.capture.end()
        return self.capture_scores()

    def end_capture_quietly(self) -> None:
        """End a capture left running by a failure (its scores are not wanted)."""
        if self.capture is not None and self.capture.active:
            with contextlib.suppress(Exception):
                self.capture.end()


#: The most rows a prefill that measures self-information decodes at once (see ``Engine.prefill``).
INFORMATION_ROWS = 128


def surprisal(logits: np.ndarray, tokens: Sequence[int], rows: int = 64) -> np.ndarray:
    """``-log softmax(logits)[i, tokens[i]]`` per row, float32, ``rows`` rows at a time (a batch's logits are
    ``n_batch x n_vocab`` floats; their exponentials are not all held at once)."""
    out = np.empty(len(tokens), dtype=np.float32)
    for start in range(0, len(tokens), rows):
        block = logits[start : start + rows]
        peak = block.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(block - peak).sum(axis=1)) + peak[:, 0]
        out[start : start + rows] = log_sum - block[np.arange(len(block)), tokens[start : start + rows]]
    return out
