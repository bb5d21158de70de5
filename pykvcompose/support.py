"""Which models' caches can be compressed: architecture checks and, for interleaved sliding-window
(iSWA) models, which layers' cache is compressed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import llama_cpp

# llama.cpp's default interleaving of sliding-window (SWA) and global layers per architecture, used
# when the GGUF file has no "{arch}.attention.sliding_window_pattern" (llama_hparams::set_swa_pattern
# with dense_first=False: layer il slides unless il % n == n - 1). Checked against the cache's own
# layer count before the first compression (check_cache_layers).
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


@dataclass
class ModelShape:
    """What compression needs to know of a model: its attention shape and the layers of the compressed cache.

    Parameters
    ----------
    arch : str
        ``general.architecture`` of the GGUF file.
    n_model_layers, n_head, n_head_kv : int
        The model's layers, query heads and kv heads.
    n_swa : int
        Sliding-window size; > 0 for models with interleaved sliding-window layers.
    layers : list of int
        Model layers whose cache is compressed: every layer, or for iSWA models the global ones.
        Empty when that split is not known (the model is then unsupported).
    n_ctx : int
        Cells of the cache.
    """

    arch: str
    n_model_layers: int
    n_head: int
    n_head_kv: int
    n_swa: int
    layers: List[int]
    n_ctx: int

    @property
    def n_layer(self) -> int:
        """Layers of the compressed cache (iSWA: the global ones)."""
        return len(self.layers)

    @property
    def iswa(self) -> bool:
        return self.n_swa > 0


def model_shape(model, metadata: Dict[str, Any], n_ctx: int) -> ModelShape:
    """The :class:`ModelShape` of a loaded ``llama_model*`` whose GGUF metadata is ``metadata``."""
    arch = metadata.get("general.architecture", "unknown")
    n_layers = int(llama_cpp.llama_model_n_layer(model))
    if n_layers == 0:  # vocab_only=True: no hyperparameters were loaded (llama_model_n_head would abort)
        return ModelShape(arch=arch, n_model_layers=0, n_head=0, n_head_kv=0, n_swa=0, layers=[], n_ctx=n_ctx)
    n_swa = int(llama_cpp.llama_model_n_swa(model))
    return ModelShape(
        arch=arch,
        n_model_layers=n_layers,
        n_head=int(llama_cpp.llama_model_n_head(model)),
        n_head_kv=int(llama_cpp.llama_model_n_head_kv(model)),
        n_swa=n_swa,
        layers=full_attention_layers(arch, metadata, n_layers, n_swa) or [],
        n_ctx=n_ctx,
    )


def full_attention_layers(arch: str, metadata: Dict[str, Any], n_layers: int, n_swa: int) -> Optional[List[int]]:
    """Model layers whose cache is compressed: every layer, or for interleaved sliding-window
    (iSWA) models the global layers, whose cache llama.cpp keeps apart from the sliding-window
    one (which is left as it is). None when that split is not known for the architecture."""
    if n_swa == 0:
        return list(range(n_layers))
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", SWA_PATTERNS.get(arch))
    try:
        pattern = int(pattern)
    except (TypeError, ValueError):  # absent, or a per-layer array llama-cpp-python does not render
        return None
    if pattern <= 1:  # every layer slides: no global cache to compress
        return None
    return [il for il in range(n_layers) if il % pattern == pattern - 1]


def why_unsupported(model, metadata: Dict[str, Any], shape: ModelShape) -> Optional[str]:
    """Why this model's cache cannot be compressed, or None."""
    arch = shape.arch
    if shape.n_model_layers == 0:
        return "this model has no layers loaded (vocab_only=True loads the vocabulary alone): nothing to compress"
    if llama_cpp.llama_model_is_recurrent(model):
        return f"KV compression is not possible for the recurrent architecture {arch!r} (it has no KV cache)"
    if llama_cpp.llama_model_is_hybrid(model):
        return f"KV compression is not implemented for the hybrid (attention + recurrent) architecture {arch!r}"
    if llama_cpp.llama_model_has_encoder(model):
        return f"KV compression is not implemented for the encoder-decoder architecture {arch!r}"
    if not shape.layers:
        return (
            f"KV compression is not implemented for the sliding-window attention architecture {arch!r}: "
            "which of its layers attend to the whole context is not known here"
        )
    if shape.n_head_kv <= 0 or shape.n_head % shape.n_head_kv != 0:
        return f"architecture {arch!r} has {shape.n_head} query heads and {shape.n_head_kv} kv heads"
    if any(k.endswith(".attention.kv_lora_rank") for k in metadata):
        return f"KV compression is not implemented for multi-head latent attention ({arch!r})"
    return None


def check_cache_layers(shape: ModelShape, state_info: Dict[str, Any]) -> None:
    """The cache llama.cpp keeps for the compressed layers has as many layers as ``shape.layers``
    (for iSWA models this validates the sliding-window pattern); NotImplementedError if not."""
    if state_info["n_layer"] != shape.n_layer:
        raise NotImplementedError(
            f"KV compression of {shape.arch!r}: its cache holds {state_info['n_layer']} layers "
            f"({state_info['swa_n_layer']} more in a sliding-window cache), expected {shape.n_layer} "
            f"(layers {shape.layers}); this layer layout is not supported"
        )


def window_fits(shape: ModelShape, n_ubatch: int) -> bool:
    """Whether prompts may run past ``n_ctx``: compression frees cells of the global layers only,
    so an iSWA model's sliding-window cache (as large as ``n_ctx`` in llama-cpp-python) must hold
    the window and a batch by itself."""
    return shape.n_swa == 0 or shape.n_ctx >= shape.n_swa + n_ubatch


def default_threads() -> int:
    """The cores this process may use (llama-cpp-python's default thread count is lower)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
