"""``Llama``: the ``llama_cpp.Llama`` facade. Its public API, the ``generate``/``eval`` overrides that
put compression into llama-cpp-python's paths, and delegation to the rooms that do the work
(``engine``, ``probing``, ``rewrite``, ``compression``, ``streaming``, ``support``, ``session``)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import inspect
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import llama_cpp
import llama_cpp._internals as internals
import numpy as np

from . import _capture, _native, compression, probing, session, streaming, support
from .engine import Conversation, Engine
from .models import default_model_path
from .presses.base_press import BasePress
from .presses.press import Press
from .probe import QUESTION_TOKENS_KEPT, Probe
from .streaming import StreamPolicy

_GENERATE_SIGNATURE = inspect.signature(llama_cpp.Llama.generate)


def _conversation_field(name: str, doc: str) -> property:
    """An attribute of llama-cpp-python's ``Llama`` kept in the :class:`Conversation` (one history for both)."""
    return property(lambda self: getattr(self._kv, name), lambda self, value: setattr(self._kv, name, value), doc=doc)


class Llama(llama_cpp.Llama):
    """
    ``llama_cpp.Llama`` with KV-cache compression.

    Every prompt of at least ``kv_compress.min_tokens`` tokens that goes through ``generate`` (so
    ``__call__``, ``create_completion`` and ``create_chat_completion``, streaming or not) is
    prefilled, scored by the press, and its cache rewritten to ``C`` composite cells. The last
    prompt token is held back and decoded on the compressed cache, so the first generated token
    already comes from it. Positions continue from the prompt's logical length.

    Parameters
    ----------
    model_path : str or os.PathLike, optional
        A GGUF file; the embedded SmolLM2-135M-Instruct when omitted.
    kv_compress : BasePress, DecodingPress or PrefillDecodingPress, optional
        The press, e.g. ``KVComposePress(compression_ratio=0.75)``; None disables compression.
        A press that frees cells (ratio > 0, or a DecodingPress) also lets prompts and generations
        run past ``n_ctx``: whenever the cache is full it is compressed to make room.
    kv_max_tokens : int, optional
        Logical length (prompt + generated tokens, i.e. positions) a conversation may reach when
        the press can make room; defaults to the larger of ``n_ctx`` and the model's trained context.
    kv_progress : callable, optional
        ``kv_progress(done, total, stage)`` after every batch of prompt tokens: ``stage`` is
        ``"prefill"``, or ``"probe"`` for KVCompose's reconstruct pass over the prompt.
    kv_stream : StreamPolicy, optional
        How a full cache makes room (documents longer than ``n_ctx``, long generations); default
        ``StreamPolicy()``: "fill" (see :class:`~pykvcompose.streaming.StreamPolicy`).
    kv_room : {"fill", "ratio"}, optional
        Shorthand for ``kv_stream``'s ``room``.
    kv_chunk : int, optional
        Shorthand for ``kv_stream``'s ``chunk``: tokens per streamed chunk with "fill"; default
        ``min(256, n_batch, n_ctx // 8)`` (a full cache keeps ``n_ctx - 2 * kv_chunk`` cells).
    n_threads : int, optional
        Defaults to the cores this process may use.
    **kwargs
        Everything ``llama_cpp.Llama`` accepts.

    Attributes
    ----------
    kv_stats : dict
        Measurements of the last compression (empty before the first).
    kv_selection : np.ndarray or None
        int32 (layers, kv_heads, C): the original (logical) positions each head kept, ascending, after
        the last compression; after compressions that made room, the positions the cells hold now.
    kv_head_scores : np.ndarray or None
        float32 (layers, heads, tokens): the probe attention of the last compression, per query
        head, aggregated over probe queries with the press's ``agg_task``.
    kv_scores : np.ndarray or None
        float32 (layers, kv_heads, tokens): the press's token scores of the last compression.
    kv_compressions : int
        Compressions made to free cells (long prompts, long generations) since the last prompt
        that did not continue the conversation.
    kv_layers : list of int
        Model layers whose cache is compressed (iSWA models: the global layers).
    """

    # llama-cpp-python's own bookkeeping, shared with the engine through the Conversation
    n_tokens = _conversation_field("n_tokens", "Logical length of the conversation (the next token's position).")
    input_ids = _conversation_field("input_ids", "The token history (sized for the logical limit).")
    _requires_eval = _conversation_field("requires_eval", "The next generate must decode its last prompt token.")
    _n_ctx = _conversation_field("limit", "The logical limit on prompts and generations.")
    kv_stats = _conversation_field("stats", "Measurements of the last compression (empty before the first).")
    kv_selection = _conversation_field("selection", "Positions each head kept at the last compression.")
    kv_scores = _conversation_field("scores", "Token scores of the last compression.")
    kv_head_scores = _conversation_field("head_scores", "Probe attention of the last compression.")
    kv_compressions = _conversation_field("compressions", "Compressions made to free cells.")

    def __init__(
        self,
        model_path: Optional[Union[str, os.PathLike]] = None,
        *,
        kv_compress: Optional[Press] = None,
        kv_max_tokens: Optional[int] = None,
        kv_progress: Optional[Callable[[int, int, str], None]] = None,
        kv_stream: Optional[StreamPolicy] = None,
        kv_room: Optional[str] = None,
        kv_chunk: Optional[int] = None,
        n_threads: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if model_path is None:
            model_path = default_model_path()
        model_path = os.fspath(model_path)  # a pathlib.Path too (llama-cpp-python takes str only)
        if n_threads is None:
            n_threads = support.default_threads()
        self._kv = Conversation()  # before llama_cpp.Llama.__init__, which sets n_tokens and input_ids
        self._kv_capture: Optional[_capture.Capture] = None
        self._engine: Optional[Engine] = None
        self._kv_bytes_per_cell: Optional[int] = None
        if kv_max_tokens is not None and (
            isinstance(kv_max_tokens, bool) or not isinstance(kv_max_tokens, int) or kv_max_tokens < 1
        ):
            raise ValueError(f"kv_max_tokens must be a positive integer, got {kv_max_tokens!r}")
        if kv_stream is not None and not isinstance(kv_stream, StreamPolicy):
            raise TypeError(f"kv_stream must be a StreamPolicy, got {kv_stream!r}")
        policy = kv_stream or StreamPolicy()
        overrides = {k: v for k, v in (("room", kv_room), ("chunk", kv_chunk)) if v is not None}
        policy = dataclasses.replace(policy, **overrides) if overrides else policy  # validated here
        self.kv_session_metadata: Dict[str, Any] = {}
        super().__init__(model_path=model_path, n_threads=n_threads, **kwargs)

        model = self._model.model
        shape = support.model_shape(model, self.metadata, self.n_ctx())
        unsupported = support.why_unsupported(model, self.metadata, shape)
        if unsupported is None:
            self._install_capture()  # flash attention too: the capture recomputes its probabilities
        try:
            self._engine = Engine(
                self._ctx,
                self._batch,
                self._kv_capture,
                shape,
                self._kv,
                n_batch=self.n_batch,
                n_ubatch=int(self.context_params.n_ubatch),
                max_tokens=int(llama_cpp.llama_model_n_ctx_train(model)) if kv_max_tokens is None else kv_max_tokens,
                policy=policy,
                unsupported=unsupported,
                logits_rows=self.scores if self._logits_all else None,
            )
        except ValueError:
            self.close()  # a chunk too large for this n_ctx
            raise
        self._engine.progress = kv_progress
        self.kv_compress = kv_compress

    def _install_capture(self) -> None:
        """Recreate the context with the native attention capture as its eval callback.

        llama-cpp-python has no cb_eval argument; the callback is a C function, so decoding pays
        nothing for it unless a capture is active.
        """
        self._kv_capture = _capture.Capture()
        self._kv_capture.set_n_threads(self.context_params.n_threads)
        self._kv_cb_eval = llama_cpp.ggml_backend_sched_eval_callback(_native.EVAL_CALLBACK_ADDRESS)
        self.context_params.cb_eval = self._kv_cb_eval
        self.context_params.cb_eval_user_data = ctypes.c_void_p(self._kv_capture.address)
        self._ctx.close()  # free the first context's cache before allocating the new one
        self._ctx = self._stack.enter_context(
            contextlib.closing(
                internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)
            )
        )
        if getattr(self, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
            scales = (ctypes.c_float * 1)(self.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                raise RuntimeError(f"Failed to set LoRA adapter from lora path: {self.lora_path}")

    # ---- configuration ------------------------------------------------------------------------
    @property
    def kv_compress(self) -> Optional[Press]:
        """The press applied to prompts (None: no compression). Assignable."""
        return self._engine.press

    @kv_compress.setter
    def kv_compress(self, press: Optional[Press]) -> None:
        self._engine.set_press(press)

    @property
    def kv_progress(self) -> Optional[Callable[[int, int, str], None]]:
        """``kv_progress(done, total, stage)`` after every batch of prompt tokens (None: silent). Assignable."""
        return self._engine.progress

    @kv_progress.setter
    def kv_progress(self, callback: Optional[Callable[[int, int, str], None]]) -> None:
        self._engine.progress = callback

    @property
    def kv_stream(self) -> StreamPolicy:
        """How a full cache makes room (see :class:`~pykvcompose.streaming.StreamPolicy`)."""
        return self._engine.policy

    @kv_stream.setter
    def kv_stream(self, policy: StreamPolicy) -> None:
        if not isinstance(policy, StreamPolicy):
            raise TypeError(f"kv_stream must be a StreamPolicy, got {policy!r}")
        self._engine.set_policy(policy)

    @property
    def kv_room(self) -> str:
        """How a full cache makes room: "fill" or "ratio" (``kv_stream.room``)."""
        return self._engine.policy.room

    @property
    def kv_chunk(self) -> int:
        """Tokens per streamed chunk."""
        return self._engine.chunk

    @property
    def kv_stream_seconds(self) -> Dict[str, float]:
        """Seconds this conversation spent decoding streamed chunks (``"prefill"``) and probing them
        (``"probe"``) with ``kv_room="fill"``."""
        return dict(self._kv.stream_seconds)

    @property
    def kv_cell_scores(self) -> Optional[np.ndarray]:
        """float32 (layers, heads, cells): the persisted score (max attention of its chunk's probe) of every
        cell that has one, in cache order; None when the cells carry none."""
        scores = self._kv.cell_scores
        return None if scores is None else scores["max"]

    @property
    def kv_layers(self) -> List[int]:
        """Model layers whose cache is compressed (iSWA models: the global layers)."""
        return self._engine.shape.layers

    kv_n_layer = property(lambda self: self._engine.shape.n_layer, doc="Layers of the compressed cache.")
    kv_n_head = property(lambda self: self._engine.shape.n_head, doc="Query heads per layer.")
    kv_n_head_kv = property(lambda self: self._engine.shape.n_head_kv, doc="Key/value heads per layer.")

    @property
    def kv_cells(self) -> int:
        """Cells the conversation occupies in the cache now (at most ``n_ctx``)."""
        return self._kv.cells

    def kv_memory(self) -> Dict[str, int]:
        """
        What the cache holds now against what the same conversation takes uncompressed.

        Returns
        -------
        dict
            ``cells`` (used), ``n_ctx`` (cells in the cache), ``tokens`` (logical length),
            ``kv_bytes`` (K and V of the used cells), ``kv_bytes_uncompressed`` (one cell per token).
        """
        if self._kv_bytes_per_cell is None and self.kv_cells > 0:
            info = self._engine.state_info()
            self._kv_bytes_per_cell = info["kv_bytes"] // max(1, info["n_cells"])
        per_cell = self._kv_bytes_per_cell or 0
        return {
            "cells": self.kv_cells,
            "n_ctx": self._engine.shape.n_ctx,
            "tokens": self.n_tokens,
            "kv_bytes": per_cell * self.kv_cells,
            "kv_bytes_uncompressed": per_cell * self.n_tokens,
        }

    @property
    def kv_history(self) -> List[int]:
        """The logical token history: every token of the conversation, compressed or not."""
        return self._kv.history()

    # ---- llama_cpp.Llama overrides --------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._kv.restart()

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """``llama_cpp.Llama.generate``, compressing the prompt first when the press applies."""
        bound = _GENERATE_SIGNATURE.bind(self, tokens, *args, **kwargs)
        tokens = list(tokens)
        self._kv.phase = "prefill"
        if bound.arguments.get("reset", True):
            self._prepare_prompt(tokens)
        inner = super().generate(tokens, *args, **kwargs)
        try:
            try:
                token = next(inner)
            finally:
                self._kv.ask(None)  # the prompt is in (or failed): its question ranks nothing after it
            # the prompt is in: what follows is decoding (DecodingPress counts from here)
            self._kv.phase = "decode"
            self._kv.mark = max(self._kv.mark, self.n_tokens)
            while True:
                sent = yield token
                token = inner.send(sent)
        except StopIteration:
            return
        finally:
            inner.close()

    def eval(self, tokens: Sequence[int]) -> None:
        """``llama_cpp.Llama.eval`` that compresses the cache whenever it is full (or a DecodingPress is due).

        Without a press that frees cells this is llama-cpp-python's own ``eval``.
        """
        if self._logits_all or (streaming.room_press(self._engine) is None and self.kv_progress is None):
            return super().eval(tokens)
        streaming.stream(self._engine, tokens)

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        state.kv_compressed_len = self._kv.compressed_len  # the cache holds composite cells up to here
        state.kv_compressed_cells = self._kv.compressed_cells
        state.kv_origin = self._kv.origin
        state.kv_cell_scores = self._kv.cell_scores
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        super().load_state(state)
        self._engine.configure_window()  # the saved history may be sized for another press
        conv = self._kv
        if hasattr(state, "kv_compressed_len"):
            conv.compressed_len = int(state.kv_compressed_len)
            conv.compressed_cells = int(state.kv_compressed_cells)
            conv.origin = getattr(state, "kv_origin", None)
            conv.cell_scores = getattr(state, "kv_cell_scores", None)
        else:
            # a state saved elsewhere may hold composite cells we cannot tell apart: assume it all is
            conv.compressed_len = state.n_tokens
            conv.compressed_cells = self._engine.state_info()["n_cells"] if state.n_tokens else 0
            conv.origin = None
            conv.cell_scores = None
        conv.holes = False  # llama.cpp restores a whole-context state into cells 0..n-1
        conv.mark = conv.compressed_len

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may have failed before llama_cpp.Llama set it up
            super().close()
        if self._kv_capture is not None:
            self._kv_capture.close()  # after the context that points at it

    # ---- sessions on disk ----------------------------------------------------------------------
    def save_session(self, path: Union[str, os.PathLike], metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """
        Save the conversation: its (compressed) cache, the whole token history, the press and the
        model's fingerprint. Written atomically: an existing file is replaced only when complete.

        Parameters
        ----------
        path : str or PathLike
        metadata : dict, optional
            JSON-serialisable data kept with the session (e.g. the chat messages), returned by
            ``kv_session_metadata`` after loading.

        Returns
        -------
        dict
            ``path``, ``file_bytes``, ``cells``, ``n_tokens``.
        """
        return session.save(self, path, metadata)

    @session.instance_or_class
    def load_session(
        self_or_cls, path: Union[str, os.PathLike], model_path: Optional[str] = None, **kwargs: Any
    ) -> Llama:
        """
        Continue a saved conversation.

        ``Llama.load_session(path, model_path=None, **kwargs)`` creates a Llama for it (the model path,
        ``n_ctx`` and press recorded in the file unless given); ``llm.load_session(path)`` loads it into
        this instance, which adopts the session's press. A file for another model, a truncated or
        damaged file raises :class:`~pykvcompose.session.SessionError` and leaves the instance as it was.

        Returns
        -------
        Llama
        """
        return session.load(self_or_cls, path, model_path, **kwargs)

    # ---- compression ------------------------------------------------------------------------
    def _prepare_prompt(self, tokens: List[int]) -> None:
        if len(tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
        self._kv.ask(tokens[-QUESTION_TOKENS_KEPT:])  # kept through the cache resets below
        if self._kv.compressed_len > 0:
            if self._parent_reuse(tokens) >= self._kv.compressed_len:
                return  # the prompt extends what the compressed cache holds: continue on it
            # composite cells cannot be cut at a token boundary: start again from the original tokens
            self._drop_cache()
        press = streaming.prompt_press(self.kv_compress)
        fits = len(tokens) < self._engine.shape.n_ctx  # longer prompts are compressed chunk by chunk in eval
        if press is not None and fits and len(tokens) >= max(2, press.min_tokens):
            compression.compress_prompt(self._engine, press, tokens[:-1])
            self.kv_stats["tokens"] = len(tokens)  # the last prompt token is decoded on the compressed cache

    def _parent_reuse(self, tokens: List[int]) -> int:
        """How many cached tokens ``llama_cpp.Llama.generate`` will keep for this prompt."""
        history = self.input_ids[: self.n_tokens]
        lcp = 0
        for a, b in zip(history, tokens):
            if a != b:
                break
            lcp += 1
        consumed = lcp == len(tokens)
        if consumed and self.n_tokens == len(tokens) and not self._requires_eval:
            return lcp
        return lcp - 1 if consumed else lcp

    def _drop_cache(self) -> None:
        self._engine.clear()

    def compress_context(self, tokens: Sequence[int], press: Optional[BasePress] = None) -> Dict[str, Any]:
        """
        Prefill ``tokens`` and compress them all (question-agnostic compression): a later prompt that
        starts with ``tokens`` continues on the compressed cache, so a question asked afterwards has
        not influenced what was kept.

        Parameters
        ----------
        tokens : sequence of int
            The context; its last token is kept in every head.
        press : BasePress, optional
            Defaults to ``kv_compress``. ``KVComposePress(scoring="auto")`` (the default) scores by the
            reconstruct probe here, plus the sentences' self-information at ratios from 0.5 on
            (:func:`pykvcompose.streaming.question_agnostic`); ``scoring="reconstruct"`` is KVCompose as
            published.

        Returns
        -------
        dict
            ``kv_stats`` of this compression.
        """
        if press is None:
            press = streaming.prompt_press(self.kv_compress)
        tokens = list(tokens)
        self._engine.check_supported()
        if not isinstance(press, BasePress):
            raise ValueError(f"no press: pass one such as KVComposePress(...) or set kv_compress (got {press!r})")
        press = streaming.question_agnostic(press)
        self._kv.ask(None)  # no prompt: the context streams in without a question
        if len(tokens) < 2:
            raise ValueError(f"a context to compress needs at least 2 tokens, got {len(tokens)}")
        engine = self._engine
        if len(tokens) + 1 < engine.shape.n_ctx:
            return compression.compress_prompt(engine, press, tokens)
        if not streaming.frees_cells(press):
            raise ValueError(
                f"Requested tokens ({len(tokens)}) exceed context window of {engine.shape.n_ctx}: "
                f"{type(press).__name__} with compression_ratio {press.compression_ratio} cannot free cells"
            )
        # longer than the cache: prefill chunk by chunk, freeing cells with this press, then compress it all
        self._drop_cache()
        engine.configure_window(press)
        if len(tokens) + 1 >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
        engine.room_override = press
        try:
            self.eval(tokens)
            streaming.make_room(engine, press, "context")
        finally:
            engine.room_override = None
        return self.kv_stats

    def kv_probe(self, context: Sequence[int], presses: Sequence[BasePress]) -> Probe:
        """
        Prefill ``context`` into an empty cache and run every probe the presses need, once.

        Window probes are read while their tokens are prefilled (no extra pass); a lookahead probe
        decodes the model's greedy continuation of the context (a few tokens, then removed); the
        reconstruct probe feeds the context again after itself. The cache afterwards holds exactly the plain
        prefill of ``context``, so one probe serves several presses (restore the cache with
        ``save_state``/``load_state`` between ``kv_apply`` calls).

        Returns
        -------
        Probe
        """
        return probing.probe_context(self._engine, context, presses)

    def kv_apply(self, press: BasePress, probe: Probe) -> Dict[str, Any]:
        """
        Score the context held in the cache with ``press``, select and rewrite the cache.

        The cache must hold exactly the plain prefill that ``probe`` was measured on (``kv_probe``).
        Composite cells (``press.per_head``) are written by the native core; token-level presses
        are applied with llama.cpp's own ``llama_memory_seq_rm``.

        Returns
        -------
        dict
            ``kv_stats``.
        """
        self._engine.check_supported()
        return compression.apply(self._engine, press, probe)
