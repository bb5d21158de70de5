"""Scores without kq_soft_max: the probe attention recomputed from queries and cached keys in C++,
which makes flash attention and quantized K/V caches compressible (issue 6)."""

import llama_cpp
import numpy as np
import pytest

from helpers import greedy
from pykvcompose import KVComposePress, Llama, probing
from pykvcompose.presses import SnapKVPress

pytestmark = pytest.mark.model

F16, Q8_0, Q4_0 = llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0


@pytest.mark.parametrize("type_k,atol", [(F16, 1e-5), (Q8_0, 1e-3)], ids=["f16", "q8_0-k"])
def test_recomputed_attention_selects_the_tokens_kq_soft_max_selects(model_path, prompt_tokens, type_k, atol):
    """On the same activations (flash attention off), the C++ recomputation from q and k and
    llama.cpp's own kq_soft_max give the same KVCompose selection."""
    m = Llama(model_path, n_ctx=1024, type_k=type_k, verbose=False)
    runs = {}
    for recompute in (False, True):
        m._kv_capture.set_recompute(recompute)
        m.compress_context(prompt_tokens[:-1], KVComposePress(0.5, min_tokens=16))
        runs[recompute] = (m.kv_selection.copy(), m.kv_head_scores.copy())
    m.close()
    (sel_a, hs_a), (sel_b, hs_b) = runs[False], runs[True]
    # f16: the same products to rounding; q8_0: ggml quantizes the queries with its SIMD code, we with
    # the reference code (one probability in 10^5 differed by 6e-4)
    np.testing.assert_allclose(hs_b, hs_a, atol=atol)
    np.testing.assert_array_equal(sel_b, sel_a)


@pytest.mark.parametrize("type_k,type_v", [(F16, F16), (Q8_0, Q8_0), (Q4_0, Q4_0)], ids=["f16", "q8_0", "q4_0"])
def test_flash_attention_caches_are_compressed(model_path, prompt_tokens, type_k, type_v):
    m = Llama(
        model_path,
        n_ctx=1024,
        flash_attn=True,
        type_k=type_k,
        type_v=type_v,
        verbose=False,
        kv_compress=KVComposePress(0.5, min_tokens=16),
    )
    ctx = prompt_tokens[:-1]
    m.eval(ctx[:-8])
    # every probe query's attention is a distribution over the cells it sees
    mx, mean = m._engine.captured(lambda: m.eval(ctx[-8:]), len(ctx))
    np.testing.assert_allclose(mean.sum(axis=-1), 1.0, atol=1e-3)
    assert (mx <= 1.0 + 1e-6).all() and (mean >= 0).all()
    m.reset()
    out = greedy(m, prompt_tokens, 8)
    assert len(out) == 8
    assert m.kv_stats["cells_after"] == KVComposePress(0.5).n_kept(len(ctx)) and m.kv_stats["probe"].startswith(
        "lookahead of"
    )
    assert m.kv_selection.shape[-1] == m.kv_stats["cells_after"]
    m.close()


def test_flash_attention_with_a_window_press_past_n_ctx(model_path, prompt_tokens):
    m = Llama(
        model_path, n_ctx=256, flash_attn=True, type_k=Q8_0, type_v=Q8_0, verbose=False, kv_compress=SnapKVPress(0.5)
    )
    toks = (prompt_tokens * 2)[:600]
    m.eval(toks)
    assert m.kv_compressions >= 2 and m.kv_cells <= 256 and m.n_tokens == 600
    m.close()


@pytest.mark.parametrize(
    "kwargs,tile",
    [({}, 0), ({"flash_attn": True}, 64), ({"flash_attn": True, "type_k": Q8_0, "type_v": Q8_0}, 0)],
    ids=["softmax", "flash-f16", "flash-q8_0"],
)
def test_probe_batches_are_padded_only_to_a_tile_the_kernel_has(model_path, kwargs, tile):
    """ggml's CPU flash-attention kernel runs a ubatch tiled from 64 query rows with f16 or f32 K and V (one query
    at a time below, where 60 rows cost more than 64); only there is a probe batch just short of it padded up,
    and only where the cache has room for the padding."""
    m = Llama(model_path, n_ctx=256, verbose=False, **kwargs)
    try:
        engine = m._engine
        assert engine.tile_rows == tile
        pads = [probing.tile_padding(engine, rows, room) for rows, room in [(60, 10), (52, 12), (60, 3), (40, 30)]]
        assert pads == ([4, 12, 0, 0] if tile else [0, 0, 0, 0])
        assert probing.tile_padding(engine, 64, 10) == probing.tile_padding(engine, 70, 10) == 0
    finally:
        m.close()
