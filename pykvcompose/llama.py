"""``Llama``: ``llama_cpp.Llama`` whose prompts are compressed after prefill."""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import llama_cpp
import llama_cpp._internals as internals
import numpy as np

from . import _native
from .models import default_model_path
from .presses.base_press import BasePress

_GENERATE_SIGNATURE = inspect.signature(llama_cpp.Llama.generate)
_SEQ = 0  # llama-cpp-python keeps every token in sequence 0


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
    kv_compress : BasePress, optional
        The press, e.g. ``KVComposePress(compression_ratio=0.75)``; None disables compression.
    n_threads : int, optional
        Defaults to the cores this process may use.
    **kwargs
        Everything ``llama_cpp.Llama`` accepts.

    Attributes
    ----------
    kv_stats : dict
        Measurements of the last compression (empty before the first).
    kv_selection : np.ndarray or None
        int32 (layers, kv_heads, C): the original positions each head kept, ascending.
    kv_head_scores : np.ndarray or None
        float32 (layers, heads, tokens): the probe attention of the last compression, per query
        head, aggregated over probe queries with the press's ``agg_task``.
    kv_scores : np.ndarray or None
        float32 (layers, kv_heads, tokens): the press's token scores of the last compression.
    """

    def __init__(self, model_path: Optional[str] = None, *, kv_compress: Optional[BasePress] = None,
                 n_threads: Optional[int] = None, **kwargs: Any) -> None:
        if model_path is None:
            model_path = default_model_path()
        if n_threads is None:
            n_threads = _default_threads()
        self._kv_capture: Optional[_native.Capture] = None
        self._kv_compress: Optional[BasePress] = None
        self._compressed_len = 0
        self.kv_stats: Dict[str, Any] = {}
        self.kv_selection: Optional[np.ndarray] = None
        self.kv_head_scores: Optional[np.ndarray] = None
        self.kv_scores: Optional[np.ndarray] = None
        super().__init__(model_path=model_path, n_threads=n_threads, **kwargs)

        model = self._model.model
        self.kv_n_layer = int(llama_cpp.llama_model_n_layer(model))
        self.kv_n_head = int(llama_cpp.llama_model_n_head(model))
        self.kv_n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
        self._unsupported = self._why_unsupported()
        self._flash_attn = self.context_params.flash_attn_type != llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if self._unsupported is None and not self._flash_attn:
            self._install_capture()
        self.kv_compress = kv_compress

    # ---- configuration ------------------------------------------------------------------------
    @property
    def kv_compress(self) -> Optional[BasePress]:
        """The press applied to prompts (None: no compression). Assignable."""
        return self._kv_compress

    @kv_compress.setter
    def kv_compress(self, press: Optional[BasePress]) -> None:
        if press is not None:
            if not isinstance(press, BasePress):
                raise TypeError(f"kv_compress must be a press such as KVComposePress(...) or None, got {press!r}")
            if self._unsupported is not None:
                raise NotImplementedError(self._unsupported)
            if self._flash_attn:
                raise ValueError(
                    f"{type(press).__name__} scores tokens from the attention probabilities (kq_soft_max), which "
                    "llama.cpp never materialises with flash attention: create the Llama with flash_attn=False "
                    "(a quantized V cache needs flash attention, so use type_v=None too)"
                )
        self._kv_compress = press

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
        if llama_cpp.llama_model_n_swa(model) > 0:
            return f"KV compression is not implemented yet for sliding-window attention models ({arch!r})"
        if self.kv_n_head_kv <= 0 or self.kv_n_head % self.kv_n_head_kv != 0:
            return f"architecture {arch!r} has {self.kv_n_head} query heads and {self.kv_n_head_kv} kv heads"
        if any(k.endswith(".attention.kv_lora_rank") for k in self.metadata):
            return f"KV compression is not implemented for multi-head latent attention ({arch!r})"
        return None

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
        self._compressed_len = 0

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        """``llama_cpp.Llama.generate``, compressing the prompt first when the press applies."""
        bound = _GENERATE_SIGNATURE.bind(self, tokens, *args, **kwargs)
        tokens = list(tokens)
        if bound.arguments.get("reset", True):
            self._prepare_prompt(tokens)
        yield from super().generate(tokens, *args, **kwargs)

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        state.kv_compressed_len = self._compressed_len  # the cache holds composite cells up to here
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        super().load_state(state)
        # a state saved elsewhere may hold composite cells we cannot tell apart: assume it all is
        self._compressed_len = int(getattr(state, "kv_compressed_len", state.n_tokens))

    def close(self) -> None:
        super().close()
        if self._kv_capture is not None:
            self._kv_capture.close()  # after the context that points at it

    # ---- compression ------------------------------------------------------------------------
    def _prepare_prompt(self, tokens: List[int]) -> None:
        if len(tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
        press = self._kv_compress
        if self._compressed_len > 0:
            if self._parent_reuse(tokens) >= self._compressed_len:
                return  # the prompt extends what the compressed cache holds: continue on it
            self._drop_cache()  # composite cells cannot be cut at a token boundary
        if press is not None and len(tokens) >= max(2, getattr(press, "min_tokens", 2)):
            self._compress_prompt(tokens, press)

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

    def _compress_prompt(self, tokens: List[int], press: BasePress) -> None:
        """Prefill ``tokens[:-1]`` from an empty cache, score it with the press's probe, rewrite it."""
        if self._kv_capture is None:  # flash attention or unsupported model: the setter refused already
            raise RuntimeError("attention capture is not installed")
        context = tokens[:-1]
        n = len(context)
        self._drop_cache()
        cap = self._kv_capture
        scoring = getattr(press, "scoring", "reconstruct")
        t0 = time.perf_counter()
        try:
            if scoring == "window":
                w = min(getattr(press, "window", 64), n)
                if n - w > 0:
                    self.eval(context[: n - w])
                t_prefill = time.perf_counter()
                cap.begin(self.kv_n_layer, self.kv_n_head, n, getattr(press, "agg_task", "max"))
                self.eval(context[n - w:])
                cap.end()
                t_probe = time.perf_counter()
                probe = {"probe": "window", "probe_queries": w}
            else:
                self.eval(context)
                t_prefill = time.perf_counter()
                cap.begin(self.kv_n_layer, self.kv_n_head, n, getattr(press, "agg_task", "max"))
                probe = self._reconstruct_probe(context)
                cap.end()
                t_probe = time.perf_counter()
            head_scores = cap.scores()

            value_norms = None
            if getattr(press, "add_v_norm", False):
                value_norms = _native.context_value_norms(self._ctx.ctx, self.kv_n_layer, self.kv_n_head_kv, n)
            scores = press.score(head_scores, self.kv_n_head_kv, value_norms=value_norms)
            budgets = press.layer_budgets(scores) if hasattr(press, "layer_budgets") else None
            n_keep = press.n_kept(n)
            # the newest context token stays in every head: positions must end at it
            selection = press.select(scores, n_keep, forced=[n - 1], budgets=budgets)
            t_select = time.perf_counter()
            # restores the sequence exactly if llama.cpp refuses the rewrite
            result = _native.context_compose(self._ctx.ctx, selection, expected_cells=n)
        except BaseException:
            self._keep_uncompressed()
            raise
        t_rewrite = time.perf_counter()

        self.n_tokens = n  # the logical length: the next token goes to position n
        self._compressed_len = n
        self._requires_eval = True
        self.kv_selection = selection
        self.kv_head_scores = head_scores
        self.kv_scores = scores
        self.kv_stats = {
            "press": type(press).__name__,
            "compression_ratio": float(press.compression_ratio),
            "tokens": len(tokens),
            "context_tokens": n,
            "cells_before": int(result["cells_before"]),
            "cells_after": int(result["cells_after"]),
            "kv_bytes_before": int(result["kv_bytes_before"]),
            "kv_bytes_after": int(result["kv_bytes_after"]),
            "prefill_seconds": t_prefill - t0,
            "probe_seconds": t_probe - t_prefill,
            "select_seconds": t_select - t_probe,
            "rewrite_seconds": t_rewrite - t_select,
            "compress_seconds": t_rewrite - t_prefill,
            "layer_budgets": None if budgets is None else [int(b) for b in budgets],
            **probe,
        }

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
        self._compressed_len = 0
        self._requires_eval = True

    def _reconstruct_probe(self, context: List[int]) -> Dict[str, Any]:
        """Decode the context again at positions n..2n-1 while the capture records its attention.

        When the cache cannot hold all 2n cells, the probe runs in chunks and a chunk's cells are
        dropped before the next one, except the newest (llama.cpp needs each batch to start right
        after the sequence's newest position). A chunk's queries then see the context, that one
        earlier probe token and their own chunk, where the paper's probe sees all earlier probe
        tokens; the softmax mass those would take goes to the context columns instead.
        """
        n = len(context)
        free = self._n_ctx - n  # >= 2: prompts of n_ctx tokens or more were refused
        full = free >= n
        chunk = self.n_batch if full else max(1, min(self.n_batch, free - 1))
        held = 0
        for start in range(0, n, chunk):
            part = context[start: start + chunk]
            if held + len(part) > free:
                self._ctx.kv_cache_seq_rm(_SEQ, n, n + start - 1)
                held = 1
            self._batch.set_batch(batch=part, n_past=n + start, logits_all=False)
            self._ctx.decode(self._batch)
            held += len(part)
        self._ctx.kv_cache_seq_rm(_SEQ, n, -1)  # the probe's own cells never stay
        return {"probe": "reconstruct" if full else f"reconstruct, chunks of {chunk}", "probe_queries": n}
