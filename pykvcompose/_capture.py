"""The attention capture's owner (``kvc_capture``, the header's "attention capture" section), bound through
:mod:`pykvcompose._native`'s cffi library."""

from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np

from ._native import AGG_BY_NAME, REDUCE_BY_NAME, _check, _lib, _part, _ptr, ffi


# ---- attention capture ---------------------------------------------------------------------
class Capture:
    """Owns a ``kvc_capture``. Use as ``cb_eval_user_data`` with :data:`EVAL_CALLBACK_ADDRESS`."""

    def __init__(self) -> None:
        handle = ffi.new("kvc_capture **")
        _check(_lib.kvc_capture_init(handle), "kvc_capture_init")
        self._handle = handle[0]
        self._shape = (0, 0, 0)
        self._warned = False

    @property
    def handle(self):
        """The ``kvc_capture *``."""
        if self._handle is None:
            raise ValueError("the capture is closed")
        return self._handle

    @property
    def address(self) -> int:
        """The ``kvc_capture *`` as an integer (for ``cb_eval_user_data``)."""
        return int(ffi.cast("uintptr_t", self.handle))

    def begin(self, n_layer: int, n_head: int, n_keys: int, head_rows: int = 0, pooled_rows: int = 0) -> None:
        """Reset and activate; with ``head_rows``, each layer's first ``head_rows`` query rows are also pooled
        apart (:meth:`scores` with ``head=True``); with ``pooled_rows``, only each layer's first ``pooled_rows``
        query rows are pooled at all (the rest: a batch's padding)."""
        _check(_lib.kvc_capture_set_head_rows(self.handle, int(head_rows)), "kvc_capture_set_head_rows")
        _check(_lib.kvc_capture_set_pooled_rows(self.handle, int(pooled_rows)), "kvc_capture_set_pooled_rows")
        _check(_lib.kvc_capture_begin(self.handle, n_layer, n_head, n_keys), "kvc_capture_begin")
        self._shape = (n_layer, n_head, n_keys)

    def end(self) -> None:
        _check(_lib.kvc_capture_end(self.handle), "kvc_capture_end")
        why = self.fallback
        if why and not self._warned:  # once per capture (per Llama): the run goes on, slower
            self._warned = True
            warnings.warn(
                f"pykvcompose: attention scores reduced on the host, not on the backend: {why}",
                RuntimeWarning,
                stacklevel=2,
            )

    def set_reduce(self, where: str) -> None:
        """Reduce on the ``"backend"`` holding the tensors (default) or on the ``"host"`` (the reference)."""
        if where not in REDUCE_BY_NAME:
            raise ValueError(f"unknown reduction place {where!r}; expected one of {sorted(REDUCE_BY_NAME)}")
        _check(_lib.kvc_capture_set_reduce(self.handle, REDUCE_BY_NAME[where]), "kvc_capture_set_reduce")

    def set_n_threads(self, n_threads: int) -> None:
        """Threads of a CPU backend's reduction (the context's ``n_threads``)."""
        _check(_lib.kvc_capture_set_n_threads(self.handle, int(n_threads)), "kvc_capture_set_n_threads")

    @property
    def fallback(self) -> str:
        """Why the backend did not reduce some layer during the last capture ("" if it reduced all)."""
        return ffi.string(_lib.kvc_capture_get_fallback(self.handle)).decode()

    @property
    def host_bytes(self) -> int:
        """Tensor bytes the last capture read on the host."""
        return int(_lib.kvc_capture_host_bytes(self.handle))

    @property
    def n_outputs(self) -> int:
        """Flash-attention nodes (layers x ubatches) whose output the last capture computed in place of
        ggml's kernel (see ``kvc_capture_n_outputs``)."""
        return int(_lib.kvc_capture_n_outputs(self.handle))

    @property
    def active(self) -> bool:
        return bool(_lib.kvc_capture_is_active(self.handle))

    def set_recompute(self, recompute: bool) -> None:
        """Without flash attention: recompute the probabilities from q and k (the flash-attention
        path's code) instead of reading ``kq_soft_max``; for comparing both on the same activations."""
        _check(_lib.kvc_capture_set_recompute(self.handle, bool(recompute)), "kvc_capture_set_recompute")

    def scores(self, agg: str = "max", head: bool = False) -> np.ndarray:
        """Probe attention reduced over the probe queries by ``agg`` ("max" or "mean"),
        float32 ``[n_layer, n_head, n_keys]``; ``head``: over the head rows of :meth:`begin` alone."""
        if agg not in AGG_BY_NAME:
            raise ValueError(f"unknown aggregation {agg!r}; expected one of {sorted(AGG_BY_NAME)}")
        out = np.empty(self._shape, dtype=np.float32)
        name = "kvc_capture_get_head_scores" if head else "kvc_capture_get_scores"
        _check(getattr(_lib, name)(self.handle, AGG_BY_NAME[agg], _ptr(out, "float"), out.size), name)
        return out

    def set_queries(self, every: int, n_max: int) -> None:
        """Keep every ``every``-th probe query (after RoPE), up to ``n_max`` per layer (0: none), from the next
        begin (``kvc_capture_set_queries``)."""
        _check(_lib.kvc_capture_set_queries(self.handle, int(every), int(n_max)), "kvc_capture_set_queries")

    def queries(self, layer: int) -> Tuple[np.ndarray, float]:
        """Layer ``layer``'s kept queries, float32 (n_stored, heads, head_dim), and its KQ scale."""
        n_stored, dim, scale = ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("float *")
        _check(
            _lib.kvc_capture_get_queries(self.handle, layer, ffi.NULL, 0, n_stored, dim, scale),
            "kvc_capture_get_queries",
        )
        out = np.zeros((n_stored[0], self._shape[1], dim[0]), dtype=np.float32)
        _check(
            _lib.kvc_capture_get_queries(self.handle, layer, _ptr(out, "float"), out.size, n_stored, dim, scale),
            "kvc_capture_get_queries",
        )
        return out, float(scale[0])

    def n_queries(self, layer: int) -> int:
        return int(_lib.kvc_capture_n_queries(self.handle, layer))

    def visibility(self) -> np.ndarray:
        """int32 ``[n_keys]``: how many probe query rows of layer 0 the attention mask let see cache cell j."""
        out = np.empty(self._shape[2], dtype=np.int32)
        _check(
            _lib.kvc_capture_get_visibility(self.handle, _ptr(out, "int32_t"), out.size), "kvc_capture_get_visibility"
        )
        return out

    def norms(self, part: str, n_head_kv: int, n_cells: int) -> np.ndarray:
        """:func:`state_norms` of cache cells ``[0, n_cells)``, read from the cache tensors the capture saw:
        float32 ``[n_layer, n_head_kv, n_cells]``."""
        out = np.empty((self._shape[0], n_head_kv, n_cells), dtype=np.float32)
        _check(
            _lib.kvc_capture_get_norms(self.handle, _part(part), n_head_kv, n_cells, _ptr(out, "float"), out.size),
            "kvc_capture_get_norms",
        )
        return out

    def close(self) -> None:
        if self._handle is not None:
            _lib.kvc_capture_free(self._handle)
        self._handle = None

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
