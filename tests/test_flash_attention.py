"""Scores without kq_soft_max: the probe attention recomputed from queries and cached keys in C++,
which makes flash attention and quantized K/V caches compressible (issue 6)."""

import llama_cpp
import numpy as np
import pytest

from helpers import greedy, last_logits
from pykvcompose import KVComposePress, Llama
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


def test_a_captured_pass_computes_flash_attention_once(model_path, prompt_tokens, monkeypatch):
    """On the CPU the capture recomputes a probe's probabilities for its scores, so it computes the layer's
    output from them as well and ggml's flash kernel is skipped (its keys cut to one while the node runs):
    the probe computes its attention once. Its logits differ from the kernel's by rounding, by less than the
    kernel's differ from flash attention off. After the capture the graph is the model's again: a plain pass is
    bit for bit a fresh context's. Where the output cannot be written (quantized V, the kernel kept for a test),
    the kernel runs."""
    ctx = prompt_tokens[:240]
    head, tail = ctx[:160], ctx[160:]

    def run(captured, **kw):
        m = Llama(model_path, n_ctx=512, verbose=False, **kw)
        try:
            m.eval(head)
            if captured:
                m._engine.captured(lambda: m.eval(tail), len(ctx))
            else:
                m.eval(tail)
            first = last_logits(m)
            outputs = m._kv_capture.n_outputs
            m.reset()  # the same ubatches again, the capture off: llama.cpp reuses the graph it captured
            m.eval(head)
            m.eval(tail)
            return first, outputs, last_logits(m)
        finally:
            m.close()

    exact, _, _ = run(False)  # flash attention off
    kernel, _, _ = run(False, flash_attn=True)
    once, outputs, after = run(True, flash_attn=True)
    assert outputs == 30  # every layer of the one ubatch
    np.testing.assert_array_equal(after, kernel)
    assert once.argmax() == kernel.argmax() == exact.argmax()
    # within the spread of llama.cpp's own two implementations (each layer's output is checked against the
    # attention in double by the native tests: 1e-5, where the kernel is 1e-2 off)
    spread = np.abs(kernel - exact).max()
    assert 0 < np.abs(once - kernel).max() <= spread, (np.abs(once - kernel).max(), spread)

    _, quantized, _ = run(True, flash_attn=True, type_k=Q8_0, type_v=Q8_0)
    assert quantized == 0
    monkeypatch.setenv("KVC_KEEP_FLASH_KERNEL", "1")
    kept, none, _ = run(True, flash_attn=True)
    assert none == 0
    np.testing.assert_array_equal(kept, kernel)  # the kernel ran: its logits exactly
