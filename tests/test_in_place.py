"""The rewrite through the KV cache tensors (issue 6): the kept rows are read straight from the cache
tensors the capture found in the graph, instead of copying the whole sequence out through
llama_state_seq_get_data. The state path is the oracle: both must write the same bytes."""

import llama_cpp
import numpy as np
import pytest

import pykvcompose.llama as llama_module
from helpers import last_logits, seq_state
from pykvcompose import KVComposePress, Llama, _capture, _native

pytestmark = pytest.mark.model

F16, Q8_0 = llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_Q8_0

CACHES = {
    "f16": dict(),  # flash attention off: V stored transposed
    "flash-f16": dict(flash_attn=True),  # V stored as rows
    "flash-q8_0": dict(flash_attn=True, type_k=Q8_0, type_v=Q8_0),
    "q8_0-k": dict(type_k=Q8_0),  # quantized K rows beside a transposed f16 V
}


def _probed(model_path, ctx_tokens, press, **kw):
    m = Llama(model_path, n_ctx=1024, verbose=False, **kw)
    probe = m.kv_probe(ctx_tokens, [press])
    return m, probe


@pytest.mark.parametrize("cache", list(CACHES), ids=list(CACHES))
@pytest.mark.parametrize("scoring", ["window", "reconstruct"])
def test_tensor_rewrite_writes_what_the_state_rewrite_writes(model_path, prompt_tokens, cache, scoring):
    ctx_tokens, last = prompt_tokens[:-1], prompt_tokens[-1:]
    n = len(ctx_tokens)
    press = KVComposePress(0.5, scoring=scoring, min_tokens=16)
    m, probe = _probed(model_path, ctx_tokens, press, **CACHES[cache])
    assert probe.in_place  # the probe's mask showed token j in cell j
    scores = press.score(probe)
    selection = press.select(scores, press.n_kept(n), forced=[n - 1])
    before = m.save_state()

    state = _native.context_compose(m._ctx.ctx, selection, expected_cells=n)
    expected = seq_state(m)
    m.eval(last)
    expected_logits = last_logits(m)

    m.load_state(before)
    tensors = _native.context_compose_tensors(m._ctx.ctx, m._kv_capture, np.arange(n, dtype=np.int32), selection)
    assert tensors == state  # cells, bytes, newest position
    assert seq_state(m) == expected
    m.n_tokens = n
    m.eval(last)
    np.testing.assert_array_equal(last_logits(m), expected_logits)
    m.close()


@pytest.mark.parametrize("cache", list(CACHES), ids=list(CACHES))
def test_norms_from_the_tensors_equal_norms_from_the_state(model_path, prompt_tokens, cache):
    n = len(prompt_tokens)
    m, probe = _probed(model_path, prompt_tokens, KVComposePress(0.5, scoring="window"), **CACHES[cache])
    for part in "kv":
        from_state = _native.context_norms(m._ctx.ctx, part, m.kv_n_layer, m.kv_n_head_kv, n)
        np.testing.assert_array_equal(m._kv_capture.norms(part, m.kv_n_head_kv, n), from_state)
        assert (from_state > 0).all()
    m.close()


def test_compression_takes_the_tensor_path_and_says_so(llm, prompt_tokens):
    llm.compress_context(prompt_tokens[:-1], KVComposePress(0.5, min_tokens=16))
    assert llm.kv_stats["rewrite"] == "tensors"
    llm.compress_context(prompt_tokens[:-1], KVComposePress(0.5, min_tokens=16, per_head=False))
    assert llm.kv_stats["rewrite"] == "eviction"


def test_a_chunked_reconstruct_probe_still_finds_the_context_in_place(model_path, prompt_tokens):
    """A cache too small for 2n cells probes in chunks, each chunk's cells dropped before the next;
    every probe query still sees every context cell, so the tensor path runs, and writes what the
    state path writes."""
    ctx_tokens = prompt_tokens[:-1]
    n = len(ctx_tokens)
    press = KVComposePress(0.5, min_tokens=16, scoring="reconstruct")
    m = Llama(model_path, n_ctx=n + 64, n_batch=64, verbose=False)
    probe = m.kv_probe(ctx_tokens, [press])
    assert probe.description.startswith("reconstruct, chunks of") and probe.in_place
    before = m.save_state()
    m.kv_apply(press, probe)
    assert m.kv_stats["rewrite"] == "tensors"
    expected = seq_state(m)
    m.load_state(before)
    probe.in_place = False
    m.kv_apply(press, probe)
    assert m.kv_stats["rewrite"] == "state" and seq_state(m) == expected
    m.close()


def test_a_cache_that_is_not_the_probed_cells_is_refused_untouched(model_path, prompt_tokens):
    """The native checks: llama.cpp's size of the sequence must be that of the n cells given, at the
    positions given; anything else is UnsupportedCacheError before a byte is written."""
    ctx_tokens = prompt_tokens[:-1]
    n = len(ctx_tokens)
    press = KVComposePress(0.5, scoring="window", min_tokens=16)
    m, probe = _probed(model_path, ctx_tokens, press)
    selection = press.select(press.score(probe)[..., : n - 1], press.n_kept(n - 1), forced=[n - 2])
    mem = llama_cpp.llama_get_memory(m._ctx.ctx)
    assert llama_cpp.llama_memory_seq_rm(mem, 0, n - 1, -1)  # one cell fewer than the probe saw
    before = seq_state(m)
    with pytest.raises(_native.UnsupportedCacheError, match="bytes"):
        _native.context_compose_tensors(
            m._ctx.ctx,
            m._kv_capture,
            np.arange(n, dtype=np.int32),
            press.select(press.score(probe), press.n_kept(n), forced=[n - 1]),
        )
    with pytest.raises(_native.UnsupportedCacheError, match="positions"):
        _native.context_compose_tensors(m._ctx.ctx, m._kv_capture, np.arange(1, n, dtype=np.int32), selection)
    assert seq_state(m) == before
    # the same cells at the right positions go through
    _native.context_compose_tensors(m._ctx.ctx, m._kv_capture, np.arange(n - 1, dtype=np.int32), selection)
    assert _native.context_state_info(m._ctx.ctx)["n_cells"] == press.n_kept(n - 1)
    m.close()


def test_a_mask_that_does_not_show_the_context_in_place_takes_the_state_path(llm, prompt_tokens, monkeypatch):
    """The probe's mask is the evidence that token j sits in cell j; without it the state path runs."""
    real = _capture.Capture.visibility
    # cell 0 hidden from every probe query: an empty cell or another sequence's
    monkeypatch.setattr(_capture.Capture, "visibility", lambda self: np.concatenate([[0], real(self)[1:]]))
    calls = []
    monkeypatch.setattr(llama_module._native, "context_compose_tensors", lambda *a, **k: calls.append(a))
    llm.compress_context(prompt_tokens[:-1], KVComposePress(0.5, min_tokens=16))
    assert llm.kv_stats["rewrite"] == "state" and not calls


def test_visibility_counts_the_queries_that_see_each_cell(llm, prompt_tokens):
    n, w = len(prompt_tokens), 16
    llm._drop_cache()
    llm.eval(prompt_tokens[: n - w])
    llm._engine.captured(lambda: llm.eval(prompt_tokens[n - w :]), n + 8)
    seen = llm._kv_capture.visibility()
    # cells before the window: seen by every query; window cell j: by the queries at positions >= j;
    # cells beyond the sequence: by none
    np.testing.assert_array_equal(seen[: n - w], w)
    np.testing.assert_array_equal(seen[n - w : n], np.arange(w, 0, -1))
    np.testing.assert_array_equal(seen[n:], 0)
    llm.reset()
