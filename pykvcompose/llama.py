"""``Llama``: ``llama_cpp.Llama`` whose prompts are compressed after prefill."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import inspect
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import llama_cpp
import llama_cpp._internals as internals
import numpy as np

from . import _native
from .models import default_model_path
from .presses.base_press import BasePress
from .presses.decoding_press import DecodingPress
from .presses.prefill_decoding_press import PrefillDecodingPress
from .probe import Probe

#: What ``kv_compress`` accepts.
AnyPress = Union[BasePress, DecodingPress, PrefillDecodingPress]

_GENERATE_SIGNATURE = inspect.signature(llama_cpp.Llama.generate)
_SEQ = 0  # llama-cpp-python keeps every token in sequence 0


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _instance_or_class:
    """A method that receives the instance when called on one and the class when called on the class."""

    def __init__(self, func) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        return functools.partial(self.func, cls if obj is None else obj)


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
    model_path : str, optional
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
    """

    def __init__(self, model_path: Optional[str] = None, *, kv_compress: Optional[AnyPress] = None,
                 kv_max_tokens: Optional[int] = None, kv_progress: Optional[Callable[[int, int, str], None]] = None,
                 n_threads: Optional[int] = None, **kwargs: Any) -> None:
        if model_path is None:
            model_path = default_model_path()
        if n_threads is None:
            n_threads = _default_threads()
        self._kv_capture: Optional[_native.Capture] = None
        self._kv_compress: Optional[AnyPress] = None
        self._compressed_len = 0  # logical tokens [0, _compressed_len) are held by composite cells ...
        self._compressed_cells = 0  # ... this many; every later token has one cell of its own
        self._kv_holes = False  # token-level eviction left free cells between kept ones
        self._kv_phase = "prefill"  # "decode" once generate has produced its first token
        self._kv_mark = 0  # logical length at the last compression or at the start of decoding
        self._kv_room_override: Optional[AnyPress] = None
        self._kv_chunk_start: Optional[int] = None  # logical position where a chunk capture began
        self._kv_origin: Optional[np.ndarray] = None  # positions the composite cells hold (layers, kv_heads, C)
        if kv_max_tokens is not None and (isinstance(kv_max_tokens, bool) or not isinstance(kv_max_tokens, int)
                                          or kv_max_tokens < 1):
            raise ValueError(f"kv_max_tokens must be a positive integer, got {kv_max_tokens!r}")
        self._kv_max_tokens = kv_max_tokens
        self.kv_progress = kv_progress
        self._kv_bytes_per_cell: Optional[int] = None
        self.kv_session_metadata: Dict[str, Any] = {}
        self.kv_compressions = 0
        self.kv_stats: Dict[str, Any] = {}
        self.kv_selection: Optional[np.ndarray] = None
        self.kv_head_scores: Optional[np.ndarray] = None
        self.kv_scores: Optional[np.ndarray] = None
        super().__init__(model_path=model_path, n_threads=n_threads, **kwargs)
        self._n_ctx_cells = self.n_ctx()  # cells of the cache; self._n_ctx becomes the logical limit

        model = self._model.model
        self._n_model_layers = int(llama_cpp.llama_model_n_layer(model))
        self.kv_n_head = int(llama_cpp.llama_model_n_head(model))
        self.kv_n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
        self._kv_n_swa = int(llama_cpp.llama_model_n_swa(model))  # > 0: interleaved sliding-window layers
        self.kv_layers: List[int] = self._full_attention_layers() or []
        self.kv_n_layer = len(self.kv_layers)  # layers of the compressed cache (iSWA: the global ones)
        self._kv_layers_checked = False
        self._unsupported = self._why_unsupported()
        if self._unsupported is None:
            self._install_capture()  # flash attention too: the capture recomputes its probabilities
        self.kv_compress = kv_compress

    # ---- configuration ------------------------------------------------------------------------
    @property
    def kv_compress(self) -> Optional[BasePress]:
        """The press applied to prompts (None: no compression). Assignable."""
        return self._kv_compress

    @kv_compress.setter
    def kv_compress(self, press: Optional[AnyPress]) -> None:
        if press is not None:
            if not isinstance(press, (BasePress, DecodingPress, PrefillDecodingPress)):
                raise TypeError(f"kv_compress must be a press such as KVComposePress(...) or None, got {press!r}")
            if self._unsupported is not None:
                raise NotImplementedError(self._unsupported)
            decoding = press.decoding_press if isinstance(press, PrefillDecodingPress) else press
            if isinstance(decoding, DecodingPress) and decoding.target_size >= self._n_ctx_cells - 1:
                raise ValueError(f"DecodingPress.target_size ({decoding.target_size}) must be below n_ctx - 1 "
                                 f"({self._n_ctx_cells - 1}) so that a compression frees cells")
        self._kv_compress = press
        self._configure_logical_window()

    def _configure_logical_window(self, press: Optional[AnyPress] = None) -> None:
        """Size the token history (``input_ids``) and the logical limit (``_n_ctx``) for the press
        (``kv_compress``, or ``press`` when given).

        llama-cpp-python refuses prompts and stops generations at ``_n_ctx``; with a press that can
        free cells the limit is ``kv_max_tokens`` instead of the cache size. ``logits_all`` keeps
        one row of logits per cell of ``n_ctx``, so it keeps the cache size as the limit. The limit
        never drops below the conversation held now: nothing is lost by changing the press.
        """
        press = self._kv_compress if press is None else press
        limit = self._n_ctx_cells
        if self._makes_room(press) and not self._logits_all and self._swa_window_fits():
            trained = int(llama_cpp.llama_model_n_ctx_train(self._model.model))
            limit = max(limit, self._kv_max_tokens if self._kv_max_tokens is not None else trained)
        limit = max(limit, self.n_tokens)
        if len(self.input_ids) != limit:
            history = np.zeros(limit, dtype=np.intc)
            history[: self.n_tokens] = self.input_ids[: self.n_tokens]
            self.input_ids = history
        self._n_ctx = limit

    def _swa_window_fits(self) -> bool:
        """Whether prompts may run past ``n_ctx``: compression frees cells of the global layers only,
        so an iSWA model's sliding-window cache (as large as ``n_ctx`` in llama-cpp-python) must hold
        the window and a batch by itself."""
        return self._kv_n_swa == 0 or self._n_ctx_cells >= self._kv_n_swa + int(self.context_params.n_ubatch)

    @staticmethod
    def _makes_room(press: Optional[AnyPress]) -> bool:
        """Whether compressing with ``press`` frees cells of a full cache."""
        if isinstance(press, PrefillDecodingPress):
            return any(Llama._makes_room(p) for p in (press.prefilling_press, press.decoding_press))
        if isinstance(press, DecodingPress):
            return True
        return isinstance(press, BasePress) and press.compression_ratio > 0

    @property
    def kv_cells(self) -> int:
        """Cells the conversation occupies in the cache now (at most ``n_ctx``)."""
        return self._compressed_cells + self.n_tokens - self._compressed_len

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
            info = _native.context_state_info(self._ctx.ctx)
            self._kv_bytes_per_cell = info["kv_bytes"] // max(1, info["n_cells"])
        per_cell = self._kv_bytes_per_cell or 0
        return {"cells": self.kv_cells, "n_ctx": self._n_ctx_cells, "tokens": self.n_tokens,
                "kv_bytes": per_cell * self.kv_cells, "kv_bytes_uncompressed": per_cell * self.n_tokens}

    @property
    def kv_history(self) -> List[int]:
        """The logical token history: every token of the conversation, compressed or not."""
        return self.input_ids[: self.n_tokens].tolist()

    def _why_unsupported(self) -> Optional[str]:
        """Why this model's cache cannot be compressed, or None."""
        arch = self.metadata.get("general.architecture", "unknown")
        model = self._model.model
        if llama_cpp.llama_model_is_recurrent(model):
            return f"KV compression is not possible for the recurrent architecture {arch!r} (it has no KV cache)"
        if llama_cpp.llama_model_is_hybrid(model):
            return f"KV compression is not implemented for the hybrid (attention + recurrent) architecture {arch!r}"
        if llama_cpp.llama_model_has_encoder(model):
            return f"KV compression is not implemented for the encoder-decoder architecture {arch!r}"
        if not self.kv_layers:
            return (f"KV compression is not implemented for the sliding-window attention architecture {arch!r}: "
                    "which of its layers attend to the whole context is not known here")
        if self.kv_n_head_kv <= 0 or self.kv_n_head % self.kv_n_head_kv != 0:
            return f"architecture {arch!r} has {self.kv_n_head} query heads and {self.kv_n_head_kv} kv heads"
        if any(k.endswith(".attention.kv_lora_rank") for k in self.metadata):
            return f"KV compression is not implemented for multi-head latent attention ({arch!r})"
        return None

    # llama.cpp's default interleaving of sliding-window (SWA) and global layers per architecture, used
    # when the GGUF file has no "{arch}.attention.sliding_window_pattern" (llama_hparams::set_swa_pattern
    # with dense_first=False: layer il slides unless il % n == n - 1). Checked against the cache's own
    # layer count before the first compression.
    _SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4}

    def _full_attention_layers(self) -> Optional[List[int]]:
        """Model layers whose cache is compressed: every layer, or for interleaved sliding-window
        (iSWA) models the global layers, whose cache llama.cpp keeps apart from the sliding-window
        one (which is left as it is). None when that split is not known for the architecture."""
        n = self._n_model_layers
        if self._kv_n_swa == 0:
            return list(range(n))
        arch = self.metadata.get("general.architecture", "unknown")
        pattern = self.metadata.get(f"{arch}.attention.sliding_window_pattern", self._SWA_PATTERNS.get(arch))
        try:
            pattern = int(pattern)
        except (TypeError, ValueError):  # absent, or a per-layer array llama-cpp-python does not render
            return None
        if pattern <= 1:  # every layer slides: no global cache to compress
            return None
        return [il for il in range(n) if il % pattern == pattern - 1]

    def _check_cache_layers(self) -> None:
        """Once per instance: the cache llama.cpp keeps for the compressed layers has as many layers
        as ``kv_layers`` (for iSWA models this validates the sliding-window pattern)."""
        if self._kv_layers_checked or self.n_tokens == 0 or self._kv_n_swa == 0:
            return  # without sliding-window layers, kv_layers is every layer by construction
        info = _native.context_state_info(self._ctx.ctx)
        if info["n_layer"] != self.kv_n_layer:
            arch = self.metadata.get("general.architecture", "unknown")
            raise NotImplementedError(
                f"KV compression of {arch!r}: its cache holds {info['n_layer']} layers "
                f"({info['swa_n_layer']} more in a sliding-window cache), expected {self.kv_n_layer} "
                f"(layers {self.kv_layers}); this layer layout is not supported")
        self._kv_layers_checked = True

    def _capture_begin(self, n_keys: int) -> None:
        """Start capturing the attention of every model layer over ``n_keys`` cache columns."""
        self._kv_capture.begin(self._n_model_layers, self.kv_n_head, n_keys)

    def _capture_scores(self):
        """The capture's (max, mean) head scores of the compressed layers, ``[kv_n_layer, n_head, n_keys]``.

        Sliding-window layers attend to their own cache, whose columns are other cells: dropped."""
        cap = self._kv_capture
        mx, mean = cap.scores("max"), cap.scores("mean")
        if self.kv_n_layer == self._n_model_layers:
            return mx, mean
        return np.ascontiguousarray(mx[self.kv_layers]), np.ascontiguousarray(mean[self.kv_layers])

    def _install_capture(self) -> None:
        """Recreate the context with the native attention capture as its eval callback.

        llama-cpp-python has no cb_eval argument; the callback is a C function, so decoding pays
        nothing for it unless a capture is active.
        """
        self._kv_capture = _native.Capture()
        self._kv_cb_eval = llama_cpp.ggml_backend_sched_eval_callback(_native.EVAL_CALLBACK_ADDRESS)
        self.context_params.cb_eval = self._kv_cb_eval
        self.context_params.cb_eval_user_data = ctypes.c_void_p(self._kv_capture.address)
        self._ctx.close()  # free the first context's cache before allocating the new one
        self._ctx = self._stack.enter_context(
            contextlib.closing(internals.LlamaContext(model=self._model, params=self.context_params,
                                                      verbose=self.verbose))
        )
        if getattr(self, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
            scales = (ctypes.c_float * 1)(self.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                raise RuntimeError(f"Failed to set LoRA adapter from lora path: {self.lora_path}")

    # ---- llama_cpp.Llama overrides --------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._compressed_len = self._compressed_cells = self._kv_mark = self.kv_compressions = 0
        self._kv_holes = False
        self._kv_origin = None

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """``llama_cpp.Llama.generate``, compressing the prompt first when the press applies."""
        bound = _GENERATE_SIGNATURE.bind(self, tokens, *args, **kwargs)
        tokens = list(tokens)
        self._kv_phase = "prefill"
        if bound.arguments.get("reset", True):
            self._prepare_prompt(tokens)
        inner = super().generate(tokens, *args, **kwargs)
        try:
            token = next(inner)
            # the prompt is in: what follows is decoding (DecodingPress counts from here)
            self._kv_phase = "decode"
            self._kv_mark = max(self._kv_mark, self.n_tokens)
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
        if self._logits_all or (self._room_press() is None and self.kv_progress is None):
            return super().eval(tokens)
        tokens = list(tokens)
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        limit = self._n_ctx_cells
        done = 0
        try:
            while done < len(tokens):
                press = self._room_press()
                cells = self.kv_cells
                due = self._decoding_due(press)
                if cells >= limit and press is None:
                    raise ValueError(f"Requested tokens ({self.n_tokens + len(tokens) - done}) exceed context "
                                     f"window of {limit}")
                if cells >= limit or due == 0:
                    if cells < limit and cells <= press.target_size:
                        self._kv_mark = self.n_tokens  # nothing to drop yet: count the next interval
                    else:
                        self._compress_to_make_room(press, "cache full" if cells >= limit else "interval")
                    continue
                if cells + len(tokens) - done > limit:
                    self._begin_chunk_probe(press)
                n = min(self.n_batch, limit - cells, len(tokens) - done)
                if due is not None:
                    n = min(n, due)  # compress exactly every compression_interval tokens
                self._decode(tokens[done: done + n])
                done += n
                if self.kv_progress is not None:
                    self.kv_progress(done, len(tokens), "prefill")
        finally:
            self._end_chunk_probe()  # a chunk not followed by a compression is not scored

    def _decode(self, batch: List[int]) -> None:
        """Decode ``batch`` at the next logical positions and record it in the history."""
        n_past = self.n_tokens
        self._batch.set_batch(batch=batch, n_past=n_past, logits_all=self._logits_all)
        status = llama_cpp.llama_decode(self._ctx.ctx, self._batch.batch)
        if status == 1 and self._kv_holes:
            # 1: no run of free cells is long enough; token-level eviction scattered them
            self._compact(self.kv_cells)
            status = llama_cpp.llama_decode(self._ctx.ctx, self._batch.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self.input_ids[n_past: n_past + len(batch)] = batch
        self.n_tokens = n_past + len(batch)
        self._requires_eval = False

    def _room_press(self) -> Optional[AnyPress]:
        """The press that frees cells now (None: the cache is never compressed to make room)."""
        press = self._kv_room_override or self._kv_compress
        if isinstance(press, PrefillDecodingPress):
            first, second = press.prefilling_press, press.decoding_press
            if self._kv_phase == "decode":
                first, second = second, first
            press = first if self._makes_room(first) else second
        return press if self._makes_room(press) else None

    def _decoding_due(self, press: AnyPress) -> Optional[int]:
        """Tokens until a DecodingPress compresses again (None: not decoding with one)."""
        if not isinstance(press, DecodingPress) or self._kv_phase != "decode":
            return None
        return max(0, press.compression_interval - (self.n_tokens - self._kv_mark))

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        state.kv_compressed_len = self._compressed_len  # the cache holds composite cells up to here
        state.kv_compressed_cells = self._compressed_cells
        state.kv_origin = self._kv_origin
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        super().load_state(state)
        self._configure_logical_window()  # the saved history may be sized for another press
        if hasattr(state, "kv_compressed_len"):
            self._compressed_len = int(state.kv_compressed_len)
            self._compressed_cells = int(state.kv_compressed_cells)
            self._kv_origin = getattr(state, "kv_origin", None)
        else:
            # a state saved elsewhere may hold composite cells we cannot tell apart: assume it all is
            self._compressed_len = state.n_tokens
            self._compressed_cells = _native.context_state_info(self._ctx.ctx)["n_cells"] if state.n_tokens else 0
            self._kv_origin = None
        self._kv_holes = False  # llama.cpp restores a whole-context state into cells 0..n-1
        self._kv_mark = self._compressed_len

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
        from . import session

        state = self._seq_bytes()
        header = {
            "model_fingerprint": session.model_fingerprint(self),
            "model_description": session.model_description(self),
            "model_path": str(self.model_path),
            "n_ctx": self._n_ctx_cells,
            "tokens": self.kv_history,
            "n_tokens": self.n_tokens,
            "compressed_len": self._compressed_len,
            "compressed_cells": self._compressed_cells,
            "press": session.press_to_dict(self._kv_compress),
            "metadata": {} if metadata is None else metadata,
        }
        n = session.write(path, header, state)
        return {"path": str(path), "file_bytes": n, "cells": self.kv_cells, "n_tokens": self.n_tokens}

    @_instance_or_class
    def load_session(self_or_cls, path: Union[str, os.PathLike], model_path: Optional[str] = None,
                     **kwargs: Any) -> "Llama":
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
        from . import session

        if isinstance(self_or_cls, type):
            header, state = session.read(path)  # refuse a bad file before loading a model for it
            kwargs.setdefault("n_ctx", header.get("n_ctx", 2048))
            if "kv_compress" not in kwargs:
                kwargs["kv_compress"] = session.press_from_dict(header.get("press"))
            llm = self_or_cls(model_path or header.get("model_path"), **kwargs)
            try:
                llm._load_session(path, header, state, keep_press=True)
            except BaseException:
                llm.close()
                raise
            return llm
        if model_path is not None or kwargs:
            raise TypeError("llm.load_session(path) takes no model arguments; use Llama.load_session(path, ...)")
        self_or_cls._load_session(path, *session.read(path), keep_press=False)
        return self_or_cls

    def _load_session(self, path: Union[str, os.PathLike], header: Dict[str, Any], state: bytes,
                      keep_press: bool) -> None:
        """Load a session read by ``session.read`` into this instance (see ``load_session``)."""
        from . import session

        session.check_compatible(self, header, state, path)
        press = self._kv_compress if keep_press else session.press_from_dict(header.get("press"))
        # what to put back if llama.cpp refuses the cache: the sequence's cells and the bookkeeping
        previous = (self._seq_bytes(), self.kv_history, self._kv_compress, self._compressed_len,
                    self._compressed_cells, self._kv_origin)
        try:
            self.kv_compress = press
            if not self._set_seq_bytes(state):
                raise session.SessionError(f"llama.cpp refused the cache in {path} (saved with another "
                                           "cache type, flash attention setting or context size?)")
            self._set_history(header["tokens"], header["compressed_len"], header["compressed_cells"], None)
            self.kv_session_metadata = header.get("metadata") or {}
        except BaseException:
            seq, tokens, self._kv_compress, done_len, done_cells, origin = previous
            self._set_seq_bytes(seq)
            self._set_history(tokens, done_len, done_cells, origin)
            raise

    def _seq_bytes(self) -> bytes:
        """The conversation's cells as ``llama_state_seq_get_data`` writes them (b"" when empty)."""
        if self.kv_cells == 0:
            return b""
        if self._kv_holes:
            self._compact(self.kv_cells)  # what llama.cpp restores has no holes either
        ctx = self._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, _SEQ)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, buf, size, _SEQ) != size:
            raise RuntimeError("llama_state_seq_get_data did not write the whole sequence state")
        return bytes(buf)

    def _set_seq_bytes(self, data: bytes) -> bool:
        """Replace the conversation's cells by ``data`` (``_seq_bytes`` output); False if llama.cpp refuses."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx.ctx), _SEQ, -1, -1)
        self._kv_holes = False
        if not data:
            return True
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buf, len(data), _SEQ) == len(data)

    def _set_history(self, tokens: Sequence[int], compressed_len: int, compressed_cells: int,
                     origin: Optional[np.ndarray]) -> None:
        """Bookkeeping for cells just restored: the token history and what of it is composite."""
        if len(tokens) > len(self.input_ids):
            self.input_ids = np.zeros(len(tokens), dtype=np.intc)  # resized by the call below
        self.input_ids[: len(tokens)] = tokens
        self.n_tokens = len(tokens)
        self._configure_logical_window()
        self._compressed_len = self._kv_mark = int(compressed_len)
        self._compressed_cells = int(compressed_cells)
        self._kv_origin = origin  # None for a session file: kv_selection reports -1 for its composite cells
        self._requires_eval = True

    # ---- compression ------------------------------------------------------------------------
    def _prepare_prompt(self, tokens: List[int]) -> None:
        if len(tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
        if self._compressed_len > 0:
            if self._parent_reuse(tokens) >= self._compressed_len:
                return  # the prompt extends what the compressed cache holds: continue on it
            # composite cells cannot be cut at a token boundary: start again from the original tokens
            self._drop_cache()
        press = self._prompt_press()
        fits = len(tokens) < self._n_ctx_cells  # longer prompts are compressed chunk by chunk in eval
        if press is not None and fits and len(tokens) >= max(2, getattr(press, "min_tokens", 2)):
            self._compress_prompt(tokens, press)

    def _prompt_press(self) -> Optional[BasePress]:
        """The press applied to a whole prompt that fits into the cache."""
        press = self._kv_compress
        if isinstance(press, PrefillDecodingPress):
            return press.prefilling_press
        return press if isinstance(press, BasePress) else None

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
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx.ctx), False)
        self.reset()

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
            Defaults to ``kv_compress``.

        Returns
        -------
        dict
            ``kv_stats`` of this compression.
        """
        press = self._prompt_press() if press is None else press
        tokens = list(tokens)
        if not isinstance(press, BasePress):
            raise ValueError(f"no press: pass one such as KVComposePress(...) or set kv_compress (got {press!r})")
        if len(tokens) < 2:
            raise ValueError(f"a context to compress needs at least 2 tokens, got {len(tokens)}")
        if len(tokens) + 1 < self._n_ctx_cells:
            self._compress_context(tokens, press)
            return self.kv_stats
        if not self._makes_room(press):
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx_cells}: "
                             f"{type(press).__name__} with compression_ratio {press.compression_ratio} cannot free cells")
        # longer than the cache: prefill chunk by chunk, freeing cells with this press, then compress it all
        self._drop_cache()
        self._configure_logical_window(press)
        if len(tokens) + 1 >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
        self._kv_room_override = press
        try:
            self.eval(tokens)
            self._compress_to_make_room(press, "context")
        finally:
            self._kv_room_override = None
        return self.kv_stats

    def _compress_prompt(self, tokens: List[int], press: BasePress) -> None:
        """Compress ``tokens[:-1]``: the last prompt token is decoded on the compressed cache."""
        self._compress_context(tokens[:-1], press)
        self.kv_stats["tokens"] = len(tokens)

    def _compress_context(self, context: List[int], press: BasePress) -> None:
        """Prefill ``context`` from an empty cache, score it with the press's probe, rewrite it."""
        try:
            probe = self.kv_probe(context, [press])
            self.kv_apply(press, probe)
        except BaseException:
            self._keep_uncompressed()
            raise

    def kv_probe(self, context: Sequence[int], presses: Sequence[BasePress]) -> Probe:
        """
        Prefill ``context`` into an empty cache and run every probe the presses need, once.

        Window probes are read while their tokens are prefilled (no extra pass); the reconstruct
        probe feeds the context again after itself. The cache afterwards holds exactly the plain
        prefill of ``context``, so one probe serves several presses (restore the cache with
        ``save_state``/``load_state`` between ``kv_apply`` calls).

        Returns
        -------
        Probe
        """
        self._drop_cache()
        if self._kv_capture is None:  # an unsupported model: the setter refused already
            raise RuntimeError("attention capture is not installed")
        context = list(context)
        n = len(context)
        specs = {tuple(p.probe()) for p in presses if p.probe() is not None}
        unknown = {spec for spec in specs if spec[0] not in ("window", "reconstruct")}
        if unknown:
            raise ValueError(f"unknown probe {sorted(unknown)}: expected ('window', w) or ('reconstruct', 0)")
        windows = sorted({min(int(w), n) for kind, w in specs if kind == "window"}, reverse=True)
        probe = Probe(self.kv_n_layer, self.kv_n_head, self.kv_n_head_kv, n)
        probe.norms = lambda part: (
            self._kv_capture.norms(part, self.kv_n_head_kv, n) if probe.in_place
            else _native.context_norms(self._ctx.ctx, part, self.kv_n_layer, self.kv_n_head_kv, n))
        queries = None  # positions [first, stop) of the last capture's queries
        t0 = time.perf_counter()
        # Window probes: the last w tokens are prefilled in segments cut at every window's start;
        # a window's max / mean is the max / query-weighted mean of its segments'.
        cuts = [n - w for w in windows] + [n]
        self.eval(context[: cuts[0]])
        segments = []
        for start, stop in zip(cuts, cuts[1:]):
            if stop > start:
                segments.append((start, stop) + self._captured(lambda: self.eval(context[start:stop]), n))
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
        if ("reconstruct", 0) in specs:
            info = {}
            mx, mean = self._captured(lambda: info.update(self._reconstruct_probe(context)), n)
            probe.attention[("reconstruct", 0)] = {"max": mx, "mean": mean}
            descriptions.append(info["probe"])
            queries = (n, 2 * n)
        probe.in_place = queries is not None and self._context_in_place(n, *queries)
        probe.prefill_seconds = t_prefill - t0
        probe.probe_seconds = time.perf_counter() - t_prefill
        probe.description = ", ".join(descriptions) or "none"
        return probe

    def _context_in_place(self, n: int, first: int, stop: int) -> bool:
        """Whether the last capture saw the context's ``n`` tokens in cache cells ``0..n-1``, token j in
        cell j: its queries, at positions ``[first, stop)``, must have seen cell j exactly as often as
        a causal mask shows position j to them (llama.cpp's mask hides empty cells, other sequences
        and later positions). iSWA models keep a second cache in their state: never in place."""
        if self._kv_n_swa > 0:
            return False
        seen = self._kv_capture.visibility()
        if seen.size < n:
            return False
        j = np.arange(n)
        expected = np.clip(stop - np.maximum(j, first), 0, stop - first)
        return bool(np.array_equal(seen[:n], expected))

    def _rewrite_context(self, selection: np.ndarray, probe: Probe) -> Dict[str, int]:
        """Rewrite the cache's ``probe.n_tokens`` context cells into the selection's composite cells:
        from the cache tensors when the probe saw where the cells are, else through a host copy of
        the sequence state (which is also the fallback for layouts the tensor path does not read)."""
        n = probe.n_tokens
        if probe.in_place:
            try:
                result = _native.context_compose_tensors(self._ctx.ctx, self._kv_capture,
                                                         np.arange(n, dtype=np.int32), selection)
                return dict(result, rewrite="tensors")
            except _native.UnsupportedCacheError:
                pass  # checked before anything was written: the cache is as it was
        # restores the sequence exactly if llama.cpp refuses the rewrite
        return dict(_native.context_compose(self._ctx.ctx, selection, expected_cells=n), rewrite="state")

    def _captured(self, run, n_keys: int):
        """Run ``run()`` with the attention capture on; return its (max, mean) head scores."""
        cap = self._kv_capture
        self._capture_begin(n_keys)
        try:
            run()
        finally:
            if cap.active:
                cap.end()
        return self._capture_scores()

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
        self._check_cache_layers()
        n = probe.n_tokens
        t0 = time.perf_counter()
        scores = press.score(probe)
        budgets = press.layer_budgets(scores) if hasattr(press, "layer_budgets") else None
        n_keep = press.n_kept(n)
        # the newest context token stays in every head: positions must end at it
        selection = press.select(scores, n_keep, forced=[n - 1], budgets=budgets)
        t_select = time.perf_counter()
        composite = press.per_head or self._kv_n_swa > 0  # llama.cpp's eviction would cut the sliding window too
        if composite:
            result = self._rewrite_context(selection, probe)
        else:
            result = self._evict(selection[0, 0], n)
        t_rewrite = time.perf_counter()

        self.n_tokens = n  # the logical length: the next token goes to position n
        self._compressed_len = self._kv_mark = n
        self._compressed_cells = int(result["cells_after"])
        self._kv_holes = not composite
        self._requires_eval = True
        self.kv_selection = selection
        self._kv_origin = selection
        self.kv_head_scores = press.head_scores(probe)
        self.kv_scores = scores
        self.kv_stats = {
            "press": type(press).__name__,
            "compression_ratio": float(press.compression_ratio),
            "per_head": bool(press.per_head),
            "tokens": n,
            "context_tokens": n,
            "cells_before": int(result["cells_before"]),
            "cells_after": int(result["cells_after"]),
            "kv_bytes_before": int(result["kv_bytes_before"]),
            "kv_bytes_after": int(result["kv_bytes_after"]),
            "prefill_seconds": probe.prefill_seconds,
            "probe_seconds": probe.probe_seconds,
            "select_seconds": t_select - t0,
            "rewrite_seconds": t_rewrite - t_select,
            "rewrite": result["rewrite"],
            "compress_seconds": probe.probe_seconds + (t_rewrite - t0),
            "layer_budgets": None if budgets is None else [int(b) for b in budgets],
            "probe": probe.description,
            "probe_queries": self._probe_queries(press, n),
            "trigger": "prompt",
            "compressions": self.kv_compressions,
        }
        return self.kv_stats

    @staticmethod
    def _probe_queries(press: BasePress, n: int) -> int:
        spec = press.probe()
        if spec is None:
            return 0
        return n if spec[0] == "reconstruct" else min(int(spec[1]), n)

    def _evict(self, keep: np.ndarray, n: int) -> Dict[str, int]:
        """Token-level eviction with llama.cpp's ``llama_memory_seq_rm``: drop every position not in ``keep``."""
        info = _native.context_state_info(self._ctx.ctx)
        if info["n_cells"] != n:
            raise RuntimeError(f"the cache holds {info['n_cells']} cells, expected the {n} of the context")
        per_cell = info["kv_bytes"] // n
        mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        kept = np.zeros(n, dtype=bool)
        kept[keep] = True
        edges = np.flatnonzero(np.diff(np.concatenate([[1], kept.astype(np.int8), [1]])))
        for start, stop in zip(edges[::2], edges[1::2]):  # runs of dropped positions [start, stop)
            if not llama_cpp.llama_memory_seq_rm(mem, _SEQ, int(start), int(stop)):
                # part of the context is gone: empty the cache so the next prompt is prefilled again
                llama_cpp.llama_memory_seq_rm(mem, _SEQ, 0, -1)
                self.n_tokens = 0
                raise RuntimeError(f"llama_memory_seq_rm refused to remove positions [{start}, {stop})")
        return {"cells_before": n, "cells_after": int(kept.sum()), "kv_bytes_before": per_cell * n,
                "kv_bytes_after": per_cell * int(kept.sum()), "rewrite": "eviction"}

    def _keep_uncompressed(self) -> None:
        """After a failed compression: end the capture, drop probe cells, keep the prefilled context.

        The cache then holds exactly what a plain prefill of the first ``n_tokens`` tokens holds, so
        the conversation continues as if compression had been off.
        """
        cap = self._kv_capture
        if cap is not None and cap.active:
            with contextlib.suppress(Exception):
                cap.end()
        self._ctx.kv_cache_seq_rm(_SEQ, self.n_tokens, -1)
        mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        if self.n_tokens > 0 and llama_cpp.llama_memory_seq_pos_max(mem, _SEQ) != self.n_tokens - 1:
            # the rewrite through the cache tensors removed the sequence before llama.cpp refused it:
            # prefill the context again (same tokens, same batches: the same cache as before)
            context = self.input_ids[: self.n_tokens].tolist()
            self._drop_cache()
            self.eval(context)
        self._compressed_len = self._compressed_cells = 0
        self._kv_holes = False
        self._kv_origin = None
        self._requires_eval = True

    # ---- compression to make room (prompts longer than the cache, long generations) -------------
    def _compress_to_make_room(self, press: AnyPress, trigger: str) -> None:
        """Compress the cache, whatever it holds (composite cells and newer tokens), to free cells.

        The cells are scored by the attention of the tokens since the last compression (KVCompose:
        captured while they were prefilled) or of the newest tokens, decoded once more with the
        capture on (other presses, and compressions during decoding); then rewritten into the kept
        number of composite cells, which start the cache again.
        """
        self._check_cache_layers()
        cells = self.kv_cells
        scorer = self._scorer(press)
        if isinstance(press, DecodingPress):
            keep, window = min(press.target_size, cells - 1), press.hidden_states_buffer_size
            if keep >= 1:
                scorer = dataclasses.replace(scorer, compression_ratio=1.0 - keep / cells)
        else:
            keep = press.n_kept(cells)
            spec = press.probe()
            window = int(spec[1]) if spec is not None and spec[0] == "window" else int(getattr(press, "window", 64))
        if keep >= cells or keep < 1 or (trigger == "cache full" and keep >= self._n_ctx_cells):
            raise ValueError(f"Requested tokens ({self.n_tokens + 1}) exceed context window of {self._n_ctx_cells}: "
                             f"{type(press).__name__} keeps {keep} of {cells} cells")
        t0 = time.perf_counter()
        if self._kv_chunk_start is not None and self._kv_chunk_start >= self._compressed_len:
            probe = self._chunk_probe(cells)
        else:
            self._end_chunk_probe()
            if self._kv_holes:
                self._compact(cells)
            probe = self._recent_probe(scorer, window, cells)
        t_probe = time.perf_counter()
        scores = scorer.score(probe)
        budgets = scorer.layer_budgets(scores) if hasattr(scorer, "layer_budgets") else None
        selection = scorer.select(scores, keep, forced=[cells - 1], budgets=budgets)
        t_select = time.perf_counter()
        # every press goes through composite cells here (token-level selections are the same in
        # every head): eviction would leave holes that the next capture cannot map to cells
        result = _native.context_compose(self._ctx.ctx, selection)
        t_rewrite = time.perf_counter()
        if result["cells_before"] != cells:
            raise RuntimeError(f"the cache held {result['cells_before']} cells where {cells} were expected")
        origin = np.take_along_axis(self._cell_positions(cells), selection, axis=-1)
        self._compressed_len = self._kv_mark = self.n_tokens
        self._compressed_cells = int(result["cells_after"])
        self._requires_eval = True
        self.kv_compressions += 1
        self.kv_selection = self._kv_origin = origin
        self.kv_scores = scores
        self.kv_head_scores = scorer.head_scores(probe)
        self.kv_stats = {
            "press": type(press).__name__,
            "compression_ratio": 1.0 - keep / cells,
            "per_head": bool(scorer.per_head),
            "tokens": self.n_tokens,
            "context_tokens": self.n_tokens,
            "cells_before": int(result["cells_before"]),
            "cells_after": int(result["cells_after"]),
            "kv_bytes_before": int(result["kv_bytes_before"]),
            "kv_bytes_after": int(result["kv_bytes_after"]),
            "prefill_seconds": 0.0,
            "probe_seconds": t_probe - t0,
            "select_seconds": t_select - t_probe,
            "rewrite_seconds": t_rewrite - t_select,
            "rewrite": "state",
            "compress_seconds": t_rewrite - t0,
            "layer_budgets": None if budgets is None else [int(b) for b in budgets],
            "probe": probe.description,
            "probe_queries": probe.substitute[1] if probe.substitute else 0,
            "trigger": trigger,
            "compressions": self.kv_compressions,
        }

    def _cell_positions(self, cells: int) -> np.ndarray:
        """int32 (layers, kv_heads, cells): the logical position each cell holds, per head."""
        shape = (self.kv_n_layer, self.kv_n_head_kv)
        tail = np.arange(self._compressed_len, self.n_tokens, dtype=np.int32)
        if self._compressed_cells == 0:
            head = np.zeros(0, dtype=np.int32)
        elif self._kv_origin is None:
            head = np.full(self._compressed_cells, -1, dtype=np.int32)  # restored from a state: unknown
        else:
            head = self._kv_origin
        head = np.broadcast_to(head, shape + head.shape[-1:])
        positions = np.concatenate([head, np.broadcast_to(tail, shape + tail.shape)], axis=-1)
        if positions.shape[-1] != cells:
            raise RuntimeError(f"the cache holds {cells} cells, the conversation's bookkeeping {positions.shape[-1]}")
        return positions

    def _scorer(self, press: AnyPress) -> BasePress:
        """The press that scores the cells when ``press`` compresses to make room."""
        return press.base_press if isinstance(press, DecodingPress) else press

    def _begin_chunk_probe(self, press: AnyPress) -> None:
        """Capture the attention of every token prefilled until the next compression, for presses
        whose own probe is the context attending to itself (KVCompose's reconstruct probe): the
        chunk's tokens are the queries that stand in for it. Other presses keep their window."""
        if self._kv_chunk_start is not None or self._kv_capture is None:
            return
        if self._scorer(press).probe() != ("reconstruct", 0):
            return
        if self._kv_holes:
            self._compact(self.kv_cells)  # capture columns must be cells 0..cells-1
        self._capture_begin(self._n_ctx_cells)
        self._kv_chunk_start = self.n_tokens

    def _end_chunk_probe(self):
        """End a chunk capture; its (max, mean) scores over the cache's columns, or None if none ran."""
        if self._kv_chunk_start is None:
            return None
        self._kv_chunk_start = None
        self._kv_capture.end()
        return self._capture_scores()

    def _chunk_probe(self, cells: int) -> Probe:
        """A probe of the cache's ``cells`` cells from the chunk capture (see ``_begin_chunk_probe``)."""
        queries = self.n_tokens - self._kv_chunk_start
        mx, mean = self._end_chunk_probe()
        probe = self._cells_probe(cells)
        probe.attention[("window", queries)] = {"max": np.ascontiguousarray(mx[..., :cells]),
                                                "mean": np.ascontiguousarray(mean[..., :cells])}
        probe.substitute = ("window", queries)
        probe.description = f"the {queries} tokens since the last compression"
        return probe

    def _cells_probe(self, cells: int) -> Probe:
        """A probe of the cache's first ``cells`` cells with no attention yet; norms read on demand."""
        return Probe(self.kv_n_layer, self.kv_n_head, self.kv_n_head_kv, cells,
                     norms=lambda part: _native.context_norms(self._ctx.ctx, part, self.kv_n_layer,
                                                              self.kv_n_head_kv, cells),
                     description="none")

    def _recent_probe(self, press: BasePress, window: int, cells: int) -> Probe:
        """A probe of the cache's ``cells`` cells from the attention of its newest ``window`` tokens.

        Those tokens are removed and decoded again at the same positions with the capture on (they
        are the newest, so every cell is visible to them); if that fails they are decoded again
        without it, so the cache is as before, and the error propagates.
        """
        probe = self._cells_probe(cells)
        if press.probe() is None:
            return probe
        w = max(1, min(window, self.n_tokens - self._compressed_len, self.n_batch))
        start = self.n_tokens - w
        recent = self.input_ids[start: self.n_tokens].tolist()
        self._ctx.kv_cache_seq_rm(_SEQ, start, -1)
        self.n_tokens = start
        try:
            mx, mean = self._captured(lambda: self._decode(recent), cells)
        except BaseException:
            self._ctx.kv_cache_seq_rm(_SEQ, start, -1)
            self.n_tokens = start
            self._decode(recent)
            raise
        probe.attention[("window", w)] = {"max": mx, "mean": mean}
        probe.substitute = ("window", w)
        probe.description = f"newest {w} tokens"
        return probe

    def _compact(self, cells: int) -> None:
        """Move the cells left by token-level eviction together (same contents, same positions)."""
        identity = np.broadcast_to(np.arange(cells, dtype=np.int32), (self.kv_n_layer, self.kv_n_head_kv, cells))
        _native.context_compose(self._ctx.ctx, np.ascontiguousarray(identity))
        self._kv_holes = False

    def _reconstruct_probe(self, context: List[int]) -> Dict[str, Any]:
        """Decode the context again at positions n..2n-1 while the capture records its attention.

        When the cache cannot hold all 2n cells, the probe runs in chunks and a chunk's cells are
        dropped before the next one, except the newest (llama.cpp needs each batch to start right
        after the sequence's newest position). A chunk's queries then see the context, that one
        earlier probe token and their own chunk, where the paper's probe sees all earlier probe
        tokens; the softmax mass those would take goes to the context columns instead.
        """
        n = len(context)
        free = self._n_ctx_cells - n  # >= 2: only prompts that fit are compressed whole
        full = free >= n
        # a dropped chunk leaves its newest cell between two free runs of together free - 1 cells;
        # llama.cpp needs a batch's cells in one run, so a chunk must fit into the smaller half
        chunk = self.n_batch if full else max(1, min(self.n_batch, (free - 1) // 2))
        held = 0
        for start in range(0, n, chunk):
            part = context[start: start + chunk]
            if held + len(part) > free:
                self._ctx.kv_cache_seq_rm(_SEQ, n, n + start - 1)
                held = 1
            self._batch.set_batch(batch=part, n_past=n + start, logits_all=False)
            self._ctx.decode(self._batch)
            held += len(part)
            if self.kv_progress is not None:
                self.kv_progress(start + len(part), n, "probe")
        self._ctx.kv_cache_seq_rm(_SEQ, n, -1)  # the probe's own cells never stay
        return {"probe": "reconstruct" if full else f"reconstruct, chunks of {chunk}", "probe_queries": n}
